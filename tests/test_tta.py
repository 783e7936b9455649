"""Test-time augmentation: equal to plain inference where it must be, flips mapped back, eval_coco.py --tta."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from tools import eval_coco, train_det
from tools.engine.coco_eval import METRIC_NAMES
from tools.engine.coco_results import validate_results
from tools.engine.config import load_config
from tools.engine.det_config import DetTrainConfig, model_spec
from tools.engine.det_eval import evaluate_checkpoint
from heads.spec import build_from_spec
from tools.engine.det_train import train
from tools.engine.det_tta import Augmentation, DetectorWithTTA, TTASettings, hflip_boxes
from tools.engine.shapes import make_shapes_coco
from tools.reference_models import TINY_DETECTOR

# Test size 48 (cap 64); detections even from an untrained model (TINY_DETECTOR's score threshold is 0), 8 per
# image: the mask head (256 channels whatever the backbone's width) dominates the time.
TINY = {**TINY_DETECTOR, "min_sizes": [48], "max_size": 64, "batch_size": 2, "lr": 0.005, "warmup_iters": 0,
        "steps": [1000], "workers": 0, "checkpoint_every": None, "vis_images": 0, "device": "cpu",
        "detector_options": {**TINY_DETECTOR["detector_options"], "box_detections_per_img": 8}}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    paths = make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_train=4, num_val=3, image_size=(48, 64), seed=4)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def mask_rcnn(shapes) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = load_config(DetTrainConfig, None, {**TINY, **shapes, "detector": "mask_rcnn"})
    return build_from_spec(model_spec(cfg, num_classes=4)).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 52, 70, generator=g), torch.rand(3, 64, 48, generator=g)]


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory) -> Path:
    """A Mask R-CNN run of a few iterations: its folder, with model_final.pth and the training's evaluation."""
    out = tmp_path_factory.mktemp("run")
    train(load_config(DetTrainConfig, None, {**TINY, **shapes, "detector": "mask_rcnn", "iters": 2,
                                             "output_dir": str(out)}))
    return out


