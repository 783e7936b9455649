"""Faster R-CNN and Mask R-CNN over a backbone that declares its feature shapes (our FPN over ResNet or timm).

The models are torchvision's detection pipeline (GeneralizedRCNN with its RPN, RoIHeads and transform), wired
from the backbone's ``output_shape()`` instead of torchvision's hard-coded level names. Module names match
torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (and ``_v2``), so their checkpoints load.
What we add: input validation, class-agnostic box regression, a ``variant`` switch, batched post-processing.
"""
from typing import Optional, Sequence

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead

from backbones.shape_spec import check_backbone
from heads.inputs import check_images, check_targets
from heads.ops import MultiScaleRoIAlign
from heads.postprocess import BatchedGeneralizedRCNNTransform, BatchedRegionProposalNetwork, BatchedRoIHeads

__all__ = ["FasterRCNN", "MaskRCNN", "ClassAgnosticBoxPredictor", "VARIANTS"]

VARIANTS = ("v1", "v2")
# RoIAlign pools from the levels of stride 4..32 (p2..p5); coarser levels (p6, p7) only feed the RPN, as in
# the FPN paper and torchvision's builders.
_ROI_MIN_STRIDE, _ROI_MAX_STRIDE = 4, 32
# Anchor side = 8 x level stride: 32 px on p2 (stride 4) ... 512 px on p6 (stride 64), torchvision's sizes.
_ANCHOR_SIZE_PER_STRIDE = 8
_ANCHOR_RATIOS = (0.5, 1.0, 2.0)
_REPRESENTATION_SIZE = 1024  # width of the box head's output (both variants)
_MASK_HEAD_WIDTH = 256


def _default_roi_pool(levels: dict[str, int], output_size: int, sampling_ratio: int,
                      channels_last: bool = False) -> nn.Module:
    """The multi-level RoIAlign over ``levels`` (name -> stride) for the default box and mask pools.

    The scales come from the declared strides: torchvision infers them from the first batch, which is wrong
    (and then cached) when batch padding is large relative to the image, e.g. 65 px padded to 96.

    ``heads.ops.MultiScaleRoIAlign``: torchvision's module and results with a parallel CPU kernel (torchvision's
    is serial; BENCHMARKS.md, design measurements). ``channels_last``
    for the mask pool: the mask head's convolutions then run channels-last, faster and with a lower peak.
    """
    return MultiScaleRoIAlign(list(levels), output_size, sampling_ratio, strides=list(levels.values()),
                              channels_last=channels_last)


