"""Golden checks: torchvision's Faster/Mask R-CNN (v1, v2) state dicts load into our detectors and detect the same."""
import pytest
import torch

import heads
from tools.reference_models import torchvision_detector

# Small inputs keep two ResNet-50 detectors per case cheap; both models get the same resize options.
SIZES = dict(min_size=224, max_size=320, rpn_post_nms_top_n_test=100, box_detections_per_img=20)


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
    reference = torchvision_detector(kind, variant, **SIZES)
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
