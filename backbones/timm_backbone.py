"""Any timm model as a multi-scale backbone with the same ``output_shape()`` contract as ``ResNet``."""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import timm
from torch import Tensor, nn

from .shape_spec import ShapeSpec, check_image_batch
from .weights import read_checkpoint

__all__ = ["TimmBackbone"]


class TimmBackbone(nn.Module):
    """A timm model created with ``features_only=True``, its features renamed by stride (4 -> "c2" ... 32 -> "c5").

    Args:
        model_name: any timm model name (``"convnext_tiny"``, ``"resnet50d"``, ``"regnety_032"``, ...).
        out_features: the features to return, named ``c{log2(stride)}``.
        checkpoint: optional ImageNet weights for the model (path or state dict), read without unpickling
            arbitrary objects and loaded by timm's own loader (which adapts the classifier); nothing is downloaded.
        **timm_kwargs: passed to ``timm.create_model`` (``pretrained`` is not accepted: weights are explicit).

    Example:
        >>> backbone = TimmBackbone("convnext_tiny", out_features=("c3", "c4", "c5"))
        >>> backbone.output_shape()["c5"].channels
        768
    """

    # No padding requirement of its own (models with a fixed input size check it themselves); the FPN over it
    # sets the padding for aligned levels.
    size_divisibility: int = 0

    def __init__(
        self,
        model_name: str,
        out_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        checkpoint: Optional[Union[str, Path, Mapping[str, Any]]] = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if "pretrained" in timm_kwargs:
            raise ValueError("pass weights with checkpoint=...; TimmBackbone never downloads (pretrained=)")
        if not timm.is_model(model_name):
            raise ValueError(f"unknown timm model {model_name!r}; see timm.list_models()")
        load = {}
        if checkpoint is not None:
            load = dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=read_checkpoint(checkpoint)))
        model = timm.create_model(model_name, features_only=True, **load, **timm_kwargs)
        names = {f"c{int(math.log2(r))}": i for i, r in enumerate(model.feature_info.reduction())}
        out_features = tuple(out_features)
        missing = [f for f in out_features if f not in names]
        if not out_features or missing:
            raise ValueError(f"{model_name} provides features {tuple(names)}, got out_features={out_features}")
        indices = tuple(model.feature_info.out_indices[names[f]] for f in out_features)
        if indices != tuple(model.feature_info.out_indices):
            # Rebuild with only the requested levels so that no unused stage is kept (DDP would complain).
            model = timm.create_model(model_name, features_only=True, out_indices=indices, **load, **timm_kwargs)
        self.model = model
        self.out_features = out_features
        self.in_chans = timm_kwargs.get("in_chans", 3)
        info = model.feature_info
        self._shapes = {
            name: ShapeSpec(c, r) for name, c, r in zip(out_features, info.channels(), info.reduction())
        }

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{"c2": ShapeSpec(channels, 4), ...}`` for the returned features."""
        return dict(self._shapes)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        """Image batch ``(N, C, H, W)`` -> ordered dict of the requested features."""
        first = next(self.model.parameters())
        check_image_batch(x, self.in_chans, first.dtype, "TimmBackbone")
        return OrderedDict(zip(self.out_features, self.model(x)))
