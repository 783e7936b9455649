"""The shape a backbone declares for each feature it returns, and the check of what it is given."""
from typing import NamedTuple, Optional

import torch


class ShapeSpec(NamedTuple):
    """Channels and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int


def check_image_batch(x: torch.Tensor, channels: Optional[int], dtype: torch.dtype, who: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty ``(N, C, H, W)`` batch the model can take."""
    expected = f"{who} expects a non-empty {dtype} tensor of shape (N, {channels or 'C'}, H, W)"
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{expected}, got {got}")
    if (channels is not None and x.shape[1] != channels) or 0 in x.shape:
        raise ValueError(f"{expected}, got shape {tuple(x.shape)}")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{expected}, got {x.dtype}: convert the input or the model (model.to({x.dtype}))")
