"""Caffe2 ImageNet weights (Detectron's and detectron2's ``R-50.pkl``, ``R-101.pkl``, ``X-101-32x8d.pkl``, ...).

These files name blobs the Caffe2 way: ``conv1_w``, ``res_conv1_bn_s``, ``res2_0_branch2a_w``,
``res2_0_branch2a_bn_s``/``_bn_b``, ``res2_0_branch1_w`` (the projection shortcut), ``fc1000_w``/``pred_w``. This module
maps them to ``ResNet``'s torchvision names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``)
with the same results as detectron2's own conversion (``detectron2/checkpoint/c2_model_loading.py``):

- Norms: ``_bn_s``/``_bn_b`` (Detectron's affine-only BN, the statistics folded into the scale and bias),
  ``_bn_gamma``/``_bn_beta``/``_bn_running_mean``/``_bn_running_var`` and ``_bn_rm``/``_bn_riv`` (detectron2's copies
  that keep BN unfolded; ``riv`` is read as the variance, as detectron2 does), ``_gn_s``/``_gn_b`` (GroupNorm models).
  An affine-only norm gets ``running_mean = 0`` and ``running_var = 1``, which is what detectron2's
  ``FrozenBatchNorm2d._load_from_state_dict`` fills in: with ``eps = 1e-5`` each norm then computes
  ``x * scale / sqrt(1 + 1e-5) + bias``, a relative 5e-6 off Caffe2's ``AffineChannel``, exactly as detectron2.
- Conv biases: Caffe2 convolutions always carry one (Detectron's conversion adds zeros); the ResNet's convolutions
  have none, and like detectron2 and Detectron (whose stem is built ``no_bias``) the loader leaves them out, with a
  warning if one is not zero.
- ``_momentum`` blobs (SGD state) are dropped, as detectron2 does.

Where the stride sits is not recorded in the files: MSRA's R-50/R-101 put it on the first 1x1 convolution
(``stride_in_1x1=True``, detectron2's ``MODEL.RESNETS.STRIDE_IN_1X1``), FAIR's ResNeXts and the GroupNorm models on
the 3x3. Loading warns when the model does not follow that rule, since its features would then differ.
"""
from __future__ import annotations

import logging
import re
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .resnet import Bottleneck, Downsample, ResNet

__all__ = ["Caffe2Weights", "caffe2_to_resnet_name", "convert_caffe2_state", "is_caffe2_state", "resnet_to_caffe2_name"]

logger = logging.getLogger(__name__)

# Caffe2 parameter suffix -> torchvision parameter name.
_CONV_PARAMS = {"w": "weight", "b": "bias"}
_NORM_PARAMS = {
    "bn_s": "weight",
    "bn_b": "bias",
    "bn_gamma": "weight",
    "bn_beta": "bias",
    "bn_rm": "running_mean",
    "bn_running_mean": "running_mean",
    "bn_riv": "running_var",
    "bn_running_var": "running_var",
    "gn_s": "weight",
    "gn_b": "bias",
}
# Caffe2 block branch -> (convolution, norm) in a torchvision block.
_BRANCHES = {
    "2a": ("conv1", "bn1"),
    "2b": ("conv2", "bn2"),
    "2c": ("conv3", "bn3"),
    "1": ("downsample.0", "downsample.1"),
}

_C2_BLOCK = re.compile(r"res(?P<stage>[2-5])_(?P<block>\d+)_branch(?P<branch>1|2a|2b|2c)_(?P<param>\w+)")
_C2_STEM_CONV = re.compile(r"conv1_(?P<param>[wb])")
_C2_STEM_NORM = re.compile(r"res_conv1_(?P<param>\w+)")
_C2_CLASSIFIER = re.compile(r"(?:fc1000|pred)_(?P<param>[wb])")

_TV_BLOCK = re.compile(
    r"layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<module>conv[1-3]|bn[1-3]|downsample\.[01])\.(?P<param>\w+)"
)
_TV_CONV_BIAS = re.compile(r"(?:conv1|layer[1-4]\.\d+\.(?:conv[1-3]|downsample\.0))\.bias")


