"""Feature Pyramid Network (Lin et al., 2017) over any backbone that declares ``output_shape()``."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import NormSpec, build_norm, conv_norm
from .shape_spec import ShapeSpec, check_backbone

__all__ = ["FPN", "TopBlock", "LastLevelMaxPool", "LastLevelP6P7"]

_FUSES = ("sum", "avg")


class ConvNorm(nn.Sequential):
    """``conv`` (key ``.0``) optionally followed by a norm (``.1``): torchvision's Conv2dNormActivation key layout."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        norm_layer: Optional[Callable[[int], nn.Module]],
        stride: int = 1,
    ) -> None:
        conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, bias=norm_layer is None)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        super().__init__(conv, *([norm_layer(out_ch)] if norm_layer is not None else []))

    def forward(self, x: Tensor) -> Tensor:
        return conv_norm(self[0], self[1], x) if len(self) > 1 else self[0](x)


class _Pyramid(nn.Module):
    """Holds the lateral (``inner_blocks``) and output (``layer_blocks``) convolutions: keys as torchvision's FPN."""

    def __init__(
        self, in_channels: Sequence[int], out_channels: int, norm_layer: Optional[Callable[[int], nn.Module]]
    ) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList(ConvNorm(c, out_channels, 1, norm_layer) for c in in_channels)
        self.layer_blocks = nn.ModuleList(ConvNorm(out_channels, out_channels, 3, norm_layer) for _ in in_channels)


class TopBlock(nn.Module):
    """Extra pyramid levels computed from the coarsest one; a subclass declares what it adds.

    Attributes:
        min_input_stride: the FPN uses only the input features of at least this stride (RetinaNet's P3-P7: 8).
    """

    min_input_stride: int = 1

    def output_shape(self, coarsest: ShapeSpec) -> list[ShapeSpec]:
        """Channels and stride of each added level, finest first, given those of the coarsest pyramid level."""
        raise NotImplementedError

    def forward(self, coarsest: Tensor) -> list[Tensor]:
        """The coarsest pyramid level ``(N, C, H, W)`` -> the added levels, finest first."""
        raise NotImplementedError


class LastLevelMaxPool(TopBlock):
    """One level at twice the coarsest stride by a 1x1/2 max-pool (Faster/Mask R-CNN's P6); no parameters.

    Example:
        >>> fpn = FPN(resnet50(out_features=("c2", "c3", "c4", "c5")), top_block=LastLevelMaxPool())
    """

    def output_shape(self, coarsest: ShapeSpec) -> list[ShapeSpec]:
        return [ShapeSpec(coarsest.channels, coarsest.stride * 2)]

    def forward(self, coarsest: Tensor) -> list[Tensor]:
        return [F.max_pool2d(coarsest, kernel_size=1, stride=2)]


