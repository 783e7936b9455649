"""Batched post-processing (heads.postprocess) against torchvision's per-image code: RPN proposal filtering,
RoIHeads detections, grouped NMS, mask pasting, and whole detectors with torchvision's classes swapped back in.

The random scores are distinct: torchvision orders equal scores with an unstable sort, so only tie-free inputs
have one right answer to compare with."""
import copy

import pytest
import torch
import torchvision.ops.boxes
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.roi_heads import paste_masks_in_image as torchvision_paste
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import clip_boxes_to_image

import heads
from heads import postprocess
from heads.postprocess import (
    BatchedGeneralizedRCNNTransform,
    BatchedRegionProposalNetwork,
    BatchedRoIHeads,
    grouped_nms,
    paste_masks_in_image,
)
from tools.reference_models import TINY_DETECTOR, randomize_norm_stats

IMAGE_SHAPES = [(200, 300), (260, 180), (150, 240)]  # (height, width): every image its own size
NMS_PATHS = ("per_group", "single_call")


@pytest.fixture
def nms_path(request, monkeypatch) -> str:
    """Run grouped_nms's CPU per-group path (large inputs) or its single-call path (small inputs, GPU)."""
    if request.param == "single_call":
        monkeypatch.setattr(postprocess, "_CPU_SINGLE_NMS_MAX_BOXES", 10**9)
    else:
        monkeypatch.setattr(postprocess, "_CPU_SINGLE_NMS_MAX_BOXES", 0)
    return request.param


@pytest.fixture
def torchvision_per_class_calls(monkeypatch) -> list[int]:
    """Counts torchvision's per-class NMS loop calls (batched_nms above 1000 boxes on CPU), with their sizes."""
    calls = []
    vanilla = torchvision.ops.boxes._batched_nms_vanilla

    def counted(boxes, scores, idxs, iou_threshold):
        calls.append(boxes.shape[0])
        return vanilla(boxes, scores, idxs, iou_threshold)

    monkeypatch.setattr(torchvision.ops.boxes, "_batched_nms_vanilla", counted)
    return calls


