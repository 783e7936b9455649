"""ResNet (He et al., 2015) and its ResNeXt / wide / ResNet-D / dilated / deformable variants.

One ``ResNet`` class driven by ``ARCH_SETTINGS``; parameter names are torchvision's (``conv1``, ``bn1``,
``layer1``..``layer4``, ``downsample``, ``fc``) so torchvision and timm checkpoints load unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from torchvision.ops import DeformConv2d, StochasticDepth

from .norm import NormSpec, build_norm, conv_norm
from .shape_spec import ShapeSpec, check_image_batch

__all__ = [
    "ARCH_SETTINGS",
    "STAGE_NAMES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
]

STAGE_NAMES = ("c2", "c3", "c4", "c5")
_OUTPUT_STRIDES = (8, 16, 32)


class _MaxPoolRecompute(torch.autograd.Function):
    """Max-pool whose backward finds the argmax again instead of keeping it from the forward.

    ``F.max_pool2d`` with autograd keeps int64 indices, twice the size of the float32 output, alive until the
    backward reaches the stem: across the step's memory peak. The input is kept instead, which costs nothing: the
    stem's in-place ReLU keeps it already. The backward pools once more (BENCHMARKS.md, design measurements), and
    the gradient is the same, ties included.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        # The kernel that also writes indices is faster on CPU than the one that does not (8.9 vs 12.5 ms for
        # 16 x 64 x 112 x 112 channels_last on 2 cores); the indices are freed here.
        return F.max_pool2d(x, *ctx.args, return_indices=True)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x, *ctx.args, return_indices=True)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices)
        return grad_x, None, None, None, None, None


class StemMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps no indices for the backward (see ``_MaxPoolRecompute``)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaxPoolRecompute.apply(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


class Downsample(nn.Sequential):
    """Projection shortcut: ``[AvgPool2d or Identity,] conv1x1, norm`` (keys ``downsample.0``/``.1`` as torchvision)."""

    def forward(self, x: Tensor) -> Tensor:
        *pool, conv, norm = self
        for layer in pool:
            x = layer(x)
        return conv_norm(conv, norm, x)


def _conv3x3(in_ch: int, out_ch: int, stride: int, dilation: int, groups: int, deform: bool) -> nn.Module:
    if deform:
        return DeformConv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def _offset_conv(channels: int, stride: int, dilation: int) -> nn.Conv2d:
    """Predicts the 2*3*3 sampling offsets of a deformable 3x3; zero-initialised so it starts as a plain conv."""
    conv = nn.Conv2d(channels, 18, 3, stride, padding=dilation, dilation=dilation)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _Block(nn.Module):
    """What both residual blocks share: the shortcut and the residual sum."""

    expansion = 1
    downsample: Optional[nn.Module]
    conv2_offset: Optional[nn.Module]

    @property
    def last_norm(self) -> nn.Module:
        """The norm closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3 if hasattr(self, "bn3") else self.bn2

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def _conv2(self, x: Tensor) -> Tensor:
        if self.conv2_offset is None:
            return conv_norm(self.conv2, self.bn2, x)
        return self.bn2(self.conv2(x, self.conv2_offset(x)))


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer=nn.BatchNorm2d,
        deform: bool = False,
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock (depth 18/34) supports only groups=1 and width_per_group=64")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation, 1, deform)
        self.conv2_offset = _offset_conv(planes, 1, dilation) if deform else None
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.drop_path(self._conv2(out))
        out += identity  # in place: no new activation-sized buffer to allocate and fault in
        return self.relu(out)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped for ResNeXt, deformable on request), 1x1 expand (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer=nn.BatchNorm2d,
        deform: bool = False,
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(inplanes, width, 1, stride_1x1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride_3x3, dilation, groups, deform)
        self.conv2_offset = _offset_conv(width, stride_3x3, dilation) if deform else None
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        identity = self._shortcut(x)
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(self._conv2(out))
        out = self.drop_path(conv_norm(self.conv3, self.bn3, out))
        out += identity  # in place: no new activation-sized buffer to allocate and fault in
        return self.relu(out)


# depth -> (block, blocks per stage c2..c5): the paper's Table 1.
ARCH_SETTINGS: dict[int, tuple[type[_Block], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class _KeepRunningStats:
    """Restores BatchNorm running statistics after gradient checkpointing recomputes a block.

    Without it the recomputation would apply the momentum update a second time.
    """

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [
            b
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]

    def __enter__(self) -> None:
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for b, v in zip(self.buffers, self.saved):
                b.copy_(v)


class _NoOp:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass


def _check_arguments(depth: int, out_features: Optional[Sequence[str]], frozen_stages: int, output_stride: int,
                     deform_stages: Sequence[str], groups: int, width_per_group: int, base_channels: int,
                     drop_path_rate: float) -> Optional[tuple[str, ...]]:
    """ValueError, with the valid values, for arguments ``ResNet`` cannot build; returns ``out_features`` as a tuple."""
    if depth not in ARCH_SETTINGS:
        raise ValueError(f"depth must be one of {sorted(ARCH_SETTINGS)}, got {depth!r}")
    if out_features is not None:
        out_features = tuple(out_features)
        if not out_features or any(n not in STAGE_NAMES for n in out_features) or list(out_features) != sorted(
            set(out_features), key=STAGE_NAMES.index
        ):
            raise ValueError(
                f"out_features must be None or a non-empty ordered subset of {STAGE_NAMES}, got {out_features!r}"
            )
    if not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= 5:
        raise ValueError(f"frozen_stages must be in 0..5, got {frozen_stages!r}")
    if output_stride not in _OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride!r}")
    bad = [s for s in deform_stages if s not in STAGE_NAMES]
    if bad:
        raise ValueError(f"deform_stages must be names from {STAGE_NAMES}, got {tuple(deform_stages)!r}")
    if groups < 1 or width_per_group < 1 or base_channels < 1:
        raise ValueError(
            f"groups, width_per_group and base_channels must be positive, got {groups}, {width_per_group}, "
            f"{base_channels}"
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    if ARCH_SETTINGS[depth][0] is BasicBlock and (groups != 1 or width_per_group != 64):
        raise ValueError(f"ResNet-{depth} (BasicBlock) supports only groups=1 and width_per_group=64")
    return out_features


def _stem_conv(base_channels: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    """The deep stem's three 3x3 convolutions (ResNet-C), the first with stride 2."""
    stem = base_channels // 2
    return nn.Sequential(
        nn.Conv2d(3, stem, 3, 2, 1, bias=False),
        norm_layer(stem),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem, stem, 3, 1, 1, bias=False),
        norm_layer(stem),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem, base_channels, 3, 1, 1, bias=False),
    )


