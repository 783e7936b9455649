"""The shape a backbone declares for each feature it returns."""
from typing import NamedTuple


class ShapeSpec(NamedTuple):
    """Channels and stride (relative to the input image) of one feature map."""

    channels: int
    stride: int
