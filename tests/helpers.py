"""Shared test utilities: reference models with non-trivial normalisation statistics."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm/FrozenBatchNorm random statistics and affine parameters.

    With the default (mean 0, var 1, weight 1, bias 0) a wrong key mapping between two norms would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's scale."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


# The model part of every tiny detection-training config in the tests (schedules differ per test file).
TINY_DETECTOR = {
    "backbone": "resnet18",
    "backbone_options": {"base_channels": 8},
    "fpn_options": {"out_channels": 16},
    "detector_options": {
        "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100,
        "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
        "rpn_batch_size_per_image": 64, "box_batch_size_per_image": 32,
        "box_detections_per_img": 20, "box_score_thresh": 0.0,  # detections even from an untrained model
    },
}
