"""``optimize_for_inference``: an inference-ready copy of any resdet model (folded norms, channels_last, compile, bf16).

What it does, and why each step pays (measured with ``tools/benchmark.py``, numbers in BENCHMARKS.md):

* Folds every convolution + BatchNorm/FrozenBN pair into the convolution's weights and bias, permanently, and
  replaces the norm by ``nn.Identity``: the eager forward no longer rescales the weights on every call
  (``norm.conv_norm`` does that on the fly when the norm is still there), and the compiled graph has no norm.
* Eval mode and channels_last weights: oneDNN's convolutions run NHWC natively on CPU, and a channels_last weight
  makes every convolution choose NHWC even when the input arrives NCHW (e.g. ``TimmBackbone``).
* ``compile=True``: ``torch.compile(fullgraph=True)`` on the backbone (ResNet, FPN, TimmBackbone) or on a detector's
  ``.backbone``; the detector's post-processing (NMS, box decoding, mask pasting) stays eager.
* ``bf16=True``: bfloat16 weights where the device has native bf16 (AMX / AVX512-BF16 on CPU, Ampere+ on GPU),
  with inputs cast at the boundary and outputs returned as float32, so callers are unchanged. For a detector the
  networks run in bfloat16 (backbone + FPN, RPN head, RoI box and mask heads and predictors) and the geometry stays
  float32 (anchors, box decoding, NMS, score thresholds, mask pasting). Without native bf16 (oneDNN then emulates
  it on AVX-512 at a fraction of the float32 speed: BENCHMARKS.md) float32 is kept, with one warning per process.
"""
from __future__ import annotations

import copy
import platform
import warnings
from collections import OrderedDict
from typing import Any, Iterator, Optional

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
    """Whether ``device`` runs bfloat16 convolutions/matmuls natively (not emulated at a loss of speed).

    On x86 CPUs that means AVX512-BF16 or AMX-BF16 instructions. oneDNN also reports bf16 support on plain AVX-512
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), where it emulates bf16 at a fraction of float32's speed
    (BENCHMARKS.md, "bf16 without native support"); that does not count. Other CPU architectures: oneDNN's answer.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    native = _x86_bf16_instructions()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) if native is None else native


def _x86_bf16_instructions() -> Optional[bool]:
    """Whether an x86 CPU has AVX512-BF16 or AMX-BF16; None on other architectures."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        capabilities = get_capabilities()
        if "avx512_bf16" in capabilities or "amx_bf16" in capabilities:  # reported on x86 only
            return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
        return None
    if platform.machine().lower() in ("x86_64", "amd64"):  # torch before get_capabilities
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return None


# ``bf16=True`` without native support warns once per process, not on every call (tools call it per model).
_warned_no_bf16 = False


def _warn_no_bf16(device: torch.device) -> None:
    global _warned_no_bf16
    if not _warned_no_bf16:
        _warned_no_bf16 = True
        warnings.warn(
            f"bf16=True ignored: {device} has no native bfloat16 support (emulated bf16 would be slower); keeping "
            "float32. This warning is shown once per process.",
            stacklevel=3,
        )


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


class _DtypeBoundary:
    """A module's instance ``forward``: floating inputs cast to ``compute``, outputs to ``output`` (None: as is).

    An instance ``forward`` rather than forward hooks, because ``torch.compile`` traces hooks as separate graphs;
    this keeps the compiled backbone one graph. A plain object holding the module (not a closure), so that
    ``copy.deepcopy`` of the model rebinds it to the copy.
    """

    def __init__(self, module: nn.Module, compute: torch.dtype, output: Optional[torch.dtype]) -> None:
        self.module = module
        self.compute = compute
        self.output = output

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = _to_dtype(args, self.compute), _to_dtype(kwargs, self.compute)
        out = type(self.module).forward(self.module, *args, **kwargs)
        return out if self.output is None else _to_dtype(out, self.output)


def _to_bf16(module: nn.Module, output: Optional[torch.dtype] = torch.float32) -> None:
    """bfloat16 weights and inputs; outputs cast to ``output`` (float32 by default, so callers are unchanged)."""
    module.to(torch.bfloat16)
    module.forward = _DtypeBoundary(module, torch.bfloat16, output)


class _Float32Anchors:
    """An anchor generator's instance ``forward`` that sees float32 stand-ins for bfloat16 feature maps.

    torchvision's ``AnchorGenerator`` takes the anchors' dtype from the feature maps and reads nothing else from
    them but their shapes and device; the stand-ins are zero-stride expansions of one float32 zero (same shapes,
    no copy), so anchors and the proposals decoded from them stay float32.
    """

    def __init__(self, generator: nn.Module) -> None:
        self.generator = generator

    def __call__(self, image_list: Any, feature_maps: list[Tensor]) -> Any:
        stand_ins = [f.new_zeros((), dtype=torch.float32).expand(f.shape) for f in feature_maps]
        return type(self.generator).forward(self.generator, image_list, stand_ins)


# RoI poolers known to pool bfloat16 maps directly (``heads.ops``' sparse RoIAlign); any other pooler (e.g.
# torchvision's, whose CPU kernel rejects bfloat16 maps with float32 boxes) is given float32 maps.
_BF16_POOL_MODULES = ("heads.ops",)


def _detector_to_bf16(model: nn.Module) -> None:
    """The networks of a torchvision-style detector in bfloat16, its geometry in float32.

    bfloat16: the backbone (its features stay bfloat16, no float32 copy of the pyramid), the RPN head, and the RoI
    heads' box/mask/keypoint head + predictor, whose outputs (logits, deltas, mask logits) are cast to float32.
    float32: anchors, box decoding, NMS, score thresholds, mask pasting, i.e. everything that decides which
    detections survive, so detections stay stable. RoIAlign pools the bfloat16 maps into bfloat16 features: faster
    than pooling a float32 copy of the pyramid, and than pooling float32 maps (BENCHMARKS.md, design measurements).
    """
    _to_bf16(model.backbone, output=None)
    _to_bf16(model.rpn.head)
    model.rpn.anchor_generator.forward = _Float32Anchors(model.rpn.anchor_generator)
    roi_heads = model.roi_heads
    for branch in ("box", "mask", "keypoint"):
        head = getattr(roi_heads, f"{branch}_head", None)
        predictor = getattr(roi_heads, f"{branch}_predictor", None)
        if head is None or predictor is None:
            continue
        _to_bf16(head, output=None)
        _to_bf16(predictor)
        pool = getattr(roi_heads, f"{branch}_roi_pool", None)
        if pool is not None and not type(pool).__module__.startswith(_BF16_POOL_MODULES):
            pool.forward = _DtypeBoundary(pool, torch.float32, None)


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
        bf16: run the networks in bfloat16 if the model's device supports it natively (``bf16_supported``; without
            it float32 is kept, and the first such call in the process warns). A detector's backbone, RPN head and
            RoI heads run in bfloat16 while anchors, box decoding, NMS, thresholds and mask pasting stay float32.
            Outputs are still float32.

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

    detector = _is_detector(model)
    backbone = model.backbone if detector else model
    if bf16:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if not bf16_supported(device):
            _warn_no_bf16(device)
        elif detector:
            _detector_to_bf16(model)
        else:
            _to_bf16(backbone)
    if compile:
        backbone.forward = _FrozenCompiled(backbone.forward)
    return model
