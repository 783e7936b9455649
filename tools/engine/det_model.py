"""Detectors in the tools: :func:`load_start_weights` for a run's starting point, :func:`for_inference`, and the flags
with which a tool overrides what a checkpoint says (``heads.load_detector`` rebuilds it)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from torch import nn

import backbones
import heads

__all__ = ["load_start_weights", "for_inference", "add_detector_flags", "detector_overrides"]

logger = logging.getLogger(__name__)


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



def for_inference(model: nn.Module, bf16: bool, compile: bool) -> nn.Module:
    """The eval-mode model as is (already folding its norms on the fly, channels_last), or, with ``bf16`` or
    ``compile``, its :func:`backbones.optimize_for_inference` copy (bf16 where the device has it natively)."""
    if not (bf16 or compile):
        return model
    return backbones.optimize_for_inference(model, bf16=bf16, compile=compile)


def add_detector_flags(parser: argparse.ArgumentParser) -> None:
    """The flags with which a tool replaces what a checkpoint says about its detector (see
    :func:`detector_overrides`); unset ones keep the checkpoint's. Their values are checked with the spec."""
    parser.add_argument("--detector", help="faster_rcnn or mask_rcnn (default: the checkpoint's)")
    parser.add_argument("--backbone", help="the detector's backbone (default: the checkpoint's)")
    parser.add_argument("--variant", help="v1 or v2 heads (default: the checkpoint's)")
    parser.add_argument("--num-classes", type=int, help="classes including background (default: the checkpoint's)")
    parser.add_argument("--min-size", type=int, help="shorter side the detector resizes to (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, help="longer side cap (default: the checkpoint's)")


def detector_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``overrides`` of ``heads.load_detector`` from the flags of :func:`add_detector_flags` (None = not given)."""
    return {"kind": args.detector, "backbone": args.backbone, "variant": args.variant,
            "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size}
