"""Reference models for golden checks and benchmarks, and the tiny model configurations of the tests.

torchvision's classifiers and detectors with random weights that behave like trained ones where it matters:
every norm layer holds non-trivial statistics and affine parameters (so a wrong key mapping or a folding error
changes the output), and a detector's backbone statistics are measured on data (so activations stay O(1) and
float rounding does not swamp the comparison). Used by ``tests/`` and ``tools/benchmark.py``.

    from tools.reference_models import randomize_norm_stats, torchvision_detector
    reference = torchvision_detector("mask_rcnn", "v2", min_size=224, max_size=320)
    model = heads.build_detector("mask_rcnn", "resnet50", num_classes=91, variant="v2", min_size=224, max_size=320)
    heads.load_weights(model, reference.state_dict())
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = [
    "CONFIDENT_CLASSES",
    "TINY_CLASSIFIER",
    "TINY_DETECTOR",
    "TINY_DET_TRAINING",
    "calibrate_norm_stats",
    "max_rel_diff",
    "randomize_norm_stats",
    "torchvision_classifier",
    "torchvision_detector",
]

# The model part of every tiny detection-training config in the tests (schedules differ per test).
TINY_DETECTOR: dict[str, Any] = {
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

# A tiny detection-training run on 64-px images, two a step: lr 0.16 x 2 / 16 = 0.02 by the linear scaling rule, a
# short warmup, one step a log line, no checkpoints; tests add the data, the length and their own overrides.
TINY_DET_TRAINING: dict[str, Any] = {
    **TINY_DETECTOR,
    "min_sizes": [64], "max_size": 128, "batch_size": 2, "base_lr": 0.16, "base_batch_size": 16,
    "warmup_iters": 2, "warmup_factor": 0.1, "steps": [1000], "workers": 0, "log_every": 1,
    "checkpoint_every": None, "vis_images": 2,
}

# The model part of every tiny classification-training config in the tests.
TINY_CLASSIFIER: dict[str, Any] = {"model": "resnet18", "model_options": {"base_channels": 8}}

# COCO label ids the calibrated detectors favour, so that detections pass the score threshold.
CONFIDENT_CLASSES = [1, 3, 18]

_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)
_R50_BUILDERS = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "mask_rcnn": "maskrcnn_resnet50_fpn"}


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm/FrozenBatchNorm random running statistics and affine parameters; returns ``model``.

    With the defaults (mean 0, var 1, weight 1, bias 0) every norm is the same function, and a wrong key mapping
    between two of them, or a folding error, would go unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _NORMS):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@torch.no_grad()
def calibrate_norm_stats(model: nn.Module, images: Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``model``'s activations on ``images``, as training
    would; returns ``model`` in eval mode.

    With random weights and statistics a ResNet-50's activations reach the hundreds, and float rounding (e.g. from
    folding norms into convolutions) grows past any useful tolerance; statistics measured on data keep them O(1),
    like a trained network's.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batch
    model.train()
    model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def max_rel_diff(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference of ``b`` from the reference ``a``, relative to ``a``'s largest magnitude."""
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def torchvision_classifier(name: str = "resnet50", seed: int = 0, **options: Any) -> nn.Module:
    """torchvision's classifier ``name`` (``resnet50``, ``resnext50_32x4d``, ...) built with ``options``, seeded
    random weights and :func:`randomize_norm_stats`, in eval mode. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, name)(**options)
    return randomize_norm_stats(model, seed).eval()


def torchvision_detector(
    kind: str = "faster_rcnn",
    variant: str = "v1",
    backbone: str = "resnet50",
    *,
    calibrated: bool = True,
    frozen_bn: bool = False,
    batch_norm: bool = False,
    seed: int = 0,
    **options: Any,
) -> nn.Module:
    """torchvision's Faster/Mask R-CNN with seeded random weights and 91 classes, in eval mode.

    Args:
        kind: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        variant: ``"v1"`` or ``"v2"`` (``v2`` with ``backbone="resnet50"`` only).
        backbone: ``"resnet50"`` builds torchvision's R50-FPN model of ``variant``; another ResNet name builds it
            on ``resnet_fpn_backbone`` (FrozenBatchNorm2d, every layer trainable).
        calibrated: :func:`randomize_norm_stats`, then the backbone's BatchNorm statistics measured on random
            images (:func:`calibrate_norm_stats`), and classification logits spread with a few
            :data:`CONFIDENT_CLASSES`, so that detections pass the score threshold and float rounding cannot reorder
            near-tied proposals or detections. ``False``: torchvision's initialisation as it is.
        frozen_bn: the v1 fine-tuning layout (what torchvision builds with ``weights_backbone``): FrozenBatchNorm2d,
            stem and layer1 frozen (``trainable_layers=3``), holding the calibrated model's weights and statistics.
        batch_norm: for a backbone other than ``resnet50``: trainable ``nn.BatchNorm2d`` in ``resnet_fpn_backbone``
            (training from scratch) instead of its default FrozenBatchNorm2d.
        seed: seeds the weights, the norms and the calibration images; the global RNG is left as it was.
        options: passed to the detector (``min_size``, ``max_size``, ``box_detections_per_img``, ...).
    """
    from torchvision.models import detection
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    if kind not in ("faster_rcnn", "mask_rcnn") or variant not in ("v1", "v2"):
        raise ValueError(f"kind must be faster_rcnn or mask_rcnn and variant v1 or v2, got {kind!r}, {variant!r}")
    if variant == "v2" and (backbone != "resnet50" or frozen_bn):
        raise ValueError(f"torchvision's v2 detectors have a resnet50 backbone with BatchNorm, got {backbone!r}"
                         + (" with frozen_bn" if frozen_bn else ""))
    cls = detection.FasterRCNN if kind == "faster_rcnn" else detection.MaskRCNN
    if frozen_bn:
        calibrated_model = torchvision_detector(kind, variant, backbone, calibrated=True, seed=seed, **options)
        body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
        model = cls(body, 91, **options)
        model.load_state_dict(calibrated_model.state_dict())  # FrozenBN drops BatchNorm's num_batches_tracked
        return model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backbone == "resnet50":
            build = getattr(detection, _R50_BUILDERS[kind] + ("_v2" if variant == "v2" else ""))
            model = build(weights=None, weights_backbone=None, **options)
        else:
            norm = dict(norm_layer=nn.BatchNorm2d) if batch_norm else {}
            body = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5, **norm)
            model = cls(body, 91, **options)
    if calibrated:
        randomize_norm_stats(model, seed)
        images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
        calibrate_norm_stats(model.backbone, images)
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.bias[CONFIDENT_CLASSES] += 2.0
            model.roi_heads.box_predictor.cls_score.weight *= 3.0
            model.rpn.head.cls_logits.weight *= 3.0
    return model.eval()
