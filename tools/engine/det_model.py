"""Detectors in the tools: :func:`load_start_weights` for a run's starting point and :func:`for_inference`
(``heads.load_detector`` rebuilds a checkpoint's detector; ``det_flags`` holds the flags that override it)."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

import backbones
import heads

__all__ = ["load_start_weights", "for_inference"]

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
