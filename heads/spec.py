"""Detectors from data: :func:`check_model_spec` checks a model spec (``build_detector``'s arguments, as a config or a
checkpoint gives them), :func:`build_from_spec` builds it, and :func:`load_detector` rebuilds the detector of any
checkpoint ``heads.load_weights`` reads, with its class names and category ids.
"""
from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

import backbones
from backbones.options import check_options, keyword_hints
from backbones.weights import read_checkpoint, read_run_file
from heads.build import DETECTORS, STYLES, build_detector
from heads.detectors import VARIANTS, FasterRCNN
from heads.detectron2 import build_detectron2_detector, is_detectron2_state
from heads.weights import load_weights

__all__ = ["check_model_spec", "build_from_spec", "load_detector"]


# The keys of a model_spec(): heads.build_detector's parameters, with its **options under "options".
_SPEC_KEYS = ("kind", "backbone", "num_classes", "variant", "pretrained_backbone", "style", "backbone_options",
              "fpn_options", "options")
# torchvision's COCO category names, indexed by COCO category id ("N/A" at the gaps, "__background__" at 0).
_COCO_NAMES_BY_ID = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
# detectron2's PIXEL_STD in its ResNeXt zoo configs (BGR, 0..255); its ResNets use 1.
_RESNEXT_PIXEL_STD = (57.375, 57.120, 58.395)


