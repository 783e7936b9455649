"""Faster and Mask R-CNN with detectron2's semantics, so that its model-zoo weights give its detections.

``build_detector(kind, backbone, num_classes=80, style="detectron2")`` assembles the library's ``FasterRCNN`` /
``MaskRCNN`` from the parts here. Each follows detectron2's source (``detectron2/modeling``), checked against it by
``tests/test_detectron_weights.py`` on reference outputs that ``tools/make_detectron_reference.py`` makes with
detectron2 itself:

- input: images stay RGB floats in [0, 1]; the transform scales them to 0..255, reorders them to BGR and subtracts
  ``MODEL.PIXEL_MEAN`` (divides by ``PIXEL_STD``), held as float32 like detectron2's buffers. Images that need it
  are resized by ``ResizeShortestEdge``'s rule (``resize_shortest_edge``) with bilinear interpolation, as
  detectron2 resizes float images, and batches are padded to a multiple of 32.
- backbone: ``ResNet`` with ``norm="FrozenBN"`` (scale ``weight / sqrt(running_var + 1e-5)``, as detectron2's
  ``FrozenBatchNorm2d``; files without statistics get mean 0 and variance 1, as it fills them), the stride on the
  first 1x1 convolution for MSRA's ResNets and on the 3x3 for ResNeXts (``STRIDE_IN_1X1``), stem and res2 frozen;
  FPN P2-P6 of 256 channels with P6 by max-pooling P5.
- RPN: anchors of 32..512 px (8x the level stride), aspect ratios 0.5, 1, 2, not rounded, offset 0, at the levels'
  declared strides; per level the 1000 best by objectness logit (2000 in training), clipped, boxes with an empty
  side dropped, NMS 0.7 per level ranked by logit, the 1000 best per image kept.
- RoI heads: ROIAlignV2 (``aligned=True``, adaptive sampling) over P2-P5 with detectron2's level rule
  ``floor(4 + log2(sqrt(area) / 224 + 1e-8))``; two FC layers of 1024; the predictor's background logit is the
  last and its box deltas are per foreground class; softmax scores > 0.05, NMS 0.5 per class, 100 per image, no
  minimum box size; 4 conv + deconv mask head with one mask per foreground class.
- output: boxes scaled back to the input size and clipped, detections with an empty box dropped
  (``detector_postprocess``); masks pasted as detectron2's ``paste_masks_in_image`` does on the CPU (bilinear
  ``grid_sample`` of the 28x28 mask at each pixel centre, zero outside the mask, zero more than one pixel outside
  the box), returned as probabilities.

Public conventions stay the library's: labels are 1..K (detectron2's class + 1, 0 is background inside), outputs
are torchvision-style dicts, masks N x 1 x H x W probabilities. The adapters that give torchvision's RoIHeads its
background-first layout are ``Detectron2BoxPredictor`` and ``Detectron2MaskPredictor``; their parameters keep
detectron2's shapes, so a zoo file loads without reshaping (``heads.load_weights`` maps the names).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_area

import backbones
from heads.detectors import FasterRCNN, MaskRCNN
from heads.ops import MultiScaleRoIAlign
from heads.postprocess import (
    BatchedGeneralizedRCNNTransform,
    BatchedRegionProposalNetwork,
    BatchedRoIHeads,
    _clip_to_images,
    check_paste_inputs,
)

__all__ = [
    "PIXEL_MEAN_BGR",
    "Detectron2AnchorGenerator",
    "Detectron2BoxPredictor",
    "Detectron2LevelMapper",
    "Detectron2MaskPredictor",
    "Detectron2RPN",
    "Detectron2RoIHeads",
    "Detectron2Transform",
    "build_detectron2_detector",
    "convert_detectron2_state",
    "is_detectron2_state",
    "paste_masks_detectron2",
    "resize_shortest_edge",
]

# detectron2's MODEL.PIXEL_MEAN and PIXEL_STD (MSRA's Caffe2 ResNets, BGR, 0..255); its ResNeXt zoo entries use
# PIXEL_STD (57.375, 57.120, 58.395).
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (1.0, 1.0, 1.0)
_FEATURES = ("c2", "c3", "c4", "c5")
_ANCHOR_SIZE_PER_STRIDE = 8
_ASPECT_RATIOS = (0.5, 1.0, 2.0)
_CANONICAL_SIZE, _CANONICAL_LEVEL = 224, 4  # ROI_HEADS' FPN level rule: a 224 px box pools from P4
_ROI_MIN_STRIDE, _ROI_MAX_STRIDE = 4, 32


class Detectron2AnchorGenerator(nn.Module):
    """detectron2's ``DefaultAnchorGenerator``: unrounded anchors, offset 0, one size per level at its stride.

    Cell anchors are ``(-w/2, -h/2, w/2, h/2)`` with ``w = sqrt(size^2 / ratio)``, ``h = ratio * w``, stored in
    float32 as detectron2 stores them; anchor ``a`` of location ``(y, x)`` is cell anchor ``a`` shifted by
    ``(x * stride, y * stride)``, in torchvision's order (locations, then anchors).

    Args:
        sizes: one anchor side per level, in pixels.
        strides: the levels' strides (not inferred from the padded batch, which is wrong for P6).
        aspect_ratios: height / width of the anchors at every location.
    """

    def __init__(self, sizes: Sequence[float], strides: Sequence[int],
                 aspect_ratios: Sequence[float] = _ASPECT_RATIOS) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"give one anchor size per level: sizes {list(sizes)}, strides {list(strides)}")
        self.sizes = tuple((float(s),) for s in sizes)  # torchvision's layout (FasterRCNN checks its length)
        self.strides = tuple(int(s) for s in strides)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        for level, size in enumerate(sizes):
            cell = []
            for ratio in self.aspect_ratios:
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                cell.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
            self.register_buffer(f"cell_anchors_{level}", torch.tensor(cell, dtype=torch.float32), persistent=False)

    def num_anchors_per_location(self) -> list[int]:
        """Anchors at each location of each level."""
        return [len(self.aspect_ratios)] * len(self.strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        """All anchors of all levels, one ``[sum(H_l * W_l * A), 4]`` tensor per image (the same for every image)."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature maps, got {len(feature_maps)}")
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        levels = []
        for level, (feature, stride) in enumerate(zip(feature_maps, self.strides)):
            height, width = feature.shape[-2:]
            shift_x = torch.arange(width, dtype=torch.float32, device=device) * stride
            shift_y = torch.arange(height, dtype=torch.float32, device=device) * stride
            y, x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((x, y, x, y), dim=-1).reshape(-1, 1, 4).to(dtype)
            cell = getattr(self, f"cell_anchors_{level}").to(dtype)
            levels.append((shifts + cell[None]).reshape(-1, 4))
        anchors = torch.cat(levels)
        return [anchors for _ in range(len(image_list.image_sizes))]


