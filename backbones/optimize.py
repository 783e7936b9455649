"""``optimize_for_inference``: an inference-ready copy of any resdet model (folded norms, channels_last, compile, bf16).

What it does, and why each step pays (measured with ``tools/benchmark.py``, numbers in BENCHMARKS.md):

* Folds every convolution + BatchNorm/FrozenBN pair into the convolution's weights and bias, permanently, and
  replaces the norm by ``nn.Identity``: the eager forward no longer rescales the weights on every call
  (``norm.conv_norm`` does that on the fly when the norm is still there), and the compiled graph has no norm.
* Eval mode and channels_last weights: oneDNN's convolutions run NHWC natively on CPU, and a channels_last weight
  makes every convolution choose NHWC even when the input arrives NCHW (e.g. ``TimmBackbone``).
* ``compile=True``: ``torch.compile(fullgraph=True)`` on the backbone (ResNet, FPN, TimmBackbone) or on a detector's
  ``.backbone``; the detector's post-processing (NMS, box decoding, mask pasting) stays eager.
* ``bf16=True``: bfloat16 weights in the backbone where the device has native bf16 (AMX / AVX512-BF16 on CPU,
  Ampere+ on GPU), with inputs cast at its boundary and outputs returned as float32, so callers are unchanged.
  The detector heads (box decoding, NMS, RoIAlign) stay float32.
"""
from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .norm import FrozenBatchNorm2d, affine_of, fold_conv_norm_

__all__ = ["optimize_for_inference", "fold_norms_", "bf16_supported", "BF16_TOLERANCE"]

# Documented accuracy of ``bf16=True``: max |bf16 - fp32| over the output, relative to max |fp32| (bf16 keeps 8
# mantissa bits, ~0.4% per rounding; errors partly cancel over a network). Checked by tests/test_optimize.py.
BF16_TOLERANCE = 0.05

_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
# Modules whose ``convK`` -> ``bnK`` children are known to be applied in that order (post-activation ResNets); a
# pre-activation design may name its norms the same way and apply them before the convolution.
_RESNET_MODULES = ("backbones.resnet", "torchvision.models.resnet", "timm.models.resnet")


def _sequential_containers() -> tuple[type, ...]:
    """Container types whose forward applies their children in registration order (so a (conv, norm) pair of
    neighbours is ``norm(conv(x))``)."""
    types: list[type] = []
    try:  # timm's features_only wrapper runs its children in order, like nn.Sequential
        from timm.models._features import FeatureDictNet, FeatureListNet

        types += [FeatureDictNet, FeatureListNet]
    except ImportError:  # pragma: no cover - timm is a dependency, but older layouts differ
        pass
    return tuple(types)


def _is_sequential(module: nn.Module) -> bool:
    if isinstance(module, nn.Sequential):
        # A subclass with its own forward may not chain its children (our Downsample and FPN ConvNorm do: they
        # call ``conv_norm(conv, norm)`` on their last two children, which is the same thing).
        own = type(module).forward
        return own is nn.Sequential.forward or type(module).__name__ in ("Downsample", "ConvNorm")
    return isinstance(module, _sequential_containers())


