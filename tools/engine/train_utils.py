"""Small pieces every training loop needs: seeding, AMP policy, gradient clipping, the optimizer step."""
from __future__ import annotations

import contextlib
import random
from typing import Iterable, Literal, NamedTuple

import numpy as np
import torch

__all__ = ["seed_everything", "AmpSettings", "resolve_amp", "autocast", "clip_gradients", "backward", "optimizer_step"]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class AmpSettings(NamedTuple):
    """Mixed precision choice: autocast ``dtype`` (``None`` = full fp32) and whether a GradScaler is needed."""

    dtype: torch.dtype | None
    use_scaler: bool


def resolve_amp(
    device: torch.device, enabled: bool, dtype: Literal["auto", "bfloat16", "float16"] = "auto"
) -> AmpSettings:
    """Pick the autocast dtype for ``--amp``.

    ``"auto"``: bfloat16 on CPU, and on CUDA where the GPU supports it (Ampere and newer):
    bf16 has fp32's exponent range, so it needs no loss scaling and cannot overflow to inf
    where fp32 would not. Older GPUs get float16 with a GradScaler, which skips the steps
    whose gradients overflow (those skipped steps are not divergence).
    """
    if not enabled:
        return AmpSettings(None, False)
    if dtype not in ("auto", "bfloat16", "float16"):
        raise ValueError(f"amp dtype must be 'auto', 'bfloat16' or 'float16', got {dtype!r}")
    if dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            dtype = "float16"
        else:
            dtype = "bfloat16"
    if dtype == "bfloat16":
        return AmpSettings(torch.bfloat16, False)
    return AmpSettings(torch.float16, True)


def autocast(device: torch.device, amp: AmpSettings) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp``, or a no-op context when AMP is off."""
    if amp.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp.dtype)


def clip_gradients(
    parameters: Iterable[torch.nn.Parameter],
    max_norm: float | None,
    scaler: torch.amp.GradScaler | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (``None`` = off); returns the norm before clipping.

    With a GradScaler the gradients are unscaled first (pass the ``optimizer`` it scales),
    so ``max_norm`` refers to the true gradients.
    """
    if max_norm is None:
        return None
    if max_norm <= 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None (off), got {max_norm}")
    if scaler is not None:
        if optimizer is None:
            raise ValueError("clip_gradients with a GradScaler needs the optimizer to unscale")
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Backward of ``loss`` into the parameters' gradients (added to what is there), scaled when a GradScaler is
    given."""
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_grad_norm: float | None,
) -> None:
    """Optional clipping of the accumulated gradients, then the optimizer step.

    With a scaler, a step whose gradients overflowed is skipped by the scaler (not divergence).
    """
    clip_gradients(model.parameters(), clip_grad_norm, scaler, optimizer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
