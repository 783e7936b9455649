"""Feature Pyramid Network (Lin et al., 2017) over any backbone that declares ``output_shape()``."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import conv_norm
from .shape_spec import ShapeSpec

__all__ = ["FPN"]

_TOP_BLOCKS = ("maxpool", "p6p7", None)
_FPN_NORMS = {None: None, "GN": lambda c: nn.GroupNorm(32, c), "BN": nn.BatchNorm2d}
_FUSES = ("sum", "avg")


class ConvNorm(nn.Sequential):
    """``conv`` (key ``.0``) optionally followed by a norm (``.1``): torchvision's Conv2dNormActivation key layout."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, norm: Optional[str], stride: int = 1) -> None:
        norm_layer = _FPN_NORMS[norm]
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=norm_layer is None)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        super().__init__(conv, *([norm_layer(out_ch)] if norm_layer is not None else []))

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm(self[0], self[1], x) if len(self) > 1 else self[0](x)


class _Pyramid(nn.Module):
    """Holds the lateral (``inner_blocks``) and output (``layer_blocks``) convolutions: keys as torchvision's FPN."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, norm: Optional[str]) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(ConvNorm(c, out_channels, 1, norm) for c in in_channels)
        self.layer_blocks = nn.ModuleList(ConvNorm(out_channels, out_channels, 3, norm) for _ in in_channels)


class _P6P7(nn.Module):
    """RetinaNet's extra levels: P6 = 3x3/2 conv on P5, P7 = 3x3/2 conv on ReLU(P6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, p5: Tensor) -> list[Tensor]:
        p6 = self.p6(p5)
        return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Top-down feature pyramid with lateral connections.

    Args:
        bottom_up: a backbone returning an ordered dict of features and declaring them with ``output_shape()``
            (``ResNet(..., out_features=...)``, ``TimmBackbone``). Stored as ``self.body``.
        in_features: the bottom-up features to use, finest first. Level names follow the stride:
            stride 2**k gives ``p{k}``.
        out_channels: width of every pyramid level.
        top_block: "maxpool" adds P6 by max-pooling P5 (Faster/Mask R-CNN: P2-P6); "p6p7" adds P6 and P7 by strided
            convolutions on P5 and, RetinaNet-style, keeps only levels of stride >= 8 (P3-P7); None adds nothing.
        norm: None, "GN" or "BN" after every pyramid convolution (torchvision's ``_v2`` detectors use "BN").
        fuse: how a lateral and the upsampled coarser level combine: "sum" (the paper) or "avg".

    Example:
        >>> fpn = FPN(ResNet(50, out_features=("c2", "c3", "c4", "c5")))
        >>> list(fpn.output_shape())
        ['p2', 'p3', 'p4', 'p5', 'p6']
    """

    def __init__(
        self,
        bottom_up: nn.Module,
        in_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        out_channels: int = 256,
        top_block: Optional[str] = "maxpool",
        norm: Optional[str] = None,
        fuse: str = "sum",
    ) -> None:
        super().__init__()
        if top_block not in _TOP_BLOCKS:
            raise ValueError(f"top_block must be one of {_TOP_BLOCKS}, got {top_block!r}")
        if norm not in _FPN_NORMS:
            raise ValueError(f"norm must be one of {tuple(_FPN_NORMS)}, got {norm!r}")
        if fuse not in _FUSES:
            raise ValueError(f"fuse must be one of {_FUSES}, got {fuse!r}")
        if not hasattr(bottom_up, "output_shape"):
            raise ValueError("bottom_up must declare its features with output_shape()")
        available = bottom_up.output_shape()
        in_features = tuple(in_features)
        missing = [f for f in in_features if f not in available]
        if not in_features or missing:
            raise ValueError(f"in_features {in_features} must be a non-empty subset of the backbone's {tuple(available)}")
        strides = [available[f].stride for f in in_features]
        if strides != sorted(strides) or len(set(strides)) != len(strides):
            raise ValueError(f"in_features must be ordered from fine to coarse, got strides {strides}")
        if norm == "GN" and out_channels % 32:
            raise ValueError(f"norm='GN' needs out_channels divisible by 32, got {out_channels}")

        if top_block == "p6p7":  # RetinaNet-style pyramids start at stride 8: a finer input is not used.
            in_features = tuple(f for f in in_features if available[f].stride >= 8)
            strides = [available[f].stride for f in in_features]
            if not in_features:
                raise ValueError("top_block='p6p7' needs at least one input feature of stride >= 8")
        self.body = bottom_up
        self.in_features = in_features
        self.out_channels = out_channels
        self.fuse = fuse
        self.fpn = _Pyramid([available[f].channels for f in in_features], out_channels, norm)
        self.top_block = _P6P7(out_channels) if top_block == "p6p7" else None
        self._top_block_name = top_block

        level_strides = list(strides)
        if top_block is not None:
            level_strides += [strides[-1] * 2] + ([strides[-1] * 4] if top_block == "p6p7" else [])
        self._shapes = OrderedDict((f"p{int(math.log2(s))}", ShapeSpec(out_channels, s)) for s in level_strides)
        # Batches are padded to a multiple of the coarsest input stride (32 for ResNet, torchvision's value);
        # the extra levels cope with any size.
        self.size_divisibility = strides[-1]

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{"p2": ShapeSpec(out_channels, 4), ...}`` for every returned level."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Image batch ``(N, 3, H, W)`` -> ordered dict of pyramid levels, finest first."""
        bottom_up = self.body(x)
        features = [bottom_up[f] for f in self.in_features]
        inner, layer = self.fpn.inner_blocks, self.fpn.layer_blocks

        top_down = inner[-1](features[-1])
        outputs = [layer[-1](top_down)]
        for i in range(len(features) - 2, -1, -1):
            lateral = inner[i](features[i])
            upsampled = F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            top_down = lateral + upsampled if self.fuse == "sum" else (lateral + upsampled) * 0.5
            outputs.insert(0, layer[i](top_down))

        if self._top_block_name == "maxpool":
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        elif self.top_block is not None:
            outputs.extend(self.top_block(outputs[-1]))
        return OrderedDict(zip(self._shapes, outputs))
