"""Faster/Mask R-CNN over our backbones: training and inference, construction from output_shape(), options,
input validation and checkpoint loading. Small images and ResNet-18 keep it cheap."""
import logging

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import FrozenBatchNorm2d

import backbones
import heads
import heads.ops

NUM_CLASSES = 5
# Fewer proposals and sampled RoIs than the defaults: same code paths, a fraction of the cost.
SMALL = dict(
    min_size=64,
    max_size=96,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=20,
    box_batch_size_per_image=8,
    box_detections_per_img=10,
    box_score_thresh=0.0,
)
KINDS = ("faster_rcnn", "mask_rcnn")


def _detector(kind: str = "faster_rcnn", variant: str = "v1", **options) -> nn.Module:
    return heads.build_detector(kind, "resnet18", NUM_CLASSES, variant, **{**SMALL, **options})


def _images() -> list[torch.Tensor]:
    return [torch.rand(3, 60, 75), torch.rand(3, 49, 66)]


def _targets(images: list[torch.Tensor], empty_second: bool = True) -> list[dict[str, torch.Tensor]]:
    targets = []
    for i, image in enumerate(images):
        h, w = image.shape[1:]
        n = 0 if (empty_second and i == 1) else 2
        boxes = torch.tensor([[5.0, 10.0, 35.0, 45.0], [20.0, 3.0, 60.0, 30.0]])[:n]
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, NUM_CLASSES - 1])[:n], masks=masks))
    return targets


@pytest.fixture(scope="module")
def faster() -> nn.Module:
    return _detector("faster_rcnn")


@pytest.fixture(scope="module")
def mask() -> nn.Module:
    return _detector("mask_rcnn")


# ---------------------------------------------------------------- train / eval