def _takes_module(hint: Any) -> bool:
    """Whether a parameter's type hint is a module (a part passed as an object): no config or checkpoint sets it."""
    return any(isinstance(arg, type) and issubclass(arg, nn.Module) for arg in typing.get_args(hint) or (hint,))


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A model spec (``tools.engine.det_config.model_spec``: from a config or a checkpoint) checked before anything
    is built from it; returns a copy with the option values read as their types.

    Each options dict may hold only keyword parameters of what receives it, read from the signatures:
    ``backbone_options`` of ``backbones.ResNet`` (for ``timm:<name>``: ``backbones.TimmBackbone`` and timm's model
    keywords, but none of ``timm.create_model``'s own, such as ``pretrained_cfg_overlay`` or ``checkpoint_path``,
    which load files), ``fpn_options`` of ``backbones.FPN`` and ``options`` (``detector_options``) of the detector
    class, without its module-valued parameters (for ``style: detectron2``, also those of
    ``heads.detectron2.build_detectron2_detector``). ValueError naming the key and listing the valid ones otherwise.

    ``num_classes`` follows the style: classes with the background for "torchvision" (>= 2), foreground classes
    for "detectron2" (>= 1, detectron2's ``NUM_CLASSES``); ``variant`` and ``pretrained_backbone`` are
    torchvision-style keys.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"the model spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted((k for k in spec if k not in _SPEC_KEYS), key=str)
    if unknown:
        raise ValueError(f"the model spec has unknown key(s) {unknown}; valid keys: {list(_SPEC_KEYS)}")
    spec = dict(spec)
    kind, backbone = spec.get("kind", "faster_rcnn"), spec.get("backbone", "resnet50")
    if kind not in DETECTORS:
        raise ValueError(f"detector must be one of {sorted(DETECTORS)}, got {kind!r}")
    if spec.get("variant", "v1") not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {spec['variant']!r}")
    if not isinstance(backbone, str):
        raise ValueError(f"backbone must be a name, got {backbone!r}")
    style = spec.get("style", "torchvision")
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    detectron2 = style == "detectron2"
    if detectron2 and backbone not in backbones.FACTORIES:
        raise ValueError(f"backbone must be one of {list(backbones.FACTORIES)} for style detectron2, got {backbone!r}")
    if detectron2 and (spec.get("variant", "v1") != "v1" or spec.get("pretrained_backbone", False)):
        raise ValueError("variant and pretrained_backbone do not apply to style detectron2 (its backbone is always "
                         "FrozenBN with the stem and res2 frozen)")
    num_classes, fewest = spec.get("num_classes", 80 if detectron2 else 91), 1 if detectron2 else 2
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < fewest:
        counted = "foreground classes, as detectron2's NUM_CLASSES" if detectron2 else "background included"
        raise ValueError(f"num_classes must be an integer >= {fewest} ({counted}), got {num_classes!r}")
    if not isinstance(spec.get("pretrained_backbone", False), bool):
        raise ValueError(f"pretrained_backbone must be true or false, got {spec['pretrained_backbone']!r}")
    if backbone.startswith("timm:"):
        import timm

        spec["backbone_options"] = check_options(
            spec.get("backbone_options", {}), keyword_hints(backbones.TimmBackbone, exclude=("model_name",)),
            "backbone_options", open_ended=True, refused=keyword_hints(timm.create_model, exclude=("model_name",)),
            refused_reason="timm.create_model's own options choose and load weight files; give weights with "
                           "backbone_options.checkpoint or --weights")
    else:
        spec["backbone_options"] = check_options(
            spec.get("backbone_options", {}), keyword_hints(backbones.ResNet, exclude=("depth",)), "backbone_options")
    spec["fpn_options"] = check_options(
        spec.get("fpn_options", {}), keyword_hints(backbones.FPN, exclude=("bottom_up",)), "fpn_options")
    detector = DETECTORS[kind]  # MaskRCNN passes its **options on to FasterRCNN
    builders = [c for c in detector.__mro__ if isinstance(c, type) and issubclass(c, FasterRCNN)]
    if detectron2:
        builders.insert(0, build_detectron2_detector)
    hints = keyword_hints(*builders, exclude=("kind", "backbone", "num_classes", "variant", "backbone_options",
                                              "fpn_options"))
    spec["options"] = check_options(spec.get("options", {}), {k: h for k, h in hints.items() if not _takes_module(h)},
                                    "detector_options")
    return spec


def build_from_spec(spec: dict[str, Any]) -> FasterRCNN:
    """``heads.build_detector`` from a model spec (as saved in resdet's checkpoints), checked first by
    :func:`check_model_spec`."""
    spec = check_model_spec(spec)
    options = spec.pop("options")
    if isinstance(options.get("min_size"), list):
        options["min_size"] = tuple(options["min_size"])
    try:
        return build_detector(**spec, **options)
    except TypeError as e:  # e.g. a timm keyword the model does not take, or one a ResNeXt factory sets itself
        raise ValueError(f"cannot build the detector from its spec: {e}") from None


def _spec_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """What a checkpoint without a ``model_spec`` (torchvision's COCO files, detectron2's model zoo) shows of its
    model."""
    if is_detectron2_state(state):
        return _detectron2_spec_from_state(state)
    spec: dict[str, Any] = {"kind": "faster_rcnn", "backbone": "resnet50", "num_classes": 91, "variant": "v1",
                            "pretrained_backbone": True, "backbone_options": {}, "fpn_options": {}, "options": {}}
    if "roi_heads.box_predictor.cls_score.weight" in state:
        spec["num_classes"] = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    spec["kind"] = "mask_rcnn" if any(k.startswith("roi_heads.mask_") for k in state) else "faster_rcnn"
    # v1's box head is two FC layers (fc6, fc7); v2's is four convs then one FC.
    spec["variant"] = "v1" if "roi_heads.box_head.fc6.weight" in state else "v2"
    return spec


def _detectron2_spec_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """A detectron2 ``GeneralizedRCNN`` checkpoint's spec, read from its weights: kind from its mask head, depth from
    the blocks of res4, ResNeXt groups from res2's 3x3, and the widths (stem, FPN, box and mask heads), foreground
    classes and class-agnostic regression from their shapes."""
    def rows(key: str) -> int | None:
        return int(state[key].shape[0]) if key in state else None

    spec: dict[str, Any] = {"style": "detectron2", "backbone_options": {}, "fpn_options": {}, "options": {}}
    spec["kind"] = "mask_rcnn" if any(k.startswith("roi_heads.mask_head.") for k in state) else "faster_rcnn"
    res4 = {k.split(".")[3] for k in state if k.startswith("backbone.bottom_up.res4.")}
    depth = {6: 50, 23: 101, 36: 152}.get(len(res4))
    conv2, stem = state.get("backbone.bottom_up.res2.0.conv2.weight"), rows("backbone.bottom_up.stem.conv1.weight")
    if depth is None or conv2 is None or stem is None:
        raise ValueError(f"a detectron2 checkpoint with {len(res4)} res4 blocks is not a ResNet-50/101/152 FPN model")
    groups, group_width = int(conv2.shape[0]) // int(conv2.shape[1]), int(conv2.shape[1])
    spec["backbone"] = f"resnet{depth}" if groups == 1 else f"resnext{depth}_{groups}x{group_width}d"
    if spec["backbone"] not in backbones.FACTORIES:  # e.g. detectron2's X-152-32x8d-IN5k
        spec["backbone"] = f"resnet{depth}"
        spec["backbone_options"] = {"groups": groups, "width_per_group": group_width * 64 // stem}
    if groups > 1:  # FAIR's ResNeXt ImageNet weights, behind every ResNeXt in the zoo, take unit-variance input
        spec["options"]["pixel_std"] = list(_RESNEXT_PIXEL_STD)
    if stem != 64:
        spec["backbone_options"]["base_channels"] = stem
    for key, options, name, default in (
            ("backbone.fpn_lateral2.weight", spec["fpn_options"], "out_channels", 256),
            ("roi_heads.box_head.fc1.weight", spec["options"], "box_head_width", 1024),
            ("roi_heads.mask_head.mask_fcn1.weight", spec["options"], "mask_head_width", 256)):
        if rows(key) not in (None, default):
            options[name] = rows(key)
    classes = rows("roi_heads.box_predictor.cls_score.weight")
    if classes is not None:
        spec["num_classes"] = classes - 1
        if rows("roi_heads.box_predictor.bbox_pred.weight") == 4 and classes > 2:
            spec["options"]["class_agnostic_box_reg"] = True
    return spec


def _coco_labels(spec: dict[str, Any]) -> tuple[list[str], dict[int, int]] | None:
    """COCO's class names and category ids for a checkpoint without its own, when its class count is COCO's: 91
    (torchvision: label = category id) or 80 foreground classes (detectron2's zoo: COCO's categories in id order)."""
    if spec.get("style") == "detectron2" and spec["num_classes"] == 80:
        ids = [i for i, name in enumerate(_COCO_NAMES_BY_ID) if name not in ("__background__", "N/A")]
        return [_COCO_NAMES_BY_ID[i] for i in ids], {label: cat for label, cat in enumerate(ids, start=1)}
    if spec.get("style", "torchvision") == "torchvision" and spec["num_classes"] == 91:
        return list(_COCO_NAMES_BY_ID[1:]), {label: label for label in range(1, 91)}
    return None


def load_detector(
    weights: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild a detector from a checkpoint and load its weights; returns ``(model_in_eval_mode, info)``.

    Our checkpoints carry their ``model_spec`` (``model_final.safetensors`` in its header). For others the spec is
    read from the weights: torchvision's COCO detectors (kind, variant and class count; the backbone defaults to
    resnet50) and detectron2's model zoo, ``.pkl`` or ``.pth`` (``style="detectron2"``; kind, depth, ResNeXt
    groups, class count). ``overrides`` (``kind``, ``backbone``, ``variant``, ``num_classes``, ``min_size``,
    ``max_size``; ``None`` values ignored) replace what the checkpoint says.

    ``info`` holds ``model_spec``, ``label_to_cat_id`` and ``class_names`` (the checkpoint's; for a checkpoint
    without them whose class count is COCO's, COCO's names and category ids, and ``coco_labels`` is True; else
    None), and ``skipped_keys``: the class-specific layers left untrained because ``num_classes`` differs from the
    checkpoint's.
    """
    raw = read_run_file(weights)
    try:
        state = read_checkpoint(raw)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = raw.get("model_spec")
    if stored is not None:
        if not isinstance(stored, dict):
            raise ValueError(f"{weights}: model_spec must be a mapping, got {type(stored).__name__}")
        spec = dict(stored)
        if isinstance(spec.get("backbone_options"), dict) and "checkpoint" in spec["backbone_options"]:
            # TimmBackbone's ImageNet weights file, used when the run started: this checkpoint's weights replace
            # them, so the file is not read (nor need it exist here).
            spec["backbone_options"] = {k: v for k, v in spec["backbone_options"].items() if k != "checkpoint"}
    else:
        spec = _spec_from_state(state)
    for key in ("kind", "backbone", "variant", "num_classes"):
        if key in overrides:
            spec[key] = overrides[key]
    try:
        spec = check_model_spec(spec)  # the same rules as a config's: a spec is data, never a way to load files
    except ValueError as e:
        raise ValueError(f"{weights}: model spec: {e}") from None
    if "min_size" in overrides:
        spec["options"]["min_size"] = (int(overrides["min_size"]),)
    if "max_size" in overrides:
        spec["options"]["max_size"] = int(overrides["max_size"])
    mapping, class_names = raw.get("label_to_cat_id"), raw.get("class_names")
    try:
        mapping = {int(k): int(v) for k, v in mapping.items()} if mapping else None
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{weights}: label_to_cat_id must map labels to category ids, got {str(mapping)[:100]}"
                         ) from None
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        raise ValueError(f"{weights}: class_names must be a list of strings, got {str(class_names)[:100]}")
    try:
        model = build_from_spec(spec)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    try:
        loaded = load_weights(model, state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model.eval()
    coco = _coco_labels(spec) if class_names is None and mapping is None else None
    if coco is not None:
        class_names, mapping = coco
    return model, {"model_spec": spec, "label_to_cat_id": mapping, "class_names": class_names,
                   "coco_labels": coco is not None, "skipped_keys": loaded.skipped_keys}
