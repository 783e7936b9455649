"""Normalisation layers and the conv + norm fold used by every block."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["FrozenBatchNorm2d", "NORM_LAYERS", "NormSpec", "build_norm", "affine_of", "conv_norm", "fold_conv_norm_"]


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


# The one place where config strings become layer classes; inside the library a callable is passed around.
NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "BN": nn.BatchNorm2d,
    "FrozenBN": FrozenBatchNorm2d,
    "SyncBN": nn.SyncBatchNorm,
    "GN": _group_norm,
}

NormSpec = Union[str, Callable[[int], nn.Module]]


def build_norm(norm: NormSpec) -> Callable[[int], nn.Module]:
    """Turn a norm name ("BN", "FrozenBN", "SyncBN", "GN") or a ``channels -> module`` callable into a callable."""
    if callable(norm):
        return norm
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm must be one of {sorted(NORM_LAYERS)} or a callable, got {norm!r}")
    return NORM_LAYERS[norm]


def affine_of(norm: nn.Module) -> Optional[tuple[Tensor, Tensor]]:
    """``(scale, shift)`` with ``norm(x) == x * scale + shift`` per channel, or None when the norm depends on the batch.

    FrozenBN is always affine; BatchNorm/SyncBN are affine in eval mode (running statistics).
    """
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        return scale, norm.bias - norm.running_mean * scale
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.running_var is not None:
        scale = (norm.running_var + norm.eps).rsqrt()
        shift = -norm.running_mean * scale
        if norm.affine:
            scale = scale * norm.weight
            shift = shift * norm.weight + norm.bias
        return scale, shift
    return None


# torch.export traces sizes as symbols, on which a size-dependent choice would become a guard (torch < 2.5: no export).
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def conv_norm(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``, with an affine norm folded into the convolution's weights when that is less work.

    Folding turns conv + norm into one convolution with a bias: one pass over the activations instead of two,
    which is what makes FrozenBN fine-tuning and eval-mode inference cheaper (see BENCHMARKS.md). It rescales the
    weight instead, so it pays when the output is larger than the weight: always at detection resolutions, but not
    for the deep stages on small inputs (ResNet-18's c5 on a 256 px image: 2.4M weights, 0.13M outputs), where the
    norm runs on the activations and training does not keep a rescaled weight copy for the backward. Numerically
    both equal the two-step form up to float rounding. ``conv`` may be an ``nn.Sequential`` (deep stem) whose last
    layer is the convolution to fold into.
    """
    if isinstance(conv, nn.Sequential):
        x = conv[:-1](x.contiguous(memory_format=torch.channels_last))
        conv = conv[-1]
    if type(conv) is not nn.Conv2d:
        return norm(conv(x))
    affine = affine_of(norm)
    # Under export the sizes are symbols: fold, the large-input case, instead of guarding on them.
    if affine is None or (not _exporting() and _output_numel(conv, x) < conv.weight.numel()):
        return norm(conv._conv_forward(x, _channels_last_like(conv.weight, x), conv.bias))
    scale, shift = affine
    bias = shift if conv.bias is None else conv.bias * scale + shift
    if torch.is_grad_enabled() and (conv.weight.requires_grad or scale.requires_grad) and not isinstance(
        conv.padding, str
    ):
        return _ScaledWeightConv.apply(x, conv.weight, scale, bias, conv.stride, conv.padding, conv.dilation,
                                       conv.groups)
    return F.conv2d(x, _scaled_weight(conv.weight, scale, x), bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def _channels_last_like(weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` in channels_last when ``x`` is not (a network's input batch), so that the convolution writes a
    channels_last output anyway: oneDNN and cuDNN convert ``x`` inside the call, and autograd keeps the caller's
    ``x`` for the weight gradient instead of a converted copy (9.6 MB at batch 16, 224 px)."""
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return weight.contiguous(memory_format=torch.channels_last)
    return weight


def _scaled_weight(weight: Tensor, scale: Tensor, x: Tensor) -> Tensor:
    return _channels_last_like(weight * scale.reshape(-1, 1, 1, 1), x)


class _ScaledWeightConv(torch.autograd.Function):
    """``conv2d(x, weight * scale[:, None, None, None], bias)`` that keeps ``weight`` for the backward, not the
    rescaled copy (autograd through the product would save that copy: for R50-FPN fine-tuning at 2 x 512 px, about
    40 MB of weights on top of torchvision's peak). The backward rescales again, which costs a weight-sized product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor, stride, padding, dilation,
                groups: int) -> Tensor:
        ctx.save_for_backward(x, weight, scale)
        ctx.options = (stride, padding, dilation, groups)
        ctx.dtypes = (x.dtype, bias.dtype)
        return F.conv2d(x, _scaled_weight(weight, scale, x), bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.options
        needs_x, needs_weight, needs_scale, needs_bias = ctx.needs_input_grad[:4]
        # Under autocast the forward convolution ran in the autocast dtype (grad's): so does its backward, as
        # autocast's own convolution backward would, and each gradient returns in its input's dtype.
        compute = grad.dtype
        grad_x, grad_scaled, grad_bias = torch.ops.aten.convolution_backward(
            grad, x.to(compute), _scaled_weight(weight, scale, x).to(compute), [grad.shape[1]], stride, padding,
            dilation, False, [0, 0], groups, [needs_x, needs_weight or needs_scale, needs_bias],
        )
        x_dtype, bias_dtype = ctx.dtypes
        grad_weight = grad_scale = None
        if needs_weight or needs_scale:
            grad_scaled = grad_scaled.to(weight.dtype)
        if needs_weight:
            grad_weight = grad_scaled * scale.reshape(-1, 1, 1, 1)
        if needs_scale:
            grad_scale = (grad_scaled * weight).sum(dim=(1, 2, 3))
        grad_x = None if grad_x is None else grad_x.to(x_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias_dtype)
        return grad_x, grad_weight, grad_scale, grad_bias, None, None, None, None


def _output_numel(conv: nn.Conv2d, x: Tensor) -> int:
    """Elements of ``conv(x)``, for the "same"-padded convolutions of ResNets and FPNs (ceil(size / stride))."""
    height, width = x.shape[-2:]
    stride_h, stride_w = conv.stride
    return x.shape[0] * conv.out_channels * (-(-height // stride_h)) * (-(-width // stride_w))


@torch.no_grad()
def fold_conv_norm_(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Fold an affine ``norm`` into ``conv`` in place (the caller replaces ``norm`` by Identity). Returns success."""
    affine = affine_of(norm)
    if affine is None or type(conv) is not nn.Conv2d:
        return False
    scale, shift = affine
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.bias = nn.Parameter(bias.clone(), requires_grad=conv.weight.requires_grad)
    return True