@pytest.mark.parametrize("variant", heads.VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_train_step_and_detections(kind: str, variant: str) -> None:
    model = _detector(kind, variant)
    images = _images()
    model.train()
    losses = model(images, _targets(images))
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if kind == "mask_rcnn" else set())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    for param in (body.conv1.weight, body.layer1[0].conv1.weight, model.backbone.fpn.inner_blocks[0][0].weight):
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0
    if kind == "mask_rcnn":
        assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images):
        h, w = image.shape[1:]
        n = len(det["boxes"])
        assert 0 < n <= SMALL["box_detections_per_img"]
        assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].dtype == torch.int64
        assert (det["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (det["boxes"] >= 0).all()
        assert ((det["labels"] >= 1) & (det["labels"] < NUM_CLASSES)).all()
        if kind == "mask_rcnn":
            assert det["masks"].shape == (n, 1, h, w)
            assert det["masks"].min() >= 0 and det["masks"].max() <= 1
        else:
            assert "masks" not in det


@pytest.mark.parametrize("kind", KINDS)
def test_images_without_objects_train(kind: str, faster: nn.Module, mask: nn.Module) -> None:
    model = faster if kind == "faster_rcnn" else mask
    model.train()
    images = _images()
    targets = [{k: v[:0] for k, v in t.items()} for t in _targets(images)]  # every image a negative
    assert targets[0]["boxes"].shape == (0, 4) and targets[0]["masks"].shape == (0, 60, 75)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0
    sum(losses.values()).backward()
    model.zero_grad()


def test_timm_backbone_detector() -> None:
    model = heads.build_detector("faster_rcnn", "timm:resnet18", NUM_CLASSES, **SMALL)
    assert isinstance(model.backbone.body, backbones.TimmBackbone)
    images = _images()
    losses = model.train()(images, _targets(images))
    sum(losses.values()).backward()
    first = next(p for p in model.backbone.body.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    with torch.no_grad():
        assert len(model.eval()(images)) == 2


# ---------------------------------------------------------------- construction


def test_levels_and_anchors_follow_backbone_output_shape() -> None:
    fpn = backbones.FPN(backbones.resnet18(out_features=("c2", "c3", "c4", "c5")), top_block="p6p7")
    assert list(fpn.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    model = heads.FasterRCNN(fpn, NUM_CLASSES, **SMALL)
    assert model.roi_heads.box_roi_pool.featmap_names == ["p3", "p4", "p5"]
    assert [s[0] for s in model.rpn.anchor_generator.sizes] == [64, 128, 256, 512, 1024]
    assert model.rpn.anchor_generator.aspect_ratios[0] == (0.5, 1.0, 2.0)
    with torch.no_grad():
        assert len(model.eval()(_images())) == 2


def test_default_parts_match_torchvision_layout(faster: nn.Module, mask: nn.Module) -> None:
    assert [s[0] for s in faster.rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    assert isinstance(faster.roi_heads.box_roi_pool, heads.ops.MultiScaleRoIAlign)  # the parallel CPU kernel
    assert faster.roi_heads.box_roi_pool.featmap_names == ["p2", "p3", "p4", "p5"]
    assert faster.roi_heads.box_roi_pool.output_size == (7, 7) and faster.roi_heads.box_roi_pool.sampling_ratio == 2
    assert mask.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert isinstance(faster.roi_heads.box_head, TwoMLPHead)
    assert faster.transform.size_divisible == faster.backbone.size_divisibility == 32
    defaults = heads.FasterRCNN(faster.backbone, 91)
    assert (defaults.transform.min_size, defaults.transform.max_size) == ((800,), 1333)
    assert defaults.roi_heads.score_thresh == 0.05 and defaults.roi_heads.nms_thresh == 0.5
    assert defaults.roi_heads.detections_per_img == 100 and defaults.rpn.nms_thresh == 0.7


def test_v2_parts() -> None:
    model = _detector("mask_rcnn", "v2")
    assert model.backbone.fpn.inner_blocks[0][1].__class__ is nn.BatchNorm2d
    assert len(model.rpn.head.conv) == 2
    assert isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.box_head.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.roi_heads.mask_head.modules())


def test_backbone_defaults_follow_pretrained_flag() -> None:
    scratch = heads.build_detector("faster_rcnn", "resnet18", NUM_CLASSES)
    assert isinstance(scratch.backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in scratch.backbone.parameters())

    pretrained = heads.build_detector("faster_rcnn", "resnet18", NUM_CLASSES, pretrained_backbone=True)
    body = pretrained.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad

    overridden = heads.build_detector(
        "faster_rcnn", "resnet18", NUM_CLASSES, pretrained_backbone=True, backbone_options=dict(frozen_stages=0)
    )
    assert overridden.backbone.body.conv1.weight.requires_grad


def test_parts_passed_in_are_used(faster: nn.Module) -> None:
    head = TwoMLPHead(256 * 7 * 7, 64)
    predictor = FastRCNNPredictor(64, NUM_CLASSES)
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((1.0,),) * 5)
    model = heads.FasterRCNN(
        faster.backbone, NUM_CLASSES, box_head=head, box_predictor=predictor, rpn_anchor_generator=anchors, **SMALL
    )
    assert model.roi_heads.box_head is head and model.roi_heads.box_predictor is predictor
    assert model.rpn.anchor_generator is anchors and model.rpn.head.cls_logits.out_channels == 1
    with torch.no_grad():
        assert len(model.eval()(_images())[0]["boxes"]) > 0


def test_options_reach_the_parts(faster: nn.Module) -> None:
    model = heads.MaskRCNN(
        faster.backbone,
        NUM_CLASSES,
        min_size=96,
        max_size=200,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.2, 0.2, 0.2],
        rpn_nms_thresh=0.6,
        rpn_fg_iou_thresh=0.8,
        rpn_score_thresh=0.01,
        box_nms_thresh=0.4,
        box_detections_per_img=3,
        box_score_thresh=0.0,
        bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
    )
    assert model.transform.min_size == (96,) and model.transform.image_mean == [0.5, 0.5, 0.5]
    assert model.rpn.nms_thresh == 0.6 and model.rpn.score_thresh == 0.01
    assert model.rpn.proposal_matcher.high_threshold == 0.8
    assert model.roi_heads.nms_thresh == 0.4 and model.roi_heads.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    with torch.no_grad():
        detections = model.eval()(_images())
    assert all(len(d["boxes"]) == 3 for d in detections)


def test_class_agnostic_box_regression(faster: nn.Module) -> None:
    model = heads.FasterRCNN(faster.backbone, NUM_CLASSES, class_agnostic_box_reg=True, **SMALL)
    predictor = model.roi_heads.box_predictor
    assert predictor.bbox_pred.out_features == 4 and predictor.cls_score.out_features == NUM_CLASSES
    scores, deltas = predictor(torch.randn(6, 1024))
    assert scores.shape == (6, NUM_CLASSES) and deltas.shape == (6, NUM_CLASSES * 4)
    per_class = deltas.reshape(6, NUM_CLASSES, 4)
    assert torch.equal(per_class, per_class[:, :1].expand_as(per_class))

    images = _images()
    losses = model.train()(images, _targets(images))
    assert losses["loss_box_reg"] > 0
    model.zero_grad()
    losses["loss_box_reg"].backward()
    assert predictor.bbox_pred.weight.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():
        assert len(model.eval()(images)[0]["boxes"]) > 0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: heads.build_detector("retinanet"), "faster_rcnn"),
        (lambda: heads.build_detector("faster_rcnn", variant="v3"), "v1"),
        (lambda: heads.build_detector("faster_rcnn", "resnet19"), "resnet18"),
        (lambda: heads.build_detector("faster_rcnn", "resnet18", num_classes=1), "background"),
    ],
)
def test_invalid_build_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_anchor_generator_must_cover_every_level(faster: nn.Module) -> None:
    anchors = AnchorGenerator(((32,), (64,)), ((1.0,),) * 2)
    with pytest.raises(ValueError, match="5 feature maps"):
        heads.FasterRCNN(faster.backbone, NUM_CLASSES, rpn_anchor_generator=anchors)