class LastLevelP6P7(TopBlock):
    """RetinaNet's extra levels: P6 = 3x3/2 conv on P5, P7 = 3x3/2 conv on ReLU(P6); inputs of stride >= 8 only.

    Parameters ``p6``/``p7``, as torchvision's ``LastLevelP6P7``.

    Args:
        channels: width of the pyramid, in and out.

    Example:
        >>> fpn = FPN(resnet50(out_features=("c3", "c4", "c5")), ("c3", "c4", "c5"), top_block=LastLevelP6P7(256))
    """

    min_input_stride = 8

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.p7 = nn.Conv2d(channels, channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def output_shape(self, coarsest: ShapeSpec) -> list[ShapeSpec]:
        if coarsest.channels != self.p6.in_channels:
            raise ValueError(
                f"LastLevelP6P7({self.p6.in_channels}) takes {self.p6.in_channels} channels, got {coarsest.channels}"
            )
        return [
            ShapeSpec(self.p6.out_channels, coarsest.stride * 2),
            ShapeSpec(self.p7.out_channels, coarsest.stride * 4),
        ]

    def forward(self, coarsest: Tensor) -> list[Tensor]:
        p6 = self.p6(coarsest)
        return [p6, self.p7(F.relu(p6))]


# Config strings for the standard blocks, built at the FPN's width; inside the library a TopBlock is passed.
_TOP_BLOCKS: dict[str, Callable[[int], TopBlock]] = {
    "maxpool": lambda channels: LastLevelMaxPool(),
    "p6p7": LastLevelP6P7,
}


class FPN(nn.Module):
    """Top-down feature pyramid with lateral connections.

    Args:
        bottom_up: a module returning an ordered dict of features and satisfying ``Backbone`` (``output_shape()``
            and ``size_divisibility``): ``ResNet(..., out_features=...)``, ``TimmBackbone``. Stored as ``self.body``.
        in_features: the bottom-up features to use, finest first. Level names follow the stride:
            stride 2**k gives ``p{k}``.
        out_channels: width of every pyramid level.
        top_block: a ``TopBlock`` adding levels above the coarsest (``LastLevelMaxPool()``,
            ``LastLevelP6P7(out_channels)``), None for none, or a shortcut: "maxpool" for ``LastLevelMaxPool``
            (P6 by max-pooling P5, Faster/Mask R-CNN: P2-P6), "p6p7" for ``LastLevelP6P7`` (P6 and P7 by strided
            convolutions on P5; RetinaNet-style, only levels of stride >= 8: P3-P7). Stored as ``self.top_block``.
        norm: None, or the norm after every pyramid convolution as for ``ResNet``: "BN", "FrozenBN", "SyncBN",
            "GN" (32 groups) or a ``channels -> nn.Module`` callable (torchvision's ``_v2`` detectors use "BN").
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
        top_block: Union[TopBlock, str, None] = "maxpool",
        norm: Optional[NormSpec] = None,
        fuse: str = "sum",
    ) -> None:
        super().__init__()
        if isinstance(top_block, str) and top_block in _TOP_BLOCKS:
            top_block = _TOP_BLOCKS[top_block](out_channels)
        elif top_block is not None and not isinstance(top_block, TopBlock):
            raise ValueError(
                f"top_block must be one of {(*_TOP_BLOCKS, None)} or a TopBlock module, got {top_block!r}"
            )
        norm_layer = None if norm is None else build_norm(norm)
        if fuse not in _FUSES:
            raise ValueError(f"fuse must be one of {_FUSES}, got {fuse!r}")
        check_backbone(bottom_up, "bottom_up")
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

        # The top block may leave fine inputs unused: RetinaNet-style pyramids start at stride 8.
        min_stride = top_block.min_input_stride if top_block is not None else 1
        in_features = tuple(f for f in in_features if available[f].stride >= min_stride)
        strides = [available[f].stride for f in in_features]
        if not in_features:
            raise ValueError(
                f"top_block {type(top_block).__name__} needs at least one input feature of stride >= {min_stride}"
            )
        levels = [ShapeSpec(out_channels, s) for s in strides]
        if top_block is not None:
            extra = top_block.output_shape(levels[-1])
            extra_strides = [levels[-1].stride] + [spec.stride for spec in extra]
            if any(spec.channels != out_channels for spec in extra) or extra_strides != sorted(set(extra_strides)):
                raise ValueError(
                    f"top_block {type(top_block).__name__} must add levels of out_channels={out_channels} channels "
                    f"and strides above {levels[-1].stride}, coarser and coarser; it declares {extra}"
                )
            levels += extra
        self.body = bottom_up
        self.in_features = in_features
        self.out_channels = out_channels
        self.fuse = fuse
        self.fpn = _Pyramid([available[f].channels for f in in_features], out_channels, norm_layer)
        self.top_block = top_block

        self._shapes = OrderedDict((f"p{int(math.log2(spec.stride))}", spec) for spec in levels)
        # Batches are padded to a multiple of the coarsest input stride (32 for ResNet, torchvision's value) and of
        # the bottom-up model's own requirement; the extra levels cope with any size.
        self.size_divisibility = math.lcm(strides[-1], bottom_up.size_divisibility or 1)

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

        if self.top_block is not None:
            outputs.extend(self.top_block(outputs[-1]))
        return OrderedDict(zip(self._shapes, outputs))
