"""Golden checks: torchvision's Faster/Mask R-CNN (v1, v2) state dicts load into our detectors and detect the same."""
import pytest
import torch
from torch import nn
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.ops import FrozenBatchNorm2d

import heads

# Small inputs keep two ResNet-50 detectors per case cheap; both models get the same resize options.
SIZES = dict(min_size=224, max_size=320, rpn_post_nms_top_n_test=100, box_detections_per_img=20)
REFERENCES = {
    ("faster_rcnn", "v1"): fasterrcnn_resnet50_fpn,
    ("faster_rcnn", "v2"): fasterrcnn_resnet50_fpn_v2,
    ("mask_rcnn", "v1"): maskrcnn_resnet50_fpn,
    ("mask_rcnn", "v2"): maskrcnn_resnet50_fpn_v2,
}
CONFIDENT_CLASSES = [1, 3, 18]


@torch.no_grad()
def _randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every (Frozen)BatchNorm non-trivial statistics and affine parameters, so folding/eps errors show."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
            module.weight.copy_(torch.rand(c, generator=generator) * 0.4 + 0.2)
            module.bias.copy_(torch.randn(c, generator=generator) * 0.1)


@torch.no_grad()
def _calibrate_backbone(model: nn.Module, generator: torch.Generator) -> None:
    """Set the backbone's BatchNorm running statistics from data, as training would.

    With random statistics a randomly initialised ResNet-50's activations reach the hundreds and float rounding
    (e.g. from folding BN into convolutions) is amplified beyond the tolerances; data statistics keep them O(1)
    like a trained network's.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batch
    model.backbone.train()
    model.backbone(torch.randn(2, 3, 256, 256, generator=generator))
    model.backbone.eval()
    for norm in norms:
        norm.momentum = 0.1


def _reference(kind: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = REFERENCES[kind, variant](weights=None, weights_backbone=None, **SIZES)
    generator = torch.Generator().manual_seed(1)
    _randomise_norms(model, generator)
    _calibrate_backbone(model, generator)
    with torch.no_grad():
        # A few confident classes so that detections survive the score threshold, and logits spread widely
        # enough that float rounding cannot reorder near-tied proposals or detections.
        model.roi_heads.box_predictor.cls_score.bias[CONFIDENT_CLASSES] += 2.0
        model.roi_heads.box_predictor.cls_score.weight *= 3.0
        model.rpn.head.cls_logits.weight *= 3.0
    return model.eval()


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    # Odd sizes: exercises resizing, padding to the size divisibility and clipping at the image border.
    return [torch.rand(3, 237, 301, generator=g), torch.rand(3, 290, 211, generator=g)]


@pytest.mark.parametrize(
    "kind,variant,pretrained_backbone",
    [
        ("faster_rcnn", "v1", False),
        # FrozenBN body (published COCO checkpoints' layout) loading a BatchNorm checkpoint: counters are optional.
        ("faster_rcnn", "v2", True),
        ("mask_rcnn", "v1", True),
        ("mask_rcnn", "v2", False),
    ],
)
def test_torchvision_checkpoint_gives_same_detections(kind: str, variant: str, pretrained_backbone: bool) -> None:
    reference = _reference(kind, variant)
    model = heads.build_detector(
        kind, "resnet50", num_classes=91, variant=variant, pretrained_backbone=pretrained_backbone, **SIZES
    )
    result = heads.load_weights(model, reference.state_dict())
    assert result.skipped_keys == [] and result.missing_keys == [] and result.unexpected_keys == []
    # float64 on both sides: with random weights the activations are far larger than a trained network's, and
    # float32 rounding (e.g. BN folded into convolutions) then shifts scores by ~1e-4; in float64 any difference
    # left is a difference in the maths.
    model.eval().double()
    reference.double()

    images = [image.double() for image in _images()]
    with torch.no_grad():
        expected = reference(images)
        actual = model(images)

    for exp, act in zip(expected, actual):
        assert len(exp["boxes"]) > 0
        assert torch.equal(act["labels"], exp["labels"])
        torch.testing.assert_close(act["boxes"], exp["boxes"], atol=1e-2, rtol=0)
        torch.testing.assert_close(act["scores"], exp["scores"], atol=1e-4, rtol=0)
        if kind == "mask_rcnn":
            assert act["masks"].shape == exp["masks"].shape
            torch.testing.assert_close(act["masks"], exp["masks"], atol=1e-3, rtol=0)
