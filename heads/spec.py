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
from heads.build import DETECTORS, build_detector
from heads.detectors import VARIANTS, FasterRCNN
from heads.weights import load_weights

__all__ = ["check_model_spec", "build_from_spec", "load_detector"]


# The keys of a model_spec(): heads.build_detector's parameters, with its **options under "options".
_SPEC_KEYS = ("kind", "backbone", "num_classes", "variant", "pretrained_backbone", "backbone_options", "fpn_options",
              "options")


def _takes_module(hint: Any) -> bool:
    """Whether a parameter's type hint is a module (a part passed as an object): no config or checkpoint sets it."""
    return any(isinstance(arg, type) and issubclass(arg, nn.Module) for arg in typing.get_args(hint) or (hint,))


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A model spec (``tools.engine.det_config.model_spec``: from a config or a checkpoint) checked before anything is built from it; returns
    a copy with the option values read as their types.

    Each options dict may hold only keyword parameters of what receives it, read from the signatures:
    ``backbone_options`` of ``backbones.ResNet`` (for ``timm:<name>``: ``backbones.TimmBackbone`` and timm's model
    keywords, but none of ``timm.create_model``'s own, such as ``pretrained_cfg_overlay`` or ``checkpoint_path``,
    which load files), ``fpn_options`` of ``backbones.FPN`` and ``options`` (``detector_options``) of the detector
    class, without its module-valued parameters. ValueError naming the key and listing the valid ones otherwise.
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
    num_classes = spec.get("num_classes", 91)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
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
    hints = keyword_hints(*(c for c in detector.__mro__ if isinstance(c, type) and issubclass(c, FasterRCNN)),
                          exclude=("backbone", "num_classes", "variant"))
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
    """What a checkpoint without a ``model_spec`` (e.g. torchvision's COCO files) shows of its model."""
    spec: dict[str, Any] = {}
    if "roi_heads.box_predictor.cls_score.weight" in state:
        spec["num_classes"] = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    spec["kind"] = "mask_rcnn" if any(k.startswith("roi_heads.mask_") for k in state) else "faster_rcnn"
    # v1's box head is two FC layers (fc6, fc7); v2's is four convs then one FC.
    spec["variant"] = "v1" if "roi_heads.box_head.fc6.weight" in state else "v2"
    return spec


def load_detector(
    weights: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[FasterRCNN, dict[str, Any]]:
    """Rebuild a detector from a checkpoint and load its weights; returns ``(model_in_eval_mode, info)``.

    Our checkpoints carry their ``model_spec`` (``model_final.safetensors`` in its header); for
    others (torchvision's COCO detectors) the
    kind, variant and class count are read from the weights and the backbone defaults to
    resnet50. ``overrides`` (``kind``, ``backbone``, ``variant``, ``num_classes``, ``min_size``,
    ``max_size``; ``None`` values ignored) replace what the checkpoint says.

    ``info`` holds ``model_spec``, ``label_to_cat_id`` (``None`` when the checkpoint has none)
    and ``class_names`` (torchvision's COCO names for a 91-class model without names), and ``skipped_keys``: the
    class-specific layers left untrained because ``num_classes`` differs from the checkpoint's.
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
        spec = {"kind": "faster_rcnn", "backbone": "resnet50", "num_classes": 91, "variant": "v1",
                "pretrained_backbone": True, "backbone_options": {}, "fpn_options": {}, "options": {}}
        spec.update(_spec_from_state(state))
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
    if class_names is None and spec["num_classes"] == 91:
        class_names = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    return model, {"model_spec": spec, "label_to_cat_id": mapping, "class_names": class_names,
                   "skipped_keys": loaded.skipped_keys}