def _distinct(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """n distinct values evenly spread over [low, high], in random order."""
    return torch.linspace(low, high, n)[torch.randperm(n, generator=generator)]


def _random_boxes(n: int, height: int, width: int, generator: torch.Generator, max_side: float = 60.0) -> torch.Tensor:
    """Boxes around the image, some reaching past its borders (clipping matters) and some under 1e-3 px wide."""
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([width + 40.0, height + 40.0]) - 20.0
    half = (torch.rand(n, 2, generator=generator) * max_side + 2.0) / 2
    half[torch.rand(n, generator=generator) < 0.03, 0] = 1e-4  # too thin: removed
    return torch.cat([centre - half, centre + half], dim=1)


# ---------------------------------------------------------------- RPN filter_proposals

LEVELS = [1500, 1200, 600]  # anchors per image and level: top-n 500 + 500 + 500 boxes per image


def _rpn(cls: type, training: bool, score_thresh: float) -> RegionProposalNetwork:
    module = cls(
        AnchorGenerator(), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
        dict(training=600, testing=500), dict(training=700, testing=400), 0.7, score_thresh=score_thresh,
    )
    return module.train(training)


def _rpn_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    num_images, num_anchors = len(IMAGE_SHAPES), sum(LEVELS)
    proposals = torch.stack([_random_boxes(num_anchors, h, w, g) for h, w in IMAGE_SHAPES])
    objectness = _distinct(num_images * num_anchors, -4.0, 4.0, g).reshape(num_images, num_anchors)
    objectness[1] = objectness[1] / 2 - 2.01  # image 1: every probability < 0.5
    return proposals, objectness.reshape(-1, 1)


@pytest.mark.parametrize("nms_path", NMS_PATHS, indirect=True)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("score_thresh", [0.0, 0.5])
def test_filter_proposals_equals_torchvision(
    nms_path: str, training: bool, score_thresh: float, torchvision_per_class_calls: list[int]
) -> None:
    proposals, objectness = _rpn_inputs()
    expected = _rpn(RegionProposalNetwork, training, score_thresh).filter_proposals(
        proposals, objectness, IMAGE_SHAPES, LEVELS
    )
    actual = _rpn(BatchedRegionProposalNetwork, training, score_thresh).filter_proposals(
        proposals, objectness, IMAGE_SHAPES, LEVELS
    )

    assert len(torchvision_per_class_calls) >= 2 and min(torchvision_per_class_calls) > 1000  # the exact path
    post_nms_top_n = 700 if training else 400
    for image, (exp_boxes, exp_scores, boxes, scores) in enumerate(zip(*expected, *actual)):
        assert torch.equal(boxes, exp_boxes) and torch.equal(scores, exp_scores)
        if image == 1 and score_thresh == 0.5:
            assert boxes.shape == (0, 4)  # nothing survives the score threshold
        else:
            assert len(boxes) == post_nms_top_n  # the per-image cut after NMS is exercised


def test_filter_proposals_bfloat16_autocast() -> None:
    """bfloat16 proposals and logits (as under autocast) give torchvision's dtypes and values."""
    g = torch.Generator().manual_seed(1)
    levels = [30, 15]
    shapes = IMAGE_SHAPES[:2]
    proposals = torch.stack([_random_boxes(sum(levels), h, w, g) for h, w in shapes]).bfloat16()
    objectness = _distinct(2 * sum(levels), -1.5, 1.5, g).bfloat16()[:, None]
    assert objectness.sigmoid().unique().numel() == objectness.numel()  # no ties, even in bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _rpn(RegionProposalNetwork, False, 0.0).filter_proposals(proposals, objectness, shapes, levels)
        actual = _rpn(BatchedRegionProposalNetwork, False, 0.0).filter_proposals(proposals, objectness, shapes, levels)
    for exp, act in zip(expected[0] + expected[1], actual[0] + actual[1]):
        assert act.dtype == exp.dtype == torch.bfloat16
        assert torch.equal(act, exp)


# ---------------------------------------------------------------- RoIHeads postprocess_detections

NUM_CLASSES = 8
PROPOSALS_PER_IMAGE = [500, 300, 450]


def _roi_heads(cls: type, score_thresh: float = 0.05) -> RoIHeads:
    return cls(None, None, None, 0.5, 0.5, 512, 0.25, None, score_thresh, 0.5, 100)


def _roi_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    proposals = [
        _random_boxes(n, h, w, g, max_side=120.0).abs() for n, (h, w) in zip(PROPOSALS_PER_IMAGE, IMAGE_SHAPES)
    ]
    num_rois = sum(PROPOSALS_PER_IMAGE)
    class_logits = _distinct(num_rois * NUM_CLASSES, -3.0, 3.0, g).reshape(num_rois, NUM_CLASSES)
    first, last = PROPOSALS_PER_IMAGE[0], PROPOSALS_PER_IMAGE[0] + PROPOSALS_PER_IMAGE[1]
    class_logits[first:last, 0] += 20.0  # image 1: background everywhere, no detection
    box_regression = torch.randn(num_rois, NUM_CLASSES * 4, generator=g) * 0.3
    box_regression[torch.rand(num_rois, generator=g) < 0.05, 2::4] = -12.0  # widths * e^-12: removed as too small
    return class_logits, box_regression, proposals


@pytest.mark.parametrize("nms_path", NMS_PATHS, indirect=True)
def test_postprocess_detections_equals_torchvision(nms_path: str, torchvision_per_class_calls: list[int]) -> None:
    class_logits, box_regression, proposals = _roi_inputs()
    expected = _roi_heads(RoIHeads).postprocess_detections(class_logits, box_regression, proposals, IMAGE_SHAPES)
    actual = _roi_heads(BatchedRoIHeads).postprocess_detections(class_logits, box_regression, proposals, IMAGE_SHAPES)

    assert len(torchvision_per_class_calls) == 2 and min(torchvision_per_class_calls) > 1000  # exact path
    for image, (exp_boxes, exp_scores, exp_labels, boxes, scores, labels) in enumerate(zip(*expected, *actual)):
        assert torch.equal(labels, exp_labels)
        assert torch.equal(scores, exp_scores)
        torch.testing.assert_close(boxes, exp_boxes)
        assert len(labels) == (0 if image == 1 else 100)  # empty image; per-image cut exercised
        assert labels.dtype == torch.int64 and boxes.shape == (len(labels), 4)


def test_postprocess_detections_bfloat16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    shapes = IMAGE_SHAPES[:2]
    proposals = [_random_boxes(12, h, w, g).abs() for h, w in shapes]
    class_logits = (_distinct(24 * 4, -3.0, 3.0, g).reshape(24, 4) * 2).bfloat16()
    box_regression = (torch.randn(24, 16, generator=g) * 0.3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _roi_heads(RoIHeads, 0.0).postprocess_detections(class_logits, box_regression, proposals, shapes)
        actual = _roi_heads(BatchedRoIHeads, 0.0).postprocess_detections(
            class_logits, box_regression, proposals, shapes
        )
    assert all(s.unique().numel() == s.numel() for s in expected[1])  # no ties, even in bfloat16
    for exp, act in zip(sum(expected, []), sum(actual, [])):
        assert act.dtype == exp.dtype
        torch.testing.assert_close(act, exp, atol=0, rtol=0)


# ---------------------------------------------------------------- grouped NMS

@pytest.mark.parametrize("nms_path", NMS_PATHS, indirect=True)
def test_grouped_nms_equals_torchvision_per_class(nms_path: str) -> None:
    g = torch.Generator().manual_seed(3)
    boxes = _random_boxes(3000, 300, 400, g).abs()
    scores = _distinct(3000, 0.0, 1.0, g)
    groups = torch.randint(0, 40, (3000,), generator=g) * 7  # sparse group ids
    expected = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, groups, 0.5)
    assert len(expected) < 3000  # some boxes are suppressed
    assert torch.equal(grouped_nms(boxes, scores, groups, 0.5), expected)
    assert grouped_nms(boxes[:0], scores[:0], groups[:0], 0.5).shape == (0,)


@pytest.mark.parametrize("nms_path", NMS_PATHS, indirect=True)
def test_grouped_nms_exact_where_float32_offsets_are_not(nms_path: str) -> None:
    """Group 300 shifted by 300 x 1001 px in float32 lands on a 1/32 px grid, where IoU 0.506 reads as < 0.5."""
    boxes = torch.tensor([[0.0, 0.0, 1000.0, 1000.0], [0.01, 5.0, 1.01, 6.0], [0.338125, 5.0, 1.338125, 6.0]])
    scores, groups = torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0, 300, 300])
    truth = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, groups, 0.5)
    assert truth.tolist() == [1, 0]  # box 2 overlaps box 1 by IoU 0.506
    assert torchvision.ops.boxes._batched_nms_coordinate_trick(boxes, scores, groups, 0.5).tolist() == [1, 2, 0]
    assert grouped_nms(boxes, scores, groups, 0.5).tolist() == [1, 0]


