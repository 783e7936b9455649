"""Detectors from specs and checkpoints: :func:`build_model` from a checked spec (what a config or checkpoint
says), :func:`load_start_weights` for a run's starting point, :func:`load_detector` to rebuild any checkpoint
``heads.load_weights`` reads, without flags.
"""
from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

import backbones
import heads
from tools.engine.checkpoint import load_run_file
from tools.engine.config import check_options, keyword_hints
from tools.engine.det_flags import add_detector_flags, detector_overrides

__all__ = ["check_model_spec", "build_model", "load_start_weights", "load_detector", "for_inference",
           "add_detector_flags", "detector_overrides"]

logger = logging.getLogger(__name__)


# The keys of a model_spec(): heads.build_detector's parameters, with its **options under "options".
_SPEC_KEYS = ("kind", "backbone", "num_classes", "variant", "pretrained_backbone", "backbone_options", "fpn_options",
              "options")


def _takes_module(hint: Any) -> bool:
    """Whether a parameter's type hint is a module (a part passed as an object): no config or checkpoint sets it."""
    return any(isinstance(arg, type) and issubclass(arg, nn.Module) for arg in typing.get_args(hint) or (hint,))


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A :func:`model_spec` dict (from a config or a checkpoint) checked before anything is built from it; returns
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
    if kind not in heads.DETECTORS:
        raise ValueError(f"detector must be one of {sorted(heads.DETECTORS)}, got {kind!r}")
    if spec.get("variant", "v1") not in heads.VARIANTS:
        raise ValueError(f"variant must be one of {list(heads.VARIANTS)}, got {spec['variant']!r}")
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
    detector = heads.DETECTORS[kind]  # MaskRCNN passes its **options on to FasterRCNN
    hints = keyword_hints(*(c for c in detector.__mro__ if isinstance(c, type) and issubclass(c, heads.FasterRCNN)),
                          exclude=("backbone", "num_classes", "variant"))
    spec["options"] = check_options(spec.get("options", {}), {k: h for k, h in hints.items() if not _takes_module(h)},
                                    "detector_options")
    return spec


def build_model(spec: dict[str, Any]) -> heads.FasterRCNN:
    """``heads.build_detector`` from a :func:`model_spec` dict (as saved in our checkpoints), checked first by
    :func:`check_model_spec`."""
    spec = check_model_spec(spec)
    options = spec.pop("options")
    if isinstance(options.get("min_size"), list):
        options["min_size"] = tuple(options["min_size"])
    try:
        return heads.build_detector(**spec, **options)
    except TypeError as e:  # e.g. a timm keyword the model does not take, or one a ResNeXt factory sets itself
        raise ValueError(f"cannot build the detector from its spec: {e}") from None


def load_start_weights(model: nn.Module, pretrained: str | Path | None = None, weights: str | Path | None = None,
                       verbose: bool = True) -> None:
    """Load the weights a run starts from: ``pretrained`` into the backbone body, then a full detector ``weights``.

    ``pretrained``: a torchvision/timm ImageNet checkpoint or our classification ``model_final.pth``
    (``backbones.load_weights``; the classifier is dropped). ``weights``: our or torchvision's
    detector checkpoint (``heads.load_weights``; with another class count the class-specific
    predictor layers keep their initial values, with a warning).
    """
    if pretrained is not None:
        result = backbones.load_weights(model.backbone, pretrained)
        if verbose:
            logger.info("loaded backbone weights from %s%s", pretrained,
                        f" (not loaded: {len(result.skipped_keys)} classifier/unused keys)" if result.skipped_keys else "")
    if weights is not None:
        result = heads.load_weights(model, weights)
        if verbose:
            logger.info("loaded detector weights from %s%s", weights,
                        " (class-specific predictor skipped: other class count)" if result.skipped_keys else "")



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
) -> tuple[heads.FasterRCNN, dict[str, Any]]:
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
    raw = load_run_file(weights)
    try:
        state = backbones.read_checkpoint(raw)
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
        model = build_model(spec)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    try:
        loaded = heads.load_weights(model, state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model.eval()
    if class_names is None and spec["num_classes"] == 91:
        class_names = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    return model, {"model_spec": spec, "label_to_cat_id": mapping, "class_names": class_names,
                   "skipped_keys": loaded.skipped_keys}


def for_inference(model: nn.Module, bf16: bool, compile: bool) -> nn.Module:
    """The eval-mode model as is (already folding its norms on the fly, channels_last), or, with ``bf16`` or
    ``compile``, its :func:`backbones.optimize_for_inference` copy (bf16 where the device has it natively)."""
    if not (bf16 or compile):
        return model
    return backbones.optimize_for_inference(model, bf16=bf16, compile=compile)