# ---------------------------------------------------------------- input validation


def _bad(key: str, value) -> list[dict[str, torch.Tensor]]:
    targets = _targets(_images(), empty_second=False)
    targets[1] = {**targets[1], key: value}
    return targets


BAD_TARGETS = [
    ("targets are required", lambda: None),
    ("one target per image", lambda: _targets(_images())[:1]),
    ("lacks \\['boxes'\\]", lambda: [t if i == 0 else {"labels": t["labels"], "masks": t["masks"]}
                                    for i, t in enumerate(_targets(_images()))]),
    ("lacks \\['labels'\\]", lambda: [{"boxes": t["boxes"], "masks": t["masks"]} for t in _targets(_images())]),
    ("shape Nx4", lambda: _bad("boxes", torch.rand(2, 5) * 10)),
    ("float tensor", lambda: _bad("boxes", torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]))),
    ("image 1, box 1", lambda: _bad("boxes", torch.tensor([[1.0, 2.0, 30.0, 40.0], [50.0, 10.0, 40.0, 60.0]]))),
    ("image 1, box 0", lambda: _bad("boxes", torch.tensor([[1.0, 40.0, 30.0, 40.0], [5.0, 10.0, 40.0, 60.0]]))),
    ("not finite", lambda: _bad("boxes", torch.tensor([[1.0, 2.0, float("nan"), 40.0], [5.0, 10.0, 40.0, 60.0]]))),
    ("out of range 1..4", lambda: _bad("labels", torch.tensor([1, NUM_CLASSES]))),
    ("out of range 1..4", lambda: _bad("labels", torch.tensor([0, 1]))),
    ("int64", lambda: _bad("labels", torch.tensor([1, 2], dtype=torch.int32))),
    ("one per box", lambda: _bad("labels", torch.tensor([1]))),
]


@pytest.mark.parametrize("match,make_targets", BAD_TARGETS)
def test_bad_targets_raise(match: str, make_targets, faster: nn.Module) -> None:
    faster.train()
    with pytest.raises(ValueError, match=match):
        faster(_images(), make_targets())


@pytest.mark.parametrize(
    "match,masks",
    [
        ("lacks \\['masks'\\]", None),
        ("must have shape \\(2, 49, 66\\)", torch.zeros(2, 60, 75, dtype=torch.uint8)),
        ("uint8", torch.zeros(2, 49, 66)),
        (r"targets\[1\]\['masks'\] \(image 1\) holds values \[0, 255\]", torch.zeros(2, 49, 66, dtype=torch.uint8)
         .index_fill_(1, torch.tensor([5]), 255)),  # a 0/255 PNG mask, read as is
    ],
)
def test_bad_masks_raise(match: str, masks, mask: nn.Module) -> None:
    targets = _targets(_images(), empty_second=False)
    if masks is None:
        del targets[1]["masks"]
    else:
        targets[1]["masks"] = masks
    mask.train()
    with pytest.raises(ValueError, match=match):
        mask(_images(), targets)


