"""Reading checkpoints safely and loading them into backbones.

Every file goes through ``torch.load(weights_only=True)`` or safetensors: a checkpoint can carry tensors and plain
containers, never code.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Union

import torch
from torch import Tensor, nn

__all__ = ["Checkpoint", "LoadResult", "read_checkpoint", "load_weights", "load_state_dict_checked"]

logger = logging.getLogger(__name__)

Checkpoint = Union[str, Path, Mapping[str, Any]]
# Keys under which training scripts nest the weights (ours and timm's/torchvision references': "model").
_NESTING_KEYS = ("model", "state_dict", "model_state_dict")
# Deformable-conv offset predictors are absent from plain checkpoints; they start at zero (a plain 3x3 conv).
_OFFSET_KEYS = ("conv2_offset.weight", "conv2_offset.bias")


class LoadResult(NamedTuple):
    """What ``load_weights`` did not load: keys absent from the checkpoint, extra ones, and deliberately skipped."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    skipped_keys: list[str]


def read_file(path: Union[str, Path]) -> Any:
    """Load a ``.safetensors`` file, or a ``.pth/.pt/.bin`` file with ``torch.load(weights_only=True)``.

    Raises ``ValueError`` naming the file when it holds anything but tensors and plain containers (a pickle that
    would run code is refused without running it), and ``FileNotFoundError`` when it does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"refused to load {path}: it contains Python objects other than tensors and plain containers, "
            f"which could run code ({str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None


def read_checkpoint(checkpoint: Checkpoint) -> dict[str, Tensor]:
    """A flat state dict from a path or a dict, unwrapping ``{"model": ...}``-style nesting and DDP's ``module.``."""
    state: Any = read_file(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint must hold a dict of tensors, got {type(state).__name__}")
    while True:
        nested = next((k for k in _NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = state[nested]
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError("checkpoint holds no tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _format_keys(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, Tensor],
    strict: bool = True,
    allowed_missing: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with readable errors: shape mismatches, missing and unexpected keys all listed.

    Missing keys ending with one of ``allowed_missing`` are accepted (parameters with a defined initial value).
    """
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"checkpoint shapes do not match the model: {_format_keys(mismatched)}")
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(allowed_missing)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    return missing, unexpected


def load_weights(model: nn.Module, checkpoint: Checkpoint, strict: bool = True) -> LoadResult:
    """Load ImageNet or library weights into a backbone.

    Args:
        model: a ``ResNet`` (classifier or feature extractor), an ``FPN`` (loads its bottom-up model) or any module
            whose keys match the checkpoint's.
        checkpoint: a path (``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, or
            ``.safetensors``) or a state dict; torchvision and timm ImageNet checkpoints and this library's own
            (also training checkpoints nesting the weights under ``"model"``).
        strict: raise ``ValueError`` listing any missing or unexpected key (other than those skipped on purpose).

    The classifier (``fc``) is dropped when the model is a feature extractor, and skipped with a message when the
    class count differs. Deformable-conv offset predictors may be missing: they start at zero (a plain conv).

    Example:
        >>> model = resnet50(out_features=("c2", "c3", "c4", "c5"))
        >>> load_weights(model, "resnet50-0676ba61.pth")
    """
    from .fpn import FPN
    from .resnet import ResNet

    if isinstance(model, FPN):
        return load_weights(model.body, checkpoint, strict)
    state = read_checkpoint(checkpoint)
    skipped: list[str] = []
    if isinstance(model, ResNet):
        own = model.state_dict()
        built = {k.split(".")[0] for k in own}
        # Stages past the last requested feature and the classifier of a feature extractor are not built.
        absent = [k for k in state if k.split(".")[0] not in built and k.split(".")[0] in ("fc", "layer3", "layer4")]
        if absent:
            logger.info("feature extractor: not loading %d checkpoint keys (%s...)", len(absent), absent[0])
        # Only a different class count skips the classifier; a different width is a wrong model and raises below.
        other_classes = "fc.weight" in state and "fc.weight" in own and state["fc.weight"].shape[0] != model.num_classes
        fc_mismatch = [k for k in ("fc.weight", "fc.bias") if other_classes and k in state]
        if fc_mismatch:
            logger.warning(
                "skipping the classifier: checkpoint has %d classes, model has %d",
                state["fc.weight"].shape[0],
                model.num_classes,
            )
        skipped = absent + fc_mismatch
        state = {k: v for k, v in state.items() if k not in set(skipped)}
    missing, unexpected = load_state_dict_checked(model, state, strict, allowed_missing=_OFFSET_KEYS + tuple(skipped))
    return LoadResult(missing, unexpected, skipped)
