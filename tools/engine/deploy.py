"""Checkpoints to ONNX / ``torch.export`` files (the body of ``tools/export.py``), and how exported detections are
compared with the eager model's (the parity tests, ``tools/benchmark_export.py``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

import backbones
import heads
from heads.export import FORMATS
from backbones.weights import read_run_file
from tools.engine.cls_config import build_model, check_model_options
from heads.spec import load_detector

__all__ = ["load_classifier", "export_checkpoint", "match_detections"]

logger = logging.getLogger(__name__)

_FEATURES = ("c2", "c3", "c4", "c5")


def load_classifier(name: str, weights: str | Path, num_classes: Optional[int] = None,
                    features: bool = False) -> nn.Module:
    """A ``backbones`` ResNet classifier (class count read from the checkpoint's ``fc`` unless given; our
    checkpoints' ``model_options`` applied) or, with ``features``, its c2..c5 feature extractor, with the
    checkpoint's weights; eval mode."""
    raw = read_run_file(weights)
    options = check_model_options(name, raw.get("model_options") or {})
    try:
        state = backbones.read_checkpoint(raw)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if features:
        model = backbones.FACTORIES[name](out_features=_FEATURES, **options)
    else:
        if num_classes is None:
            if "fc.weight" not in state:
                raise ValueError(f"{weights}: no classifier (fc.weight) in the checkpoint; pass --num-classes or "
                                 "--features")
            num_classes = int(state["fc.weight"].shape[0])
        model = build_model(name, num_classes, options)
    try:
        result = backbones.load_weights(model, state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if not features and any(key.startswith("fc.") for key in result.skipped_keys):
        raise ValueError(f"{weights}: the checkpoint's classifier has {int(state['fc.weight'].shape[0])} classes, "
                         f"not --num-classes {num_classes}; drop --num-classes or pass the checkpoint's count")
    return model.eval()


def export_checkpoint(
    weights: str | Path,
    output: str | Path,
    format: str,
    *,
    model: Optional[str] = None,
    features: bool = False,
    overrides: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Export a checkpoint: a detector (``heads.load_weights`` reads it; ``overrides`` as ``load_detector``'s), or
    with ``model`` (a ResNet name) a classifier. ``features``: the detector's backbone + FPN maps (p2..p6), or the
    classifier's c2..c5 maps. ``output`` must not exist. Returns ``{"output", "kind", "seconds"}``."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    output = Path(output)
    if output.exists():
        raise ValueError(f"{output} exists; remove it or choose another --output")
    if not output.parent.is_dir():
        raise ValueError(f"{output.parent} is not a folder")
    if model is not None:
        net = load_classifier(model, weights, (overrides or {}).get("num_classes"), features)
        kind = f"{model} features" if features else f"{model} classifier"
    else:
        net, info = load_detector(weights, overrides)
        if info["skipped_keys"]:
            raise ValueError(f"{weights}: the checkpoint was trained for another number of classes than "
                             f"--num-classes {info['model_spec']['num_classes']}; its class-specific layers "
                             "would be untrained: drop --num-classes or pass the checkpoint's count")
        kind = info["model_spec"]["kind"]
        if features:
            net, kind = net.backbone, f"{kind} backbone+FPN"
    start = time.perf_counter()
    heads.export(net, output, format)
    return {"output": str(output), "kind": kind, "seconds": time.perf_counter() - start}


def _mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of two N×1×H×W probability masks binarised at 0.5, pair by pair: [N]."""
    a, b = (a > 0.5).flatten(1), (b > 0.5).flatten(1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32))


def match_detections(reference: dict[str, Any], other: dict[str, Any], iou: float = 0.95,
                     score_tol: float = 1e-3, mask_iou: float = 0.9) -> tuple[int, int]:
    """How many of ``reference``'s detections ``other`` reproduces: a detection of the same label with box IoU >=
    ``iou``, score within ``score_tol`` and (when both have masks) mask IoU >= ``mask_iou``, each used once.
    Values may be tensors or numpy arrays. Returns ``(matched, len(reference))``."""
    keys = ("boxes", "labels", "scores", "masks")
    ref = {k: torch.as_tensor(v) for k, v in reference.items() if k in keys}
    oth = {k: torch.as_tensor(v) for k, v in other.items() if k in keys}
    n = len(ref["scores"])
    if n == 0 or len(oth["scores"]) == 0:
        return 0, n
    ok = (box_iou(ref["boxes"].float(), oth["boxes"].float()) >= iou)
    ok &= ref["labels"][:, None] == oth["labels"][None]
    ok &= (ref["scores"][:, None] - oth["scores"][None]).abs() <= score_tol
    used, matched = torch.zeros(len(oth["scores"]), dtype=torch.bool), 0
    for i in range(n):
        for j in torch.nonzero(ok[i] & ~used).flatten().tolist():
            masks = "masks" in ref and "masks" in oth
            if masks and _mask_iou(ref["masks"][i:i + 1], oth["masks"][j:j + 1])[0] < mask_iou:
                continue
            used[j], matched = True, matched + 1
            break
    return matched, n