class Detectron2RPN(BatchedRegionProposalNetwork):
    """The RPN with detectron2's proposal selection: ranked by logits, boxes with an empty side dropped.

    Build it with ``min_size=0`` semantics in mind: ``strict_min_size`` keeps sides ``> min_size`` (detectron2's
    ``MIN_SIZE`` 0: ``Boxes.nonempty``), and ``score_thresh`` applies to logits (pass ``-inf`` for none).
    """

    scores_are_logits = True
    strict_min_size = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_size = 0.0


class Detectron2RoIHeads(BatchedRoIHeads):
    """RoI heads that keep detections of any size (detectron2 drops only empty boxes, after rescaling)."""

    min_detection_size = 0.0


class Detectron2LevelMapper:
    """detectron2's ``assign_boxes_to_levels``: level ``floor(canonical_level + log2(sqrt(area) / canonical_size
    + 1e-8))``, clamped to ``[k_min, k_max]``, returned relative to ``k_min`` (torchvision's ``LevelMapper`` adds
    its epsilon outside the logarithm, which moves boxes near the boundaries to another level)."""

    def __init__(self, k_min: int, k_max: int, canonical_size: int = _CANONICAL_SIZE,
                 canonical_level: int = _CANONICAL_LEVEL) -> None:
        self.k_min, self.k_max = k_min, k_max
        self.canonical_size, self.canonical_level = canonical_size, canonical_level

    def __call__(self, boxes: list[Tensor]) -> Tensor:
        sizes = torch.sqrt(torch.cat([box_area(b) for b in boxes]))
        levels = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size + 1e-8))
        return levels.clamp(min=self.k_min, max=self.k_max).to(torch.int64) - self.k_min