# ---------------------------------------------------------------- mask pasting

def _paste_case(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Masks and boxes in a 45 x 61 image: inside, past every border, tiny (< 1 px), one pixel, whole image."""
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([
        [10.3, 5.7, 30.2, 20.9],
        [-8.4, -3.2, 12.6, 9.5],  # past the top-left corner
        [50.2, 30.1, 70.8, 52.4],  # past the bottom-right corner
        [-5.0, 10.0, 66.0, 30.0],  # wider than the image
        [20.2, 20.2, 20.7, 20.5],  # under 1 px
        [0.0, 44.6, 0.4, 45.0],  # under 1 px, on the last row
        [33.0, 12.0, 34.0, 13.0],
        [0.0, 0.0, 61.0, 45.0],  # the whole image
        [59.5, 0.2, 61.0, 44.9],  # thin strip on the right border
    ])
    # Detections are clipped to the image before pasting (torchvision's loop fails on boxes wholly outside it).
    boxes = torch.cat([boxes, clip_boxes_to_image(_random_boxes(11, 45, 61, g, max_side=40.0), (45, 61))])
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g).to(dtype)
    return masks, boxes, (45, 61)


@pytest.mark.parametrize("padding", [1, 0])  # without padding, pixels just outside a box would not read 0
def test_paste_masks_equals_torchvision(padding: int) -> None:
    masks, boxes, shape = _paste_case()
    expected = torchvision_paste(masks, boxes, shape, padding=padding)
    actual = paste_masks_in_image(masks, boxes, shape, padding=padding)
    assert actual.shape == expected.shape == (len(boxes), 1, *shape) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert torch.equal(actual == 0, expected == 0)  # zero exactly outside each box


def test_paste_masks_chunks_and_dtypes(monkeypatch) -> None:
    masks, boxes, shape = _paste_case()
    monkeypatch.setattr(postprocess, "_PASTE_CHUNK_ELEMENTS", 3 * 45 * 61)  # chunks of 3 masks, the last of 2
    torch.testing.assert_close(paste_masks_in_image(masks, boxes, shape), torchvision_paste(masks, boxes, shape),
                               atol=1e-5, rtol=0)
    double = paste_masks_in_image(masks.double(), boxes.double(), shape)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, torchvision_paste(masks.double(), boxes.double(), shape), atol=1e-12, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 all the same
        torch.testing.assert_close(paste_masks_in_image(masks, boxes, shape), torchvision_paste(masks, boxes, shape),
                                   atol=1e-5, rtol=0)
        half = paste_masks_in_image(masks.bfloat16(), boxes, shape)
        reference = torchvision_paste(masks.bfloat16(), boxes, shape)
    assert half.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference.float(), atol=8e-3, rtol=0)


def test_paste_masks_keeps_autograd() -> None:
    """Like torchvision's, the pasted masks carry gradients back to the mask logits."""
    masks, boxes, shape = _paste_case()
    logits = torch.randn(masks.shape, requires_grad=True)
    pasted = paste_masks_in_image(logits.sigmoid(), boxes, shape)
    reference = torchvision_paste(logits.sigmoid(), boxes, shape)
    torch.testing.assert_close(pasted, reference, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(pasted.sum(), logits)
    (expected,) = torch.autograd.grad(reference.sum(), logits)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_paste_masks_no_detections_and_bad_shapes() -> None:
    empty = paste_masks_in_image(torch.rand(0, 1, 28, 28), torch.zeros(0, 4), (45, 61))
    assert empty.shape == torchvision_paste(torch.rand(0, 1, 28, 28), torch.zeros(0, 4), (45, 61)).shape
    with pytest.raises(ValueError, match=r"masks must be \[N, 1, M, M\]"):
        paste_masks_in_image(torch.rand(3, 28, 28), torch.zeros(3, 4), (45, 61))
    with pytest.raises(ValueError, match="one per mask"):
        paste_masks_in_image(torch.rand(3, 1, 28, 28), torch.zeros(2, 4), (45, 61))


def test_transform_postprocess_equals_torchvision() -> None:
    """Boxes and keypoints resized, masks pasted at the original sizes; training mode passes results through."""
    g = torch.Generator().manual_seed(5)
    resized, original = [(96, 128), (120, 80)], [(45, 61), (150, 100)]
    result = []
    for (h, w), n in zip(resized, (7, 0)):
        result.append(dict(
            boxes=clip_boxes_to_image(_random_boxes(n, h, w, g), (h, w)),
            labels=torch.arange(n),
            scores=torch.rand(n, generator=g),
            masks=torch.rand(n, 1, 28, 28, generator=g), keypoints=torch.rand(n, 17, 3, generator=g) * 90,
        ))
    options = (64, 128, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    expected = GeneralizedRCNNTransform(*options).eval().postprocess(copy.deepcopy(result), resized, original)
    ours = BatchedGeneralizedRCNNTransform(*options).eval()
    actual = ours.postprocess(copy.deepcopy(result), resized, original)
    for exp, act in zip(expected, actual):
        assert list(act) == list(exp)
        for key in exp:
            torch.testing.assert_close(act[key], exp[key], atol=1e-5, rtol=0)
    assert ours.train().postprocess(result, resized, original) is result


# ---------------------------------------------------------------- whole detectors

def _tiny_mask_rcnn() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny Mask R-CNN (batched post-processing) and a copy with torchvision's stock classes swapped back in."""
    model = heads.build_detector(
        "mask_rcnn", TINY_DETECTOR["backbone"], num_classes=4,
        backbone_options=TINY_DETECTOR["backbone_options"], fpn_options=TINY_DETECTOR["fpn_options"],
        min_size=96, max_size=120, **TINY_DETECTOR["detector_options"],
        # A narrow mask head: the default 256-wide one would be most of the test's time.
        mask_head=MaskRCNNHeads(16, [16, 16], 1), mask_predictor=MaskRCNNPredictor(16, 16, 4),
    )
    randomize_norm_stats(model)
    with torch.no_grad():  # spread the logits so that no two scores tie
        model.roi_heads.box_predictor.cls_score.weight *= 5.0
        model.rpn.head.cls_logits.weight *= 3.0
    stock = copy.deepcopy(model)
    stock.rpn.__class__ = RegionProposalNetwork
    stock.roi_heads.__class__ = RoIHeads
    stock.transform.__class__ = GeneralizedRCNNTransform
    return model, stock


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return [torch.rand(3, 90, 112, generator=g), torch.rand(3, 75, 98, generator=g)]


def test_detector_uses_batched_postprocessing_and_detects_the_same() -> None:
    model, stock = _tiny_mask_rcnn()
    assert isinstance(model.rpn, BatchedRegionProposalNetwork) and isinstance(model.roi_heads, BatchedRoIHeads)
    assert isinstance(model.transform, BatchedGeneralizedRCNNTransform)
    assert model.state_dict().keys() == stock.state_dict().keys()
    images = _images()
    with torch.no_grad():
        expected, actual = stock.eval()(images), model.eval()(images)
    for exp, act in zip(expected, actual):
        assert len(exp["labels"]) == 20 and list(act) == list(exp)
        assert torch.equal(act["labels"], exp["labels"])
        torch.testing.assert_close(act["boxes"], exp["boxes"])
        torch.testing.assert_close(act["scores"], exp["scores"])
        torch.testing.assert_close(act["masks"], exp["masks"], atol=1e-5, rtol=0)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = stock(images), model(images)
    for exp, act in zip(expected, actual):  # bfloat16 scores tie often, so only the outputs' form is compared
        assert {k: (v.dtype, v.shape) for k, v in act.items()} == {k: (v.dtype, v.shape) for k, v in exp.items()}


def test_detector_training_losses_unchanged() -> None:
    model, stock = _tiny_mask_rcnn()
    images = _images()
    targets = []
    for image in images:
        h, w = image.shape[1:]
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:60, 5:40] = 1
        masks[1, 30:90, 50:120] = 1
        targets.append(dict(boxes=torch.tensor([[5.0, 10.0, 40.0, 60.0], [50.0, 30.0, 120.0, 90.0]]),
                            labels=torch.tensor([1, 3]), masks=masks))
    torch.manual_seed(7)
    expected = stock.train()(images, targets)
    torch.manual_seed(7)
    actual = model.train()(images, targets)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])
