"""The shape a backbone declares for each feature it returns, the ``Backbone`` protocol, and the input check."""
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch


class ShapeSpec(NamedTuple):
    """Channels and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """What a feature extractor declares to the modules built over it (``FPN``, the detectors).

    ``ResNet(out_features=...)``, ``TimmBackbone`` and ``FPN`` satisfy it; any module that returns an ordered dict
    of feature maps and has these two members can take their place.

    Attributes:
        size_divisibility: input height and width should be multiples of it (detection batches are padded to it);
            0 when any size works.
    """

    size_divisibility: int

    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every returned feature, by name, in the order of the returned dict."""
        ...


def check_backbone(module: object, name: str) -> None:
    """Raise ``ValueError`` naming what ``module`` (passed as argument ``name``) lacks of the ``Backbone`` protocol."""
    if isinstance(module, Backbone) and callable(module.output_shape):
        return
    missing = [
        member
        for member, present in (
            ("output_shape()", callable(getattr(module, "output_shape", None))),
            ("size_divisibility", hasattr(module, "size_divisibility")),
        )
        if not present
    ]
    raise ValueError(
        f"{name} must satisfy backbones.Backbone (output_shape() -> dict[str, ShapeSpec] declaring its features, "
        f"and size_divisibility: int); {type(module).__name__} lacks {' and '.join(missing)}"
    )


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