def _make_stage(block: type[_Block], inplanes: int, planes: int, stride: int, dilations: tuple[int, int],
                drop_rates: Sequence[float], avg_down: bool, norm_layer: Callable[[int], nn.Module],
                **block_options: Any) -> nn.Sequential:
    """One stage: its first block strides (and projects the shortcut), the rest keep the shape.

    ``dilations``: the first block's and the others' (they differ where dilation replaces the stride).
    ``avg_down``: the shortcut average-pools, then projects with a 1x1 conv at stride 1 (ResNet-D).
    """
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        conv = nn.Conv2d(inplanes, planes * block.expansion, 1, 1 if avg_down else stride, bias=False)
        if avg_down and stride != 1:
            parts = [nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False), conv]
        elif avg_down:
            parts = [nn.Identity(), conv]
        else:
            parts = [conv]
        downsample = Downsample(*parts, norm_layer(planes * block.expansion))
    blocks = []
    for j, rate in enumerate(drop_rates):
        blocks.append(block(inplanes if j == 0 else planes * block.expansion, planes,
                            stride=stride if j == 0 else 1, downsample=downsample if j == 0 else None,
                            dilation=dilations[0] if j == 0 else dilations[1], norm_layer=norm_layer,
                            drop_path=rate, **block_options))
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """ResNet classifier or multi-scale feature extractor.

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_classes: classifier outputs (only used when ``out_features`` is None).
        out_features: None for a classifier returning logits, or a subset of ``("c2", "c3", "c4", "c5")`` (in
            order) for an ordered dict of stage outputs at strides 4, 8, 16, 32 (no classifier is built, nor
            stages past the last one requested).
        frozen_stages: 0 freezes nothing, 1 the stem, k >= 2 the stem and c2..ck (5 = everything).
        norm: "BN", "FrozenBN", "SyncBN", "GN" (32 groups) or a ``channels -> nn.Module`` callable.
        norm_eval: keep BatchNorm statistics fixed (eval mode) during ``train()``.
        stride_in_1x1: put the stride on the first 1x1 of a bottleneck (MSRA/caffe style).
        output_stride: 32, 16 (dilates c5) or 8 (dilates c4 and c5), as torchvision's
            ``replace_stride_with_dilation``.
        deep_stem: three 3x3 convolutions instead of the 7x7 (ResNet-C/D).
        avg_down: average-pool before the projection shortcut instead of a strided 1x1 (ResNet-D).
        groups, width_per_group: ResNeXt cardinality and width (wide ResNet: width_per_group=128).
        base_channels: channels of the stem and of c2's 3x3 (64 in the paper); smaller values make tiny models.
        deform_stages: stage names ("c3", ...) whose 3x3 convolutions are deformable (``DeformConv2d``).
        zero_init_residual: zero the last norm of each block so every block starts as identity.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        grad_checkpointing: recompute block activations in backward (same gradients, less memory).

    Example:
        >>> model = ResNet(50, out_features=("c3", "c4", "c5"), norm="FrozenBN", frozen_stages=2)
        >>> model.output_shape()["c5"]
        ShapeSpec(channels=2048, stride=32)
    """

    # Any input size works (the convolutions pad); the FPN over it sets the padding for aligned levels.
    size_divisibility: int = 0

    def __init__(
        self,
        depth: int,
        num_classes: int = 1000,
        out_features: Optional[Sequence[str]] = None,
        *,
        frozen_stages: int = 0,
        norm: NormSpec = "BN",
        norm_eval: bool = False,
        stride_in_1x1: bool = False,
        output_stride: int = 32,
        deep_stem: bool = False,
        avg_down: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        base_channels: int = 64,
        deform_stages: Sequence[str] = (),
        zero_init_residual: bool = False,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        out_features = _check_arguments(depth, out_features, frozen_stages, output_stride, deform_stages, groups,
                                        width_per_group, base_channels, drop_path_rate)
        block, layers = ARCH_SETTINGS[depth]
        norm_layer = build_norm(norm)

        self.depth = depth
        self.out_features = out_features
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.grad_checkpointing = grad_checkpointing
        self.num_classes = num_classes if out_features is None else 0

        # Stem: 7x7/2 conv (or the deep 3x3 stem) + norm + ReLU + 3x3/2 max-pool. Keys as timm's deep stem.
        self.conv1 = _stem_conv(base_channels, norm_layer) if deep_stem else nn.Conv2d(3, base_channels, 7, 2, 3,
                                                                                       bias=False)
        self.bn1 = norm_layer(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = StemMaxPool(3, 2, 1)

        # Stages c2..c5; dilation replaces the stride once the requested output stride is reached.
        num_stages = 4 if out_features is None else STAGE_NAMES.index(out_features[-1]) + 1
        total_blocks = sum(layers[:num_stages])
        drop_rates = [drop_path_rate * k / max(total_blocks - 1, 1) for k in range(total_blocks)]  # linear in depth
        inplanes, dilation, stride_so_far = base_channels, 1, 4
        self._shapes: dict[str, ShapeSpec] = {}
        for i in range(num_stages):
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if stride == 2 and stride_so_far * 2 > output_stride:
                dilation, stride = dilation * 2, 1
            stride_so_far *= stride
            planes = base_channels * 2**i
            rates, drop_rates = drop_rates[:layers[i]], drop_rates[layers[i]:]
            stage = _make_stage(block, inplanes, planes, stride, (previous_dilation, dilation), rates, avg_down,
                                norm_layer, groups=groups, base_width=width_per_group,
                                deform=STAGE_NAMES[i] in deform_stages, stride_in_1x1=stride_in_1x1)
            self.add_module(f"layer{i + 1}", stage)
            inplanes = planes * block.expansion
            self._shapes[STAGE_NAMES[i]] = ShapeSpec(inplanes, stride_so_far)

        if out_features is None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(inplanes, num_classes)

        self._init_weights(zero_init_residual)
        self._freeze()

    # -- construction helpers -------------------------------------------------------------------------
    def _init_weights(self, zero_init_residual: bool) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, DeformConv2d)) and not name.endswith("conv2_offset"):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Block) and getattr(m.last_norm, "weight", None) is not None:
                    nn.init.zeros_(m.last_norm.weight)

    def _frozen_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = []
        if self.frozen_stages >= 1:
            modules += [self.conv1, self.bn1]
        for i in range(1, self.frozen_stages):
            if hasattr(self, f"layer{i}"):
                modules.append(getattr(self, f"layer{i}"))
        return modules

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet":
        """Like ``nn.Module.train``, but frozen stages (and all norms when ``norm_eval``) stay in eval mode."""
        super().train(mode)
        if mode:
            for m in self._frozen_modules():
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # -- public API -----------------------------------------------------------------------------------
    def output_shape(self) -> dict[str, ShapeSpec]:
        """Channels and stride of each returned feature (``{}`` entries only for ``out_features``)."""
        if self.out_features is None:
            return {}
        return {name: self._shapes[name] for name in self.out_features}

    def stage_shapes(self) -> dict[str, ShapeSpec]:
        """Channels and stride of every built stage, requested or not."""
        return dict(self._shapes)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (that of its first convolution's weight)."""
        return next(self.conv1.parameters()).dtype

    def stages(self) -> list[nn.Sequential]:
        """The built stages c2.. in order (``layer1``, ``layer2``, ...)."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self._shapes))]

    def forward(self, x: Tensor) -> Union[Tensor, "OrderedDict[str, Tensor]"]:
        """Logits ``(N, num_classes)`` for a classifier, else an ordered dict of the requested stage outputs."""
        check_image_batch(x, 3, self.compute_dtype(), "ResNet")
        # channels_last from the stem's output on (faster on oneDNN and cuDNN: BENCHMARKS.md, ResNet rows). The
        # stem takes the batch as given: conv_norm writes channels_last anyway.
        x = self.relu(conv_norm(self.conv1, self.bn1, x))
        x = self.maxpool(x)
        features: "OrderedDict[str, Tensor]" = OrderedDict()
        for name, stage in zip(STAGE_NAMES, self.stages()):
            x = self._run_stage(stage, x)
            features[name] = x
        if self.out_features is None:
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return OrderedDict((name, features[name]) for name in self.out_features)

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpoint(
                block, x, use_reentrant=False, context_fn=lambda b=block: (_NoOp(), _KeepRunningStats(b))
            )
        return x


def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3)."""
    return ResNet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3)."""
    return ResNet(101, **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3)."""
    return ResNet(152, **kwargs)


def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., 2017)."""
    return ResNet(50, groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 32x8d."""
    return ResNet(101, groups=32, width_per_group=8, **kwargs)


def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016): bottleneck 3x3 twice as wide."""
    return ResNet(50, width_per_group=128, **kwargs)


FACTORIES = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2)
}