def _last_conv(module: nn.Module) -> nn.Module:
    """The convolution whose output a following norm sees: the module itself, or a deep stem's last layer."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


def _norm_replacement(norm: nn.Module) -> nn.Module:
    """What stands in for a folded norm: Identity, or the activation of a fused norm+act layer (timm's
    ``BatchNormAct2d``), which must survive the fold."""
    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module) and type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d):
        return act
    return nn.Identity()


def _pairs(module: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """``(parent, conv_name, norm_name)`` for every conv followed directly by a norm that we know how to read.

    Two patterns: neighbours in a sequential container (FPN/heads ``Conv2dNormActivation``, ``Downsample``, the
    deep stem, timm's feature wrapper), and the ResNet naming ``convK`` -> ``bnK`` inside a block or the stem
    (ours, torchvision's and timm's blocks all apply ``bnK`` straight to ``convK``'s output).
    """
    for parent in module.modules():
        children = list(parent.named_children())
        if _is_sequential(parent):
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(norm, _NORMS) and isinstance(_last_conv(conv), nn.Conv2d):
                    yield parent, conv_name, norm_name
            continue
        if not type(parent).__module__.startswith(_RESNET_MODULES):
            continue
        names = dict(children)
        for name, norm in children:
            if name.startswith("bn") and isinstance(norm, _NORMS) and f"conv{name[2:]}" in names:
                if isinstance(_last_conv(names[f"conv{name[2:]}"]), nn.Conv2d):
                    yield parent, f"conv{name[2:]}", name


@torch.no_grad()
def fold_norms_(model: nn.Module) -> int:
    """Fold every affine norm (FrozenBN, eval-mode BatchNorm) into the convolution before it, in place.

    Each folded norm is replaced by ``nn.Identity`` (or by its activation, for timm's fused norm+act layers).
    Norms that depend on the batch (train-mode BN, GroupNorm) and convolutions of other types (deformable) are
    left alone. Returns the number of folded pairs.
    """
    folded = 0
    for parent, conv_name, norm_name in list(_pairs(model)):
        conv = _last_conv(getattr(parent, conv_name))
        norm = getattr(parent, norm_name)
        if affine_of(norm) is None or type(conv) is not nn.Conv2d:
            continue
        fold_conv_norm_(conv, norm)
        setattr(parent, norm_name, _norm_replacement(norm))
        folded += 1
    return folded


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions/matmuls natively (not emulated at a loss of speed)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Cast floating tensors inside tensors, lists, tuples and (ordered) dicts."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, OrderedDict):  # the container classes are named, not ``type(value)``: dynamo traces those
        return OrderedDict([(k, _to_dtype(v, dtype)) for k, v in value.items()])
    if isinstance(value, dict):
        return {k: _to_dtype(v, dtype) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_dtype(v, dtype) for v in value)
    if isinstance(value, list):
        return [_to_dtype(v, dtype) for v in value]
    return value


class _Bfloat16Boundary:
    """A bf16 module's instance ``forward``: float32 in, bfloat16 compute, float32 out.

    An instance ``forward`` rather than forward hooks, because ``torch.compile`` traces hooks as separate graphs;
    this keeps the compiled backbone one graph. A plain object holding the module (not a closure), so that
    ``copy.deepcopy`` of the model rebinds it to the copy.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _to_dtype(args, torch.bfloat16), _to_dtype(kwargs, torch.bfloat16)
        return _to_dtype(type(self.module).forward(self.module, *args, **kwargs), torch.float32)


def _to_bf16(module: nn.Module) -> None:
    """bfloat16 weights, with float32 in and out, so the callers are unchanged."""
    module.to(torch.bfloat16)
    module.forward = _Bfloat16Boundary(module)


class _FrozenCompiled:
    """A module's instance ``forward``: ``torch.compile(forward, fullgraph=True)``, traced with inductor's freezing.

    fullgraph: the backbone must compile to one graph; a break would silently fall back to slow eager pieces.
    freezing: weights become constants, so inductor prepacks them for oneDNN and fuses conv + bias + ReLU + residual
    add into one call (ResNet-50, batch 16, 2 CPU cores: 21.5 img/s against 20.2 without it). Dynamo reads
    ``torch._inductor.config.freezing`` itself when it traces, so ``torch.compile(options={"freezing": True})`` is
    not enough (torch 2.14: the option reaches inductor but the weights stay graph inputs and nothing is frozen);
    the global flag is set for the duration of each call instead, leaving the user's process settings alone.
    Freezing applies only to graphs traced without autograd, so each call runs under ``torch.no_grad()``: the
    compiled copy is for inference and its weights are constants anyway.
    """

    def __init__(self, forward: Any) -> None:
        self.compiled = torch.compile(forward, fullgraph=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch._inductor import config  # imported on use: importing backbones stays light

        with config.patch(freezing=True), torch.no_grad():
            return self.compiled(*args, **kwargs)


def _is_detector(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("backbone", "rpn", "roi_heads", "transform"))


def optimize_for_inference(model: nn.Module, *, compile: bool = False, bf16: bool = False) -> nn.Module:
    """An inference-ready copy of ``model`` (``ResNet``, ``FPN``, ``TimmBackbone`` or a ``heads`` detector).

    The copy is in eval mode, has every conv + BatchNorm/FrozenBN pair folded into the convolution, and keeps its
    weights channels_last. The original model is not modified. Outputs equal the original's (in eval mode) up to
    float rounding; with ``bf16=True`` within ``BF16_TOLERANCE`` relative to the largest output.

    Args:
        model: the model to optimise.
        compile: compile the backbone (for a detector: ``model.backbone``) with ``torch.compile(fullgraph=True)``.
            Inductor's ``freezing`` is on: the compiled copy treats its weights as constants (do not modify them
            afterwards). The first call per input shape pays the compilation.
        bf16: run the backbone in bfloat16 if the model's device supports it natively (a warning otherwise, and
            float32 is kept). Outputs are still float32.

    Example:
        >>> fast = optimize_for_inference(resnet50().eval(), compile=True)
        >>> with torch.inference_mode():
        ...     logits = fast(images)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fold_norms_(model)
    model.to(memory_format=torch.channels_last)

    backbone = model.backbone if _is_detector(model) else model
    if bf16:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if bf16_supported(device):
            _to_bf16(backbone)
        else:
            warnings.warn(f"bf16=True ignored: {device} has no native bfloat16 support; keeping float32")
    if compile:
        backbone.forward = _FrozenCompiled(backbone.forward)
    return model