@pytest.mark.parametrize(
    "match,images",
    [
        ("non-empty list", lambda: []),
        ("non-empty list", lambda: torch.rand(2, 3, 64, 64)),
        ("images\\[1\\] must have shape 3xHxW", lambda: [torch.rand(3, 64, 64), torch.rand(1, 64, 64)]),
        ("images\\[0\\] must have shape 3xHxW", lambda: [torch.rand(64, 64)]),
        ("float tensor", lambda: [torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)]),
        ("empty", lambda: [torch.rand(3, 0, 64)]),
        (r"images\[1\] holds NaN", lambda: [torch.rand(3, 64, 64), torch.rand(3, 64, 64).index_fill_(2, torch.tensor([3]),
                                                                                             float("nan"))]),
        (r"images\[0\] holds NaN or infinite", lambda: [torch.full((3, 8, 8), float("inf"))]),
        # max_size 96: a 1x97 image would be resized to 0x96 (a RuntimeError inside interpolate)
        (r"images\[0\] is 1x97 \(HxW\): its aspect ratio exceeds 96:1", lambda: [torch.rand(3, 1, 97)]),
        (r"images\[0\] is 5000x1", lambda: [torch.rand(3, 5000, 1)]),
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_bad_images_raise(match: str, images, training: bool, mask: nn.Module) -> None:
    mask.train(training)  # images are checked first, in both modes
    with pytest.raises(ValueError, match=match):
        mask(images())


def test_extreme_but_resizable_aspect_ratio_runs(faster: nn.Module) -> None:
    faster.eval()
    with torch.no_grad():
        faster([torch.rand(3, 1, 96), torch.rand(3, 2, 150)])  # shorter side 1 pixel after resizing: still works


# ---------------------------------------------------------------- weights


def _detections(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    images = _images()
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "nested"])
def test_own_checkpoint_round_trip(fmt: str, mask: nn.Module, tmp_path) -> None:
    state = mask.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        checkpoint = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    else:
        checkpoint = tmp_path / "model.pth"
        torch.save({"model": state, "epoch": 3} if fmt == "nested" else state, checkpoint)
    fresh = _detector("mask_rcnn")
    result = heads.load_weights(fresh, checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.skipped_keys == []
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    if fmt == "pth":
        for a, b in zip(_detections(mask), _detections(fresh)):
            torch.testing.assert_close(a["boxes"], b["boxes"])
            torch.testing.assert_close(a["masks"], b["masks"])


def test_other_class_count_skips_predictors(mask: nn.Module, caplog) -> None:
    other = heads.build_detector("mask_rcnn", "resnet18", NUM_CLASSES + 2, **SMALL)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="heads.weights"):
        result = heads.load_weights(other, mask.state_dict())
    expected = [
        "roi_heads.box_predictor.bbox_pred.bias",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
        "roi_heads.mask_predictor.mask_fcn_logits.weight",
    ]
    assert sorted(result.skipped_keys) == expected
    assert all(key in caplog.text for key in expected)
    loaded = other.state_dict()
    for key, value in mask.state_dict().items():
        if key in expected:
            assert torch.equal(loaded[key], before[key]), key
        else:
            assert torch.equal(loaded[key], value), key


def test_mismatched_checkpoint_raises(faster: nn.Module, mask: nn.Module) -> None:
    # A Mask R-CNN checkpoint into a Faster R-CNN: the mask branch is unexpected.
    with pytest.raises(ValueError, match="unexpected.*roi_heads.mask_head.0.0.weight"):
        heads.load_weights(faster, mask.state_dict())
    state = dict(faster.state_dict())
    del state["rpn.head.cls_logits.weight"]
    with pytest.raises(ValueError, match="missing.*rpn.head.cls_logits.weight"):
        heads.load_weights(faster, state)
    result = heads.load_weights(faster, state, strict=False)
    assert result.missing_keys == ["rpn.head.cls_logits.weight"]


def test_legacy_torchvision_key_layout_loads(mask: nn.Module) -> None:
    """Published v1 COCO files predate Conv2dNormActivation: fpn/rpn/mask-head convs have shorter keys."""
    state = mask.state_dict()
    legacy = {}
    for key, value in state.items():
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                key = key.replace(f"backbone.fpn.{block}.{i}.0.", f"backbone.fpn.{block}.{i}.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy[key] = value
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    assert "backbone.fpn.layer_blocks.3.weight" in legacy

    fresh = _detector("mask_rcnn")
    heads.load_weights(fresh, legacy)
    loaded = fresh.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_frozen_bn_and_bn_checkpoints_load_each_other(faster: nn.Module) -> None:
    frozen = heads.build_detector("faster_rcnn", "resnet18", NUM_CLASSES, pretrained_backbone=True, **SMALL)
    assert "backbone.body.bn1.num_batches_tracked" in faster.state_dict()
    heads.load_weights(frozen, faster.state_dict())
    assert torch.equal(frozen.backbone.body.bn1.running_var, faster.backbone.body.bn1.running_var)
    result = heads.load_weights(_detector("faster_rcnn"), frozen.state_dict())
    assert result.missing_keys == []


def test_roi_scales_come_from_declared_strides_not_the_first_batch():
    """A 65 px image is padded to 96: inferring scales from that batch (torchvision's way) gives p2 = 1/2."""
    from heads import build_detector

    model = build_detector(
        "mask_rcnn", backbone="resnet18", num_classes=3, min_size=65, max_size=100,
        backbone_options={"base_channels": 16}, fpn_options={"out_channels": 32},
    ).eval()
    with torch.no_grad():
        model([torch.rand(3, 65, 90)])
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        assert (pool.map_levels.k_min, pool.map_levels.k_max) == (2, 5)