def caffe2_to_resnet_name(blob: str) -> Optional[str]:
    """The ``ResNet`` key of a Caffe2 blob (``res2_0_branch2a_bn_s`` -> ``layer1.0.bn1.weight``), or None.

    Example:
        >>> caffe2_to_resnet_name("res3_1_branch1_w")
        'layer2.1.downsample.0.weight'
    """
    match = _C2_BLOCK.fullmatch(blob)
    if match:
        conv, norm = _BRANCHES[match["branch"]]
        prefix = f"layer{int(match['stage']) - 1}.{int(match['block'])}."
        return _param_key(prefix, conv, norm, match["param"])
    match = _C2_STEM_CONV.fullmatch(blob)
    if match:
        return f"conv1.{_CONV_PARAMS[match['param']]}"
    match = _C2_STEM_NORM.fullmatch(blob)
    if match and match["param"] in _NORM_PARAMS:
        return f"bn1.{_NORM_PARAMS[match['param']]}"
    match = _C2_CLASSIFIER.fullmatch(blob)
    if match:
        return f"fc.{_CONV_PARAMS[match['param']]}"
    return None


def _param_key(prefix: str, conv: str, norm: str, param: str) -> Optional[str]:
    if param in _CONV_PARAMS:
        return f"{prefix}{conv}.{_CONV_PARAMS[param]}"
    if param in _NORM_PARAMS:
        return f"{prefix}{norm}.{_NORM_PARAMS[param]}"
    return None


def resnet_to_caffe2_name(key: str, norm: str = "bn") -> Optional[str]:
    """The Caffe2 blob a ``ResNet`` key is read from (``layer1.0.bn1.weight`` -> ``res2_0_branch2a_bn_s``), or None.

    Args:
        key: a ``ResNet`` state-dict key.
        norm: ``"bn"`` or ``"gn"``: the norm blobs' infix (``_bn_s`` or ``_gn_s``).
    """
    if norm not in ("bn", "gn"):
        raise ValueError(f"norm must be 'bn' or 'gn', got {norm!r}")
    norm_params = {"weight": f"{norm}_s", "bias": f"{norm}_b", "running_mean": "bn_rm", "running_var": "bn_riv"}
    module, _, param = key.rpartition(".")
    match = _TV_BLOCK.fullmatch(key)
    if match:
        branch = {"conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c"}.get(
            match["module"], "1"
        )
        is_conv = match["module"].startswith("conv") or match["module"] == "downsample.0"
        suffix = {"weight": "w", "bias": "b"}.get(param) if is_conv else norm_params.get(param)
        if suffix is None:
            return None
        return f"res{int(match['stage']) + 1}_{int(match['block'])}_branch{branch}_{suffix}"
    if module == "conv1" and param in ("weight", "bias"):
        return f"conv1_{param[0]}"
    if module == "bn1" and param in norm_params:
        return f"res_conv1_{norm_params[param]}"
    if module == "fc" and param in ("weight", "bias"):
        return f"fc1000_{param[0]}"
    return None


def is_caffe2_state(state: Mapping[str, object]) -> bool:
    """Whether a state dict's keys are Caffe2 ResNet blob names (torchvision's and timm's never are: they hold dots)."""
    return any(caffe2_to_resnet_name(key) is not None for key in state)


class Caffe2Weights(NamedTuple):
    """A Caffe2 state dict renamed for a ``ResNet``.

    Attributes:
        state: the weights under ``ResNet`` keys (norm statistics filled in where the file has none); blobs that map
            to no ``ResNet`` key keep their names.
        blob_names: ``ResNet`` key -> the blob it was read from.
        display_names: ``ResNet`` key -> ``"blob (key)"``, for messages, also for keys the file lacks.
        skipped: blobs left out on purpose (conv biases the model has no place for).
    """

    state: dict[str, Tensor]
    blob_names: dict[str, str]
    display_names: dict[str, str]
    skipped: list[str]


