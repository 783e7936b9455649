"""``build_detector``: a detector from names, with the ResNet-FPN detection defaults (the config edge)."""
from typing import Any, Callable, Optional

import backbones
from torch import nn

from heads.detectors import VARIANTS, FasterRCNN, MaskRCNN
from heads.detectron2 import build_detectron2_detector

__all__ = ["build_detector", "DETECTORS", "RESNET_BACKBONES", "STYLES"]

# Whose semantics a detector follows: torchvision's (its checkpoints) or detectron2's (its model zoo).
STYLES = ("torchvision", "detectron2")

DETECTORS: dict[str, type[FasterRCNN]] = {"faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}
# name -> factory of every ResNet variant (resnet18 ... wide_resnet50_2), the backbones package's own table.
RESNET_BACKBONES: dict[str, Callable[..., nn.Module]] = backbones.FACTORIES
_TIMM_PREFIX = "timm:"
_FEATURES = ("c2", "c3", "c4", "c5")


def build_detector(
    kind: str,
    backbone: str = "resnet50",
    num_classes: Optional[int] = None,
    variant: str = "v1",
    pretrained_backbone: bool = False,
    *,
    style: str = "torchvision",
    backbone_options: Optional[dict[str, Any]] = None,
    fpn_options: Optional[dict[str, Any]] = None,
    **options: Any,
) -> FasterRCNN:
    """Build a Faster or Mask R-CNN over ResNet (or timm) + FPN. Weights are loaded separately.

    Args:
        kind: "faster_rcnn" or "mask_rcnn".
        backbone: a key of RESNET_BACKBONES, or "timm:<model_name>" for a timm model (``backbones.TimmBackbone``;
            ImageNet weights via its ``checkpoint`` option).
        num_classes: with style "torchvision", classes including background (default 91: COCO in torchvision's
            numbering); with style "detectron2", foreground classes as detectron2's ``ROI_HEADS.NUM_CLASSES``
            (default 80: COCO), so that a zoo config's number carries over. Labels are 1..K either way.
        style: "torchvision" (torchvision's detectors and checkpoints) or "detectron2" (detectron2's semantics
            and model zoo: ``heads.detectron2.build_detectron2_detector``, which takes ``backbone_options``,
            ``fpn_options`` and ``**options``; ``variant`` must stay "v1", and ``pretrained_backbone`` changes
            nothing: the backbone is FrozenBN with the stem and res2 frozen either way, as detectron2's).
        variant: "v1" or "v2" (FPN with BatchNorm, 2-conv RPN head, conv box/mask heads with BatchNorm), matching
            torchvision's ``*_resnet50_fpn`` and ``*_resnet50_fpn_v2``.
        pretrained_backbone: the backbone will start from pretrained weights (``backbones.load_weights`` or
            ``heads.load_weights`` afterwards); only changes the ResNet defaults to ``norm="FrozenBN"``,
            ``frozen_stages=2`` (stem and first stage frozen). From scratch: ``norm="BN"``, ``frozen_stages=0``.
        backbone_options: keyword arguments for the bottom-up model (``backbones.ResNet`` or ``TimmBackbone``),
            overriding the defaults above.
        fpn_options: keyword arguments for ``backbones.FPN`` (default: 256 channels, max-pool top block, norm
            None for v1 and "BN" for v2).
        **options: detector options (``FasterRCNN`` / ``MaskRCNN`` keywords, e.g. ``min_size``).

    Example:
        >>> model = build_detector("mask_rcnn", "resnet50", num_classes=91, pretrained_backbone=True)
        >>> load_weights(model, "maskrcnn_resnet50_fpn_coco.pth")
        >>> zoo = build_detector("mask_rcnn", "resnet50", num_classes=80, style="detectron2")
        >>> load_weights(zoo, "model_final_f10217.pkl")
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    if style == "detectron2":
        if variant != "v1":
            raise ValueError(f"variant {variant!r} does not apply to style='detectron2' (its heads are detectron2's; "
                             "leave variant='v1')")
        return build_detectron2_detector(kind, backbone, 80 if num_classes is None else num_classes,
                                         backbone_options=backbone_options, fpn_options=fpn_options, **options)
    num_classes = 91 if num_classes is None else num_classes
    if kind not in DETECTORS:
        raise ValueError(f"kind must be one of {sorted(DETECTORS)}, got {kind!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    bottom_up = _build_bottom_up(backbone, pretrained_backbone, backbone_options or {})
    fpn_kwargs = dict(in_features=_FEATURES, out_channels=256, top_block="maxpool", norm="BN" if variant == "v2" else None)
    fpn_kwargs.update(fpn_options or {})
    fpn = backbones.FPN(bottom_up, **fpn_kwargs)
    return DETECTORS[kind](fpn, num_classes, variant=variant, **options)


def _build_bottom_up(name: str, pretrained: bool, overrides: dict[str, Any]) -> nn.Module:
    if name.startswith(_TIMM_PREFIX) and len(name) > len(_TIMM_PREFIX):
        kwargs: dict[str, Any] = dict(out_features=_FEATURES)
        kwargs.update(overrides)
        return backbones.TimmBackbone(name[len(_TIMM_PREFIX) :], **kwargs)
    if name not in RESNET_BACKBONES:
        raise ValueError(f"backbone must be one of {list(RESNET_BACKBONES)} or 'timm:<model_name>', got {name!r}")
    kwargs = dict(
        out_features=_FEATURES,
        norm="FrozenBN" if pretrained else "BN",
        frozen_stages=2 if pretrained else 0,
    )
    kwargs.update(overrides)
    return RESNET_BACKBONES[name](**kwargs)