def _roi_align_v2(levels: Mapping[str, int], output_size: int, channels_last: bool = False) -> MultiScaleRoIAlign:
    """detectron2's ``ROIPooler`` with ``ROIAlignV2``: aligned, adaptive sampling, its level rule."""
    pool = MultiScaleRoIAlign(list(levels), output_size, 0, strides=list(levels.values()),
                              channels_last=channels_last, aligned=True)
    k = [int(round(math.log2(s))) for s in levels.values()]
    pool.map_levels = Detectron2LevelMapper(k[0], k[-1])
    return pool


class Detectron2BoxPredictor(nn.Module):
    """detectron2's ``FastRCNNOutputLayers`` (``cls_score``: K + 1 logits, background last; ``bbox_pred``: 4 deltas
    per foreground class, or 4 for all), returned in torchvision's layout: background first, with zero deltas for
    it, so that torchvision's RoIHeads losses and our post-processing run unchanged and label k is class k - 1.

    Args:
        in_channels: width of the box head's output.
        num_classes: foreground classes (detectron2's ``ROI_HEADS.NUM_CLASSES``).
        class_agnostic: one box regression for every class (``CLS_AGNOSTIC_BBOX_REG``).
    """

    def __init__(self, in_channels: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 if class_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # detectron2's initialisation
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[R, ...]`` features -> logits ``[R, K + 1]`` (background first) and deltas ``[R, (K + 1) * 4]``."""
        x = x.flatten(start_dim=1)
        logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        if self.class_agnostic:
            deltas = deltas.repeat(1, self.num_classes)
        logits = torch.cat((logits[:, -1:], logits[:, :-1]), dim=1)
        return logits, torch.cat((deltas.new_zeros(deltas.shape[0], 4), deltas), dim=1)


class Detectron2MaskPredictor(nn.Module):
    """The end of detectron2's ``MaskRCNNConvUpsampleHead``: ``deconv`` (2x2/2, ReLU) and ``predictor`` (1x1, one
    mask per foreground class), here ``conv5_mask`` and ``mask_fcn_logits`` as torchvision's ``MaskRCNNPredictor``.
    A zero background channel is put first, so that torchvision's RoIHeads pick class k - 1 for label k."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, 1)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.mask_fcn_logits.weight, std=0.001)  # detectron2's initialisation
        nn.init.zeros_(self.conv5_mask.bias)
        nn.init.zeros_(self.mask_fcn_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[R, C, 14, 14]`` -> mask logits ``[R, K + 1, 28, 28]`` (channel 0: zeros for the background)."""
        logits = self.mask_fcn_logits(F.relu(self.conv5_mask(x)))
        return F.pad(logits, (0, 0, 0, 0, 1, 0))


def resize_shortest_edge(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """The ``(height, width)`` detectron2's ``ResizeShortestEdge`` gives an image: the shorter side to
    ``short_edge``, unless the longer side would then exceed ``max_size``, which it is then scaled to; rounded to
    the nearest integer.

    Example:
        >>> resize_shortest_edge(480, 640, 800, 1333)
        (800, 1067)
    """
    scale = short_edge / min(height, width)
    new_h, new_w = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def _grid_sample_weights(start: Tensor, end: Tensor, first: int, last: int, source_len: int) -> Tensor:
    """Weights ``[last - first, source_len]`` of ``grid_sample`` (bilinear, zero padding, ``align_corners=False``)
    along one axis, for the centres of pixels ``first..last - 1`` mapped onto a box side ``[start, end]``."""
    pixel = torch.arange(first, last, dtype=start.dtype, device=start.device) + 0.5
    grid = (pixel - start) / (end - start) * 2 - 1
    source = ((grid + 1) * source_len - 1) / 2  # grid_sample's unnormalisation
    low = source.floor()
    frac = source - low
    low = low.to(torch.int64)
    # Two spare columns, one each side, collect the corners that fall outside the mask (zero padding).
    weights = torch.zeros(last - first, source_len + 2, dtype=start.dtype, device=start.device)
    weights.scatter_add_(1, (low + 1).clamp(0, source_len + 1)[:, None], (1 - frac)[:, None])
    weights.scatter_add_(1, (low + 2).clamp(0, source_len + 1)[:, None], frac[:, None])
    return weights[:, 1:-1]


def paste_masks_detectron2(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int]) -> Tensor:
    """Paste ``[N, 1, M, M]`` mask probabilities at their boxes as detectron2's ``paste_masks_in_image`` does on
    the CPU, without its threshold: ``[N, 1, H, W]`` probabilities.

    detectron2 samples each mask with ``grid_sample`` at the pixel centres from one pixel before its box to one
    after (bilinear, zero outside the mask; everything else is 0). Bilinear sampling on such a grid is separable, so
    each mask is ``rows @ mask @ cols^T`` over that region here.

    Example:
        >>> boxes = torch.tensor([[4.0, 5.0, 40.0, 30.0], [0.0, 0.0, 9.0, 9.0]])
        >>> paste_masks_detectron2(torch.rand(2, 1, 28, 28), boxes, (48, 64)).shape
        torch.Size([2, 1, 48, 64])
    """
    check_paste_inputs(masks, boxes)
    height, width = image_shape
    dtype = torch.float64 if masks.dtype == torch.float64 else torch.float32
    out = torch.zeros((masks.shape[0], height, width), dtype=masks.dtype, device=masks.device)
    source = masks[:, 0].to(dtype)
    corners = boxes.to(dtype)
    x0, y0, x1, y1 = corners.unbind(1)
    regions = torch.stack(
        ((x0.floor() - 1).clamp(min=0), (y0.floor() - 1).clamp(min=0),
         (x1.ceil() + 1).clamp(max=width), (y1.ceil() + 1).clamp(max=height)), dim=1
    ).to(torch.int64).tolist()
    for i, (left, top, right, bottom) in enumerate(regions):
        if right <= left or bottom <= top:
            continue
        rows = _grid_sample_weights(y0[i], y1[i], top, bottom, source.shape[1])
        cols = _grid_sample_weights(x0[i], x1[i], left, right, source.shape[2])
        out[i, top:bottom, left:right] = (rows @ source[i] @ cols.T).to(masks.dtype)
    return out[:, None]


class Detectron2Transform(BatchedGeneralizedRCNNTransform):
    """Normalisation, resizing and output mapping as detectron2's ``GeneralizedRCNN`` and ``DefaultPredictor``.

    Args:
        min_size: the shorter side (detectron2's ``INPUT.MIN_SIZE_TEST``; a tuple: ``MIN_SIZE_TRAIN`` choices in
            training, the last one at test).
        max_size: cap on the longer side (``MAX_SIZE_TEST``).
        pixel_mean, pixel_std: ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``, 0..255, in ``input_format``'s channel order.
        input_format: "BGR" (detectron2's default) or "RGB": the channel order the model was trained on; images
            passed in are RGB either way.
        size_divisible: batches are padded to a multiple of this.
    """

    def __init__(self, min_size: int | tuple[int, ...], max_size: int, pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
                 pixel_std: Sequence[float] = PIXEL_STD_BGR, input_format: str = "BGR",
                 size_divisible: int = 32) -> None:
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(f"pixel_mean and pixel_std need 3 values, got {list(pixel_mean)}, {list(pixel_std)}")
        super().__init__(min_size, max_size, list(pixel_mean), list(pixel_std), size_divisible=size_divisible)
        self.input_format = input_format
        # float32 buffers, as detectron2 keeps them (a float64 model then uses the float32-rounded values too).
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    def normalize(self, image: Tensor) -> Tensor:
        """RGB in [0, 1] -> ``(pixels * 255 in input_format order - pixel_mean) / pixel_std``."""
        if not image.is_floating_point():
            raise TypeError(f"images must be floats in [0, 1], got dtype {image.dtype}")
        pixels = image * 255.0
        if self.input_format == "BGR":
            pixels = pixels.flip(0)
        return (pixels - self.pixel_mean.to(image.dtype)) / self.pixel_std.to(image.dtype)

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None
               ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        """``resize_shortest_edge`` with bilinear interpolation (detectron2's resize of float images); an image
        already at that size is left as it is."""
        height, width = image.shape[-2:]
        short_edge = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = resize_shortest_edge(height, width, short_edge, self.max_size)
        if size == (height, width):
            return image, target
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (height, width), size)
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """detectron2's ``detector_postprocess``: boxes scaled to the input size and clipped, detections with an
        empty box dropped, masks pasted (``paste_masks_detectron2``)."""
        if self.training:
            return result
        for prediction, (height, width), (out_h, out_w) in zip(result, image_shapes, original_image_sizes):
            boxes = prediction["boxes"]
            if (height, width) != (out_h, out_w):
                scale_x, scale_y = out_w / width, out_h / height
                boxes = boxes * boxes.new_tensor([scale_x, scale_y, scale_x, scale_y])
            boxes = _clip_to_images(boxes, boxes.new_tensor([out_h, out_w]))
            keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).nonzero().squeeze(1)
            for key, value in prediction.items():
                prediction[key] = value[keep]
            prediction["boxes"] = boxes[keep]
            if "masks" in prediction:
                prediction["masks"] = paste_masks_detectron2(prediction["masks"], prediction["boxes"], (out_h, out_w))
        return result


def _bottom_up(name: str, options: Mapping[str, Any]) -> nn.Module:
    if name not in backbones.FACTORIES:
        raise ValueError(f"backbone must be one of {list(backbones.FACTORIES)} for style='detectron2', got {name!r}")
    # MSRA's ResNets stride on the first 1x1, FAIR's ResNeXts on the 3x3 (detectron2's zoo configs).
    kwargs: dict[str, Any] = dict(out_features=_FEATURES, norm="FrozenBN", frozen_stages=2,
                                  stride_in_1x1=not name.startswith("resnext"))
    kwargs.update(options)
    return backbones.FACTORIES[name](**kwargs)


def build_detectron2_detector(
    kind: str,
    backbone: str = "resnet50",
    num_classes: int = 80,
    *,
    backbone_options: Optional[Mapping[str, Any]] = None,
    fpn_options: Optional[Mapping[str, Any]] = None,
    box_head_width: int = 1024,
    mask_head_width: int = 256,
    class_agnostic_box_reg: bool = False,
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
    pixel_std: Sequence[float] = PIXEL_STD_BGR,
    input_format: str = "BGR",
    **options: Any,
) -> FasterRCNN:
    """A Faster or Mask R-CNN over ResNet-FPN with detectron2's semantics (see the module docstring).

    Args:
        kind: "faster_rcnn" or "mask_rcnn".
        backbone: a ``backbones.FACTORIES`` name: "resnet50", "resnet101", "resnext101_32x8d", ...
        num_classes: foreground classes, detectron2's ``MODEL.ROI_HEADS.NUM_CLASSES`` (80 for COCO). Detections
            are labelled 1..num_classes (detectron2's class + 1); the model's ``num_classes`` attribute counts the
            background too (num_classes + 1), as for every detector of the library.
        backbone_options: ``backbones.ResNet`` keywords over the defaults (FrozenBN, stem and res2 frozen,
            ``stride_in_1x1`` True except for ResNeXts).
        fpn_options: ``backbones.FPN`` keywords over the defaults (256 channels, P6 by max-pooling).
        box_head_width, mask_head_width: ``ROI_BOX_HEAD.FC_DIM`` and ``ROI_MASK_HEAD.CONV_DIM``.
        class_agnostic_box_reg: ``ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG``.
        min_size, max_size: ``INPUT.MIN_SIZE_TEST`` (a tuple: ``MIN_SIZE_TRAIN`` choices in training, the last
            at test) and ``MAX_SIZE_TEST``.
        pixel_mean, pixel_std, input_format: ``MODEL.PIXEL_MEAN``, ``PIXEL_STD``, ``INPUT.FORMAT``.
        **options: ``FasterRCNN`` thresholds and sizes over detectron2's defaults (e.g. ``box_score_thresh``).

    Example:
        >>> model = build_detectron2_detector("mask_rcnn", "resnet50", num_classes=80).eval()
        >>> load_weights(model, "model_final_f10217.pkl")
    """
    kinds = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}
    replaced = sorted(set(options) & {"image_mean", "image_std", "size_divisibility", "variant"})
    if replaced:
        raise ValueError(f"{', '.join(replaced)} do not apply to style='detectron2': its transform takes pixel_mean "
                         "and pixel_std (0..255, in input_format's channel order) and pads to the FPN's stride")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes counts foreground classes for style='detectron2' (80 for COCO), got "
                         f"{num_classes!r}")
    fpn_kwargs: dict[str, Any] = dict(in_features=_FEATURES, out_channels=256, top_block="maxpool", norm=None)
    fpn_kwargs.update(fpn_options or {})
    fpn = backbones.FPN(_bottom_up(backbone, backbone_options or {}), **fpn_kwargs)
    strides = {name: spec.stride for name, spec in fpn.output_shape().items()}
    roi_levels = {name: s for name, s in strides.items() if _ROI_MIN_STRIDE <= s <= _ROI_MAX_STRIDE}
    channels = fpn.out_channels
    anchors = Detectron2AnchorGenerator([_ANCHOR_SIZE_PER_STRIDE * s for s in strides.values()], list(strides.values()))
    defaults: dict[str, Any] = dict(
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, len(_ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_nms_thresh=0.7,
        rpn_score_thresh=float("-inf"),
        box_roi_pool=_roi_align_v2(roi_levels, 7),
        box_head=TwoMLPHead(channels * 7 * 7, box_head_width),
        box_predictor=Detectron2BoxPredictor(box_head_width, num_classes, class_agnostic_box_reg),
        box_score_thresh=0.05,
        box_nms_thresh=0.5,
        box_detections_per_img=100,
        transform=Detectron2Transform(min_size, max_size, pixel_mean, pixel_std, input_format,
                                      size_divisible=fpn.size_divisibility),
        rpn_class=Detectron2RPN,
        roi_heads_class=Detectron2RoIHeads,
    )
    if kind == "mask_rcnn":
        defaults.update(
            mask_roi_pool=_roi_align_v2(roi_levels, 14, channels_last=True),
            mask_head=MaskRCNNHeads(channels, [mask_head_width] * 4, 1),
            mask_predictor=Detectron2MaskPredictor(mask_head_width, mask_head_width, num_classes),
        )
    defaults.update(options)
    return kinds[kind](fpn, num_classes + 1, **defaults)


# -- detectron2 checkpoints ------------------------------------------------------------------------------------

_BOTTOM_UP = "backbone.bottom_up."
_D2_PREFIXES = (_BOTTOM_UP, "backbone.fpn_lateral", "backbone.fpn_output", "proposal_generator.rpn_head.")
_RENAMES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"backbone\.bottom_up\.stem\.conv1\.weight"), "backbone.body.conv1.weight"),
    (re.compile(r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)"), r"backbone.body.bn1.\1"),
    (re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight"),
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.(\w+)"),
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.(\w+)"),
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (re.compile(r"proposal_generator\.rpn_head\.conv\.(weight|bias)"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)"), r"rpn.head.cls_logits.\1"),
    (re.compile(r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)"), r"rpn.head.bbox_pred.\1"),
    (re.compile(r"roi_heads\.box_head\.fc1\.(weight|bias)"), r"roi_heads.box_head.fc6.\1"),
    (re.compile(r"roi_heads\.box_head\.fc2\.(weight|bias)"), r"roi_heads.box_head.fc7.\1"),
    (re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)"),
     lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
    (re.compile(r"roi_heads\.mask_head\.deconv\.(weight|bias)"), r"roi_heads.mask_predictor.conv5_mask.\1"),
    (re.compile(r"roi_heads\.mask_head\.predictor\.(weight|bias)"), r"roi_heads.mask_predictor.mask_fcn_logits.\1"),
)
_FPN = re.compile(r"backbone\.fpn_(lateral|output)(\d+)\.(weight|bias)")
# Buffers detectron2 does not save (non-persistent), but older checkpoints may hold: not weights, left out.
_NOT_WEIGHTS = ("pixel_mean", "pixel_std")


def is_detectron2_state(state: Mapping[str, object]) -> bool:
    """Whether a state dict names its parameters as detectron2's ``GeneralizedRCNN`` does."""
    return any(isinstance(key, str) and key.startswith(_D2_PREFIXES) for key in state)


def convert_detectron2_state(model: nn.Module, state: Mapping[str, Tensor]
                             ) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Rename a detectron2 ``GeneralizedRCNN`` state dict for ``model`` (built with ``style="detectron2"``).

    FrozenBN statistics absent from the file are filled in as detectron2 does (mean 0, variance 1).

    Returns:
        the renamed state (keys that map to nothing keep their names), our key -> the file's name, and the
        file's entries left out on purpose (``pixel_mean``/``pixel_std``).
    """
    fpn_index = {}
    fpn = getattr(model, "backbone", None)
    if isinstance(fpn, backbones.FPN):
        shapes = fpn.body.output_shape()
        fpn_index = {int(math.log2(shapes[f].stride)): i for i, f in enumerate(fpn.in_features)}
    renamed: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    left_out: list[str] = []
    for key, value in state.items():
        if key in _NOT_WEIGHTS:
            left_out.append(key)
            continue
        new = key
        match = _FPN.fullmatch(key)
        if match and int(match[2]) in fpn_index:
            blocks = "inner_blocks" if match[1] == "lateral" else "layer_blocks"
            new = f"backbone.fpn.{blocks}.{fpn_index[int(match[2])]}.0.{match[3]}"
        else:
            for pattern, replacement in _RENAMES:
                if pattern.fullmatch(key):
                    new = pattern.sub(replacement, key)
                    break
        if new in renamed:
            raise ValueError(f"checkpoint entries {names[new]} and {key} both map to {new}")
        renamed[new], names[new] = value, key
    own = model.state_dict()
    for key, value in own.items():
        if key.endswith(".running_mean") and key.startswith("backbone.body.") and key not in renamed:
            stem = key[: -len("running_mean")]
            if stem + "weight" in renamed:
                renamed[key] = torch.zeros_like(value)
                renamed[stem + "running_var"] = torch.ones_like(own[stem + "running_var"])
    return renamed, names, left_out