class ClassAgnosticBoxPredictor(nn.Module):
    """Classification over ``num_classes`` plus one box regression shared by all classes.

    Returns the regression repeated per class (N × num_classes·4), so torchvision's RoIHeads loss and
    post-processing, which index it by class, run unchanged; the loss gradient reaches the single regressor.
    State-dict keys are FastRCNNPredictor's (``cls_score``, ``bbox_pred``); ``bbox_pred`` has 4 outputs.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        scores = self.cls_score(x)
        box_deltas = self.bbox_pred(x).repeat(1, self.num_classes)
        return scores, box_deltas


def _feature_levels(backbone: nn.Module) -> dict[str, int]:
    """Name -> stride of every feature map the backbone returns, read from its ``output_shape()``."""
    check_backbone(backbone, "backbone")
    if not isinstance(getattr(backbone, "out_channels", None), int):
        raise ValueError(
            "backbone must declare the width of its feature maps as `out_channels: int` (e.g. backbones.FPN over a "
            f"ResNet or TimmBackbone), got {type(backbone).__name__} without it"
        )
    shapes = backbone.output_shape()
    if not shapes:
        raise ValueError("backbone.output_shape() is empty; the detector needs at least one feature map")
    widths = {spec.channels for spec in shapes.values()}
    if widths != {backbone.out_channels}:
        raise ValueError(
            f"every feature map must have backbone.out_channels={backbone.out_channels} channels, "
            f"got {dict((name, spec.channels) for name, spec in shapes.items())}"
        )
    return {name: spec.stride for name, spec in shapes.items()}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")


class FasterRCNN(GeneralizedRCNN):
    """Faster R-CNN (torchvision's conventions and defaults) over a backbone that declares its feature shapes.

    Train mode: ``model(images, targets)`` returns a dict of losses. Eval mode: ``model(images)`` returns one dict
    per image with ``boxes`` (N×4 xyxy, input pixels), ``labels`` and ``scores``.

    Args:
        backbone: module mapping an N×3×H×W batch to an ordered dict of feature maps, satisfying
            ``backbones.Backbone`` and with ``out_channels`` (e.g. ``backbones.FPN``); its ``size_divisibility``
            sets batch padding.
        num_classes: number of classes including background (91 for COCO in torchvision's numbering).
        variant: default heads: "v1" (1-conv RPN head, two-FC box head) or "v2" (2-conv RPN head, 4 conv + BN +
            1 FC box head), as torchvision's ``fasterrcnn_resnet50_fpn`` and ``_v2``; pair "v2" with an FPN
            built with ``norm="BN"``.
        class_agnostic_box_reg: one box regression for all classes instead of one per class.
        transform: the module that normalises, resizes and batches the images and maps detections back
            (default: ``BatchedGeneralizedRCNNTransform`` from ``min_size``, ``max_size``, ``image_mean``,
            ``image_std``, ``size_divisibility``, which are then unused).
        rpn_class, roi_heads_class: the RPN and RoI-heads classes, built with torchvision's constructor arguments
            (default ``BatchedRegionProposalNetwork``, ``BatchedRoIHeads``; ``heads.detectron2`` has subclasses
            with detectron2's rules).
        The remaining options keep torchvision's FasterRCNN names and defaults; parts passed as modules replace
        the defaults, which are built only when None.

    Example:
        >>> fpn = backbones.FPN(backbones.resnet18(out_features=("c2", "c3", "c4", "c5")))
        >>> model = FasterRCNN(fpn, num_classes=3, min_size=320).eval()
        >>> detections = model([torch.rand(3, 240, 320)])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        variant: str = "v1",
        class_agnostic_box_reg: bool = False,
        # transform
        min_size: int | tuple[int, ...] = 800,
        max_size: int = 1333,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        size_divisibility: Optional[int] = None,
        # RPN
        rpn_anchor_generator: Optional[AnchorGenerator] = None,
        rpn_head: Optional[nn.Module] = None,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        rpn_fg_iou_thresh: float = 0.7,
        rpn_bg_iou_thresh: float = 0.3,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_score_thresh: float = 0.0,
        # box branch
        box_roi_pool: Optional[nn.Module] = None,
        box_head: Optional[nn.Module] = None,
        box_predictor: Optional[nn.Module] = None,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_fg_iou_thresh: float = 0.5,
        box_bg_iou_thresh: float = 0.5,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        bbox_reg_weights: Optional[tuple[float, float, float, float]] = None,
        # parts with another framework's rules
        transform: Optional[nn.Module] = None,
        rpn_class: type[BatchedRegionProposalNetwork] = BatchedRegionProposalNetwork,
        roi_heads_class: type[BatchedRoIHeads] = BatchedRoIHeads,
    ) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes counts the background class too and must be an int >= 2, got {num_classes!r}"
            )
        _check_variant(variant)
        if class_agnostic_box_reg and box_predictor is not None:
            raise ValueError("class_agnostic_box_reg builds the default box predictor; do not pass box_predictor too")
        levels = _feature_levels(backbone)
        channels = backbone.out_channels
        roi_levels = {name: stride for name, stride in levels.items() if _ROI_MIN_STRIDE <= stride <= _ROI_MAX_STRIDE}
        if not roi_levels and (box_roi_pool is None):
            raise ValueError(
                f"the backbone has no level of stride {_ROI_MIN_STRIDE}..{_ROI_MAX_STRIDE} to pool RoIs from "
                f"(levels: {levels}); pass box_roi_pool"
            )

        if rpn_anchor_generator is None:
            sizes = tuple((_ANCHOR_SIZE_PER_STRIDE * stride,) for stride in levels.values())
            rpn_anchor_generator = AnchorGenerator(sizes, (_ANCHOR_RATIOS,) * len(sizes))
        if len(rpn_anchor_generator.sizes) != len(levels):
            raise ValueError(
                f"rpn_anchor_generator has {len(rpn_anchor_generator.sizes)} size groups but the backbone returns "
                f"{len(levels)} feature maps {list(levels)}; give one group per level"
            )
        if rpn_head is None:
            rpn_head = RPNHead(
                channels, rpn_anchor_generator.num_anchors_per_location()[0], conv_depth=2 if variant == "v2" else 1
            )
        rpn = rpn_class(
            rpn_anchor_generator,
            rpn_head,
            rpn_fg_iou_thresh,
            rpn_bg_iou_thresh,
            rpn_batch_size_per_image,
            rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh,
            score_thresh=rpn_score_thresh,
        )

        if box_roi_pool is None:
            box_roi_pool = _default_roi_pool(roi_levels, output_size=7, sampling_ratio=2)
        if box_head is None:
            resolution = box_roi_pool.output_size[0]
            if variant == "v2":
                box_head = FastRCNNConvFCHead(
                    (channels, resolution, resolution), [256] * 4, [_REPRESENTATION_SIZE], norm_layer=nn.BatchNorm2d
                )
            else:
                box_head = TwoMLPHead(channels * resolution**2, _REPRESENTATION_SIZE)
        if box_predictor is None:
            predictor = ClassAgnosticBoxPredictor if class_agnostic_box_reg else FastRCNNPredictor
            box_predictor = predictor(_REPRESENTATION_SIZE, num_classes)
        roi_heads = roi_heads_class(
            box_roi_pool,
            box_head,
            box_predictor,
            box_fg_iou_thresh,
            box_bg_iou_thresh,
            box_batch_size_per_image,
            box_positive_fraction,
            bbox_reg_weights,
            box_score_thresh,
            box_nms_thresh,
            box_detections_per_img,
        )

        if transform is None:
            transform = BatchedGeneralizedRCNNTransform(
                min_size,
                max_size,
                list(image_mean) if image_mean is not None else [0.485, 0.456, 0.406],
                list(image_std) if image_std is not None else [0.229, 0.224, 0.225],
                size_divisible=size_divisibility or backbone.size_divisibility or 1,
            )
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes
        self.variant = variant
        self.roi_levels = roi_levels

    def forward(
        self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses (train mode, ``targets`` required) or per-image detections (eval mode)."""
        check_images(images, max_size=self.transform.max_size)
        if self.training:
            check_targets(targets, images, self.num_classes, needs_masks=self.roi_heads.has_mask())
        return super().forward(images, targets)


class MaskRCNN(FasterRCNN):
    """Mask R-CNN: FasterRCNN plus a mask branch (14×14 RoIAlign, 4 conv + deconv head, 28×28 masks).

    Eval mode adds ``masks`` (N×1×H×W probabilities at input size) to each image's detections; train mode needs
    ``masks`` (uint8 N×H×W) in every target. Options are FasterRCNN's plus ``mask_roi_pool``, ``mask_head`` and
    ``mask_predictor``; "v2" adds BatchNorm to the mask head, as torchvision's ``maskrcnn_resnet50_fpn_v2``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        mask_roi_pool: Optional[nn.Module] = None,
        mask_head: Optional[nn.Module] = None,
        mask_predictor: Optional[nn.Module] = None,
        **options,
    ) -> None:
        super().__init__(backbone, num_classes, **options)
        if mask_roi_pool is None:
            mask_roi_pool = _default_roi_pool(self.roi_levels, output_size=14, sampling_ratio=2, channels_last=True)
        if mask_head is None:
            norm = nn.BatchNorm2d if self.variant == "v2" else None
            mask_head = MaskRCNNHeads(backbone.out_channels, [_MASK_HEAD_WIDTH] * 4, 1, norm_layer=norm)
        if mask_predictor is None:
            mask_predictor = MaskRCNNPredictor(_MASK_HEAD_WIDTH, _MASK_HEAD_WIDTH, num_classes)
        self.roi_heads.mask_roi_pool = mask_roi_pool
        self.roi_heads.mask_head = mask_head
        self.roi_heads.mask_predictor = mask_predictor