def convert_caffe2_state(model: ResNet, blobs: Mapping[str, Tensor], source: str = "checkpoint") -> Caffe2Weights:
    """Rename a Caffe2 ResNet's blobs for ``model``, as detectron2 reads them (see the module docstring).

    Args:
        model: the ``ResNet`` to load into: 7x7 stem and strided 1x1 shortcuts (no ``deep_stem``/``avg_down``).
        blobs: the file's blobs as tensors (``backbones.read_checkpoint`` of the ``.pkl``).
        source: the file, for messages.

    Raises:
        ValueError: the model's stem or shortcuts have no Caffe2 counterpart, or two blobs give the same key.
    """
    if isinstance(model.conv1, nn.Sequential) or any(
        isinstance(m, Downsample) and len(m) > 2 for m in model.modules()
    ):
        raise ValueError(
            f"{source}: Caffe2 ResNets have the 7x7 stem and strided 1x1 shortcuts; build the model with "
            "deep_stem=False and avg_down=False"
        )
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    blob_names: dict[str, str] = {}
    for blob, value in blobs.items():
        if blob.endswith("_momentum"):  # SGD momentum saved beside the weights by Caffe2 training
            continue
        key = caffe2_to_resnet_name(blob) or blob
        if key in blob_names:
            raise ValueError(f"{source}: blobs {blob_names[key]} and {blob} both hold {key}")
        state[key], blob_names[key] = value, blob

    biases = [key for key in state if _TV_CONV_BIAS.fullmatch(key) and key not in own]
    nonzero = [blob_names[key] for key in biases if bool(state[key].any())]
    if nonzero:
        logger.warning(
            "%s: leaving out convolution biases that are not zero (%s): the ResNet's convolutions have none, and "
            "detectron2 and Detectron ignore them too",
            source,
            ", ".join(nonzero),
        )
    for key in biases:
        del state[key]

    # Affine-only norms (Detectron's folded BN): the statistics detectron2's FrozenBatchNorm2d fills in. Only when
    # the file has no statistics at all, so that one missing from a file of unfolded BN is reported.
    if not any(key.endswith((".running_mean", ".running_var")) for key in state):
        for key, value in own.items():
            if key.endswith(".running_mean"):
                state[key] = torch.zeros_like(value)
                state[key[: -len("mean")] + "var"] = torch.ones_like(value)

    norm = "gn" if any(isinstance(m, nn.GroupNorm) for m in model.modules()) else "bn"
    display_names = {key: f"{blob} ({key})" for key, blob in blob_names.items() if blob != key}
    for key in own:
        if key not in state and key not in display_names:
            blob = resnet_to_caffe2_name(key, norm)
            if blob is not None:
                display_names[key] = f"{blob} ({key})"
    _warn_if_stride_differs(model, blobs, source)
    return Caffe2Weights(state, blob_names, display_names, [blob_names[key] for key in biases])


def _stride_in_1x1(model: ResNet) -> Optional[bool]:
    """Where the model's bottlenecks stride: True on the first 1x1, False on the 3x3, None when it cannot matter."""
    for stage in model.stages()[1:]:
        block = stage[0]
        if not isinstance(block, Bottleneck):
            return None
        if block.conv1.stride != (1, 1):
            return True
        if block.conv2.stride != (1, 1):
            return False
    return None


def _warn_if_stride_differs(model: ResNet, blobs: Mapping[str, Tensor], source: str) -> None:
    """Warn when the model strides where the file's kind of network did not (the files do not record it)."""
    in_1x1 = _stride_in_1x1(model)
    if in_1x1 is None:
        return
    batch_norm = any("_bn_" in blob for blob in blobs)
    msra = batch_norm and model.layer1[0].conv2.groups == 1
    if msra and not in_1x1:
        logger.warning(
            "%s: MSRA's Caffe2 ResNets (R-50.pkl, R-101.pkl) stride on the first 1x1 convolution of a block, this "
            "model on the 3x3, so its features will not match: build it with stride_in_1x1=True (detectron2's "
            "MODEL.RESNETS.STRIDE_IN_1X1), unless this file was trained otherwise",
            source,
        )
    elif not msra and in_1x1:
        logger.warning(
            "%s: Caffe2 ResNeXts and GroupNorm ResNets (X-101-32x8d.pkl, R-50-GN.pkl) stride on the 3x3 "
            "convolution of a block, this model on the first 1x1, so its features will not match: build it with "
            "stride_in_1x1=False, unless this file was trained otherwise",
            source,
        )