def _same_detections(expected: list[dict], actual: list[dict], mask_atol: float = 1e-5) -> None:
    for want, got in zip(expected, actual, strict=True):
        assert len(want["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(want[key], got[key]), key
        # the mask branch sees the merged boxes mapped into the resized image and back: float rounding only
        torch.testing.assert_close(got["masks"], want["masks"], rtol=0, atol=mask_atol)


def test_one_view_at_the_model_size_equals_plain_inference(mask_rcnn, images):
    tta = DetectorWithTTA(mask_rcnn, TTASettings(sizes=(48,), flip=False))
    assert tta.augmentations == [Augmentation(48, 64, False)]
    with torch.no_grad():
        _same_detections(mask_rcnn(images), tta(images))


def test_one_view_at_another_size_equals_the_model_run_at_that_size(mask_rcnn, images):
    resized = copy.deepcopy(mask_rcnn)
    resized.transform.min_size, resized.transform.max_size = (72,), 96  # the cap scales with the size
    tta = DetectorWithTTA(mask_rcnn, TTASettings(sizes=(72,), flip=False))
    assert tta.augmentations == [Augmentation(72, 96, False)]
    with torch.no_grad():
        _same_detections(resized(images), tta(images))
    assert mask_rcnn.transform.min_size == (48,) and mask_rcnn.transform.max_size == 64  # left alone


def test_flipped_view_is_mapped_back_and_merged_by_class_nms(mask_rcnn, images):
    """Boxes = per-class NMS over the plain detections and the mirrored detections of the mirrored image."""
    tta = DetectorWithTTA(mask_rcnn, TTASettings(sizes=(48,), flip=True))
    with torch.no_grad():
        for image in images:  # one at a time: batch padding would change the features
            got = tta([image])[0]
            plain = mask_rcnn([image])[0]
            mirrored = mask_rcnn([image.flip(-1)])[0]
            boxes = torch.cat([plain["boxes"], hflip_boxes(mirrored["boxes"], image.shape[-1])])
            scores = torch.cat([plain["scores"], mirrored["scores"]])
            labels = torch.cat([plain["labels"], mirrored["labels"]])
            keep = torchvision.ops.batched_nms(boxes, scores, labels, mask_rcnn.roi_heads.nms_thresh)
            keep = keep[: mask_rcnn.roi_heads.detections_per_img]
            assert len(keep) > len(plain["boxes"]) // 2
            torch.testing.assert_close(got["boxes"], boxes[keep])
            assert torch.equal(got["scores"], scores[keep]) and torch.equal(got["labels"], labels[keep])
            assert got["masks"].shape == (len(keep), 1, *image.shape[-2:])
            assert 0 <= got["masks"].min() and got["masks"].max() <= 1


def test_flip_and_sizes_are_symmetric_in_the_mirrored_image(mask_rcnn, images):
    """TTA of the mirrored image is the mirror of TTA of the image: boxes, scores and masks."""
    tta = DetectorWithTTA(mask_rcnn, TTASettings(sizes=(40, 56), flip=True))
    image = images[0]
    with torch.no_grad():
        direct, mirrored = tta([image])[0], tta([image.flip(-1)])[0]
    torch.testing.assert_close(mirrored["scores"], direct["scores"])
    assert torch.equal(mirrored["labels"], direct["labels"])
    torch.testing.assert_close(hflip_boxes(mirrored["boxes"], image.shape[-1]), direct["boxes"], rtol=0, atol=1e-4)
    # pasting truncates boxes to whole pixels, so mirrored masks agree up to a pixel's edge
    difference = (mirrored["masks"].flip(-1) - direct["masks"]).abs()
    assert difference.mean() < 0.01


def test_faster_rcnn_one_view_equals_plain_inference_and_flip_adds_views(shapes, images):
    torch.manual_seed(0)
    cfg = load_config(DetTrainConfig, None, {**TINY, **shapes, "detector": "faster_rcnn"})
    model = build_from_spec(model_spec(cfg, num_classes=4)).eval()
    with torch.no_grad():
        plain = model(images)
        one_view = DetectorWithTTA(model, TTASettings(sizes=(48,), flip=False))(images)
        flipped = DetectorWithTTA(model, TTASettings(sizes=(48,)))(images)
    for want, got, more in zip(plain, one_view, flipped):
        assert set(got) == {"boxes", "scores", "labels"}
        for key in got:
            assert torch.equal(want[key], got[key]), key
        assert not torch.equal(more["boxes"], want["boxes"])  # the mirrored view's boxes take part


def test_no_detection_gives_empty_outputs(mask_rcnn, images):
    model = copy.deepcopy(mask_rcnn)
    model.roi_heads.score_thresh = 1.0  # softmax scores never exceed it
    with torch.no_grad():
        outputs = DetectorWithTTA(model, TTASettings(sizes=(40,)))(images)
    for image, output in zip(images, outputs):
        assert output["boxes"].shape == (0, 4) and output["scores"].shape == (0,) and output["labels"].shape == (0,)
        assert output["masks"].shape == (0, 1, *image.shape[-2:])


def test_hflip_boxes_mirrors_known_boxes():
    boxes = torch.tensor([[0.0, 1.0, 10.0, 5.0], [30.5, 2.0, 40.0, 8.0]])
    assert hflip_boxes(boxes, 40).tolist() == [[30.0, 1.0, 40.0, 5.0], [0.0, 2.0, 9.5, 8.0]]
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 40), 40), boxes)


def test_default_views_scale_the_model_size(mask_rcnn):
    views = DetectorWithTTA(mask_rcnn).augmentations
    assert views == [Augmentation(36, 48, False), Augmentation(36, 48, True), Augmentation(48, 64, False),
                     Augmentation(48, 64, True), Augmentation(60, 80, False), Augmentation(60, 80, True)]
    fixed = DetectorWithTTA(mask_rcnn, TTASettings(sizes=(30, 90), flip=False, max_size=100)).augmentations
    assert fixed == [Augmentation(30, 100, False), Augmentation(90, 100, False)]


