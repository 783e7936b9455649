"""resdet backbones: ResNet family as classifier or multi-scale feature extractor, FPN, timm models, weights."""
from .fpn import FPN, LastLevelMaxPool, LastLevelP6P7, TopBlock
from .norm import FrozenBatchNorm2d
from .optimize import BF16_TOLERANCE, bf16_supported, fold_norms_, optimize_for_inference
from .resnet import (
    ARCH_SETTINGS,
    FACTORIES,
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    wide_resnet50_2,
)
from .shape_spec import Backbone, ShapeSpec
from .timm_backbone import TimmBackbone
from .weights import KeyReport, LoadResult, UnsafeCheckpointError, compare_state_dicts, load_weights, read_checkpoint

__all__ = [
    "ARCH_SETTINGS",
    "BF16_TOLERANCE",
    "FACTORIES",
    "Backbone",
    "BasicBlock",
    "Bottleneck",
    "FPN",
    "FrozenBatchNorm2d",
    "KeyReport",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "LoadResult",
    "ResNet",
    "ShapeSpec",
    "TimmBackbone",
    "TopBlock",
    "UnsafeCheckpointError",
    "bf16_supported",
    "compare_state_dicts",
    "fold_norms_",
    "load_weights",
    "optimize_for_inference",
    "read_checkpoint",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
]