@pytest.mark.parametrize("options, message", [
    (dict(sizes=()), "non-empty"), (dict(sizes=(48, 0)), "positive"), (dict(sizes=(48.5,)), "integers"),
    (dict(sizes=(True,)), "integers"), (dict(max_size=0), "max_size"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TTASettings(**options)


def test_tta_refuses_a_model_in_train_mode_or_without_detector_parts(mask_rcnn, images):
    with pytest.raises(ValueError, match="needs a detector"):
        DetectorWithTTA(torch.nn.Linear(2, 2))
    model = copy.deepcopy(mask_rcnn).train()
    with pytest.raises(ValueError, match="eval mode"):
        DetectorWithTTA(model)(images)


def test_training_evaluation_writes_per_category_and_curves(trained):
    saved = json.loads((trained / "metrics.json").read_text())
    assert set(saved) == {"bbox", "segm", "per_category"}
    assert set(saved["segm"]) == set(METRIC_NAMES)
    assert set(saved["per_category"]["segm"]) == {"circle", "rectangle", "triangle"}
    with Image.open(trained / "pr_curves.png") as picture:
        assert picture.size == (1100, 840)


def test_eval_coco_tta_end_to_end(trained, shapes, tmp_path):
    args = ["--weights", str(trained / "model_final.pth"), "--val-images", shapes["val_images"],
            "--val-ann", shapes["val_ann"], "--workers", "0", "--device", "cpu"]
    assert eval_coco.main([*args, "--output-dir", str(tmp_path / "tta"), "--tta", "--tta-sizes", "40", "56"]) == 0
    out = tmp_path / "tta"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "per_category", "tta"}
    assert metrics["tta"]["sizes"] == [40, 56] and metrics["tta"]["flip"] is True
    assert metrics["tta"]["augmentations"] == [[40, 53, False], [40, 53, True], [56, 75, False], [56, 75, True]]
    results = json.loads((out / "coco_results.json").read_text())
    assert results and validate_results(results) == results
    gt = json.loads(Path(shapes["val_ann"]).read_text())
    assert {r["image_id"] for r in results} <= {img["id"] for img in gt["images"]}
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    assert all("segmentation" in r for r in results)
    assert (out / "pr_curves.png").stat().st_size > 10_000

    # One view at the model's own size: the boxes of plain evaluation (the training run's final one, same batches).
    one_view = evaluate_checkpoint(trained / "model_final.pth", shapes["val_images"], shapes["val_ann"],
                                   tmp_path / "one", device="cpu", workers=0, tta=TTASettings((48,), flip=False))
    assert one_view["bbox"] == json.loads((trained / "metrics.json").read_text())["bbox"]
    boxes = [[(r["image_id"], r["category_id"], r["bbox"], r["score"])
              for r in json.loads((folder / "coco_results.json").read_text())] for folder in (trained, tmp_path / "one")]
    assert boxes[0] == boxes[1]


@pytest.mark.parametrize("extra, message", [
    (["--tta", "--tta-sizes"], "--tta-sizes"),
    (["--tta", "--tta-sizes", "0"], "positive"),
    (["--tta-sizes", "40"], "--tta-sizes needs --tta"),
    (["--no-tta-flip", "--tta-max-size", "90"], "--tta-max-size, --no-tta-flip need --tta"),
    (["--tta", "--tta-max-size", "-5"], "--tta-max-size"),
])
def test_eval_coco_bad_tta_flags_exit_2(trained, shapes, tmp_path, capsys, extra, message):
    assert eval_coco.main(["--weights", str(trained / "model_final.pth"), "--val-images", shapes["val_images"],
                           "--val-ann", shapes["val_ann"], "--output-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "metrics.json").exists()


def test_eval_coco_tta_needs_weights(shapes, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert eval_coco.main(["--results", str(results), "--val-ann", shapes["val_ann"], "--output-dir", str(tmp_path),
                           "--tta"]) == 2
    assert "--tta needs --weights" in capsys.readouterr().err


def test_train_det_eval_only_takes_the_tta_flags(trained, shapes, tmp_path, capsys):
    data = ["--weights", str(trained / "model_final.pth"), "--val-images", shapes["val_images"],
            "--val-ann", shapes["val_ann"], "--workers", "0", "--device", "cpu"]
    tta = ["--tta", "--tta-sizes", "40", "56"]
    recipe = ["--train-images", shapes["train_images"], "--train-ann", shapes["train_ann"]]
    assert train_det.main([*data, *recipe, "--output-dir", str(tmp_path / "train_det"), "--eval-only", *tta]) == 0
    assert eval_coco.main([*data, "--output-dir", str(tmp_path / "eval_coco"), *tta]) == 0
    by_tool = [json.loads((tmp_path / tool / "metrics.json").read_text()) for tool in ("train_det", "eval_coco")]
    assert by_tool[0]["tta"]["augmentations"] == [[40, 53, False], [40, 53, True], [56, 75, False], [56, 75, True]]
    assert by_tool[0] == by_tool[1]
    capsys.readouterr()
    assert train_det.main([*data, *recipe, "--output-dir", str(tmp_path / "train"), *tta]) == 2
    assert "--tta needs --eval-only" in capsys.readouterr().err
