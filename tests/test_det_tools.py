"""tools/eval_coco.py, tools/infer.py, checkpoint -> model rebuilding, and drawing detections."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from tools import eval_coco, infer
from tools.engine.coco_eval import METRIC_NAMES
from tools.engine.config import load_config
from tools.engine.det_config import DetTrainConfig
from heads.spec import load_detector
from tools.engine.det_train import train
from tools.engine.visualize import draw_detections, save_grid
from tools.reference_models import TINY_DET_TRAINING

# 0.02 diverges in these 6 steps (loss 4.7 -> 14), leaving a model that may detect nothing.
TINY = {**TINY_DET_TRAINING, "lr": 0.005, "warmup_iters": 0, "vis_images": 1}


@pytest.fixture(scope="module")
def trained(coco_shapes, tmp_path_factory) -> tuple[Path, dict]:
    """A Mask R-CNN trained for a few iterations: a checkpoint with our metadata, and its final metrics."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(DetTrainConfig, None, {**TINY, **coco_shapes, "detector": "mask_rcnn", "iters": 6,
                                             "output_dir": str(out)})
    return out, train(cfg)


def gt_as_results(ann_file: str) -> list[dict]:
    """Every non-crowd ground-truth object as a detection of score 1, with its mask as RLE."""
    data = json.loads(Path(ann_file).read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in data["images"]}
    results = []
    for ann in data["annotations"]:
        if ann["iscrowd"]:
            continue
        h, w = sizes[ann["image_id"]]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")}
        results.append({
            "image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        })
    return results


def test_eval_coco_results_mode_scores_ground_truth_as_perfect(coco_shapes, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(gt_as_results(coco_shapes["val_ann"])))
    assert eval_coco.main(["--results", str(results), "--val-ann", coco_shapes["val_ann"],
                           "--output-dir", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "per_category"} and set(metrics["per_category"]) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in capsys.readouterr().out  # the standard table

    # boxes only: bbox alone is scored
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in gt_as_results(coco_shapes["val_ann"])]
    results.write_text(json.dumps(boxes_only))
    assert eval_coco.main(["--results", str(results), "--val-ann", coco_shapes["val_ann"],
                           "--output-dir", str(tmp_path / "out2")]) == 0
    assert set(json.loads((tmp_path / "out2" / "metrics.json").read_text())) == {"bbox", "per_category"}


def test_eval_coco_rejects_missing_val_images(trained, coco_shapes, tmp_path, capsys):
    out, _ = trained
    assert eval_coco.main(["--weights", str(out / "model_final.pth"), "--val-ann", coco_shapes["val_ann"],
                           "--output-dir", str(tmp_path)]) == 2
    assert "--val-images" in capsys.readouterr().err


def test_eval_coco_weights_mode_rebuilds_model_from_checkpoint(trained, coco_shapes, tmp_path):
    out, metrics = trained
    assert eval_coco.main(["--weights", str(out / "model_final.pth"), "--val-images", coco_shapes["val_images"],
                           "--val-ann", coco_shapes["val_ann"], "--output-dir", str(tmp_path), "--workers", "0"]) == 0
    # same model (rebuilt without flags), same data: the numbers the training run reported
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: saved[k] for k in metrics} == metrics
    assert json.loads((tmp_path / "coco_results.json").read_text()) == json.loads(
        (out / "coco_results.json").read_text())


def test_eval_coco_bf16_stays_close_to_float32(trained, coco_shapes, tmp_path):
    out, metrics = trained
    assert eval_coco.main(["--weights", str(out / "model_final.pth"), "--val-images", coco_shapes["val_images"],
                           "--val-ann", coco_shapes["val_ann"], "--output-dir", str(tmp_path), "--workers", "0",
                           "--bf16"]) == 0
    bf16 = json.loads((tmp_path / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert bf16[iou_type]["AP50"] == pytest.approx(metrics[iou_type]["AP50"], abs=0.05)


def test_infer_and_eval_pass_bf16_and_compile_to_optimize_for_inference(trained, coco_shapes, tmp_path, monkeypatch):
    import backbones

    calls = []

    def record(model, **options):
        calls.append(options)
        return model

    monkeypatch.setattr(backbones, "optimize_for_inference", record)
    out, _ = trained
    image = str(sorted(Path(coco_shapes["val_images"]).glob("*.jpg"))[0])
    weights = str(out / "model_final.pth")
    assert infer.main([image, "--weights", weights, "--output-dir", str(tmp_path / "a")]) == 0
    assert calls == []  # default: the eval-mode model itself
    assert infer.main([image, "--weights", weights, "--output-dir", str(tmp_path / "b"), "--compile"]) == 0
    assert eval_coco.main(["--weights", weights, "--val-images", coco_shapes["val_images"], "--val-ann",
                           coco_shapes["val_ann"], "--output-dir", str(tmp_path / "c"), "--workers", "0",
                           "--bf16"]) == 0
    assert calls == [dict(bf16=False, compile=True), dict(bf16=True, compile=False)]


def test_infer_writes_pictures_and_json(trained, coco_shapes, tmp_path):
    out, _ = trained
    images = sorted(Path(coco_shapes["val_images"]).glob("*.jpg"))[:2]
    assert infer.main([*map(str, images), "--weights", str(out / "model_final.pth"), "--output-dir",
                       str(tmp_path), "--score-thresh", "0.0"]) == 0
    records = json.loads((tmp_path / "detections.json").read_text())
    assert [r["image"] for r in records] == [str(p) for p in images]
    for record, image in zip(records, images):
        png = Image.open(record["output"])
        with Image.open(image) as src:
            assert png.size[0] % src.size[0] == 0 and png.size[0] >= src.size[0]  # whole-number enlargement
        for det in record["detections"]:
            assert set(det) == {"box", "score", "label", "category_id", "category_name"}
            assert {det["label"]: det["category_id"]}.items() <= {1: 1, 2: 3, 3: 7}.items()
            assert det["category_name"] == ["circle", "rectangle", "triangle"][det["label"] - 1]
    assert sum(len(r["detections"]) for r in records) > 0

    # the threshold filters
    infer.main([str(images[0]), "--weights", str(out / "model_final.pth"), "--output-dir", str(tmp_path / "t"),
                "--score-thresh", "0.999"])
    kept = json.loads((tmp_path / "t" / "detections.json").read_text())[0]["detections"]
    assert all(d["score"] >= 0.999 for d in kept)


def test_load_detector_reads_torchvision_checkpoint_without_metadata(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    reference = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    model, info = load_detector(tmp_path / "tv.pth")
    spec = info["model_spec"]
    assert (spec["kind"], spec["variant"], spec["num_classes"], spec["backbone"]) == ("mask_rcnn", "v2", 5, "resnet50")
    assert info["label_to_cat_id"] is None and not model.training
    assert torch.equal(model.roi_heads.mask_predictor.mask_fcn_logits.weight,
                       reference.roi_heads.mask_predictor.mask_fcn_logits.weight)


def test_draw_detections_boxes_masks_and_threshold():
    image = torch.zeros(3, 40, 60)
    masks = torch.zeros(2, 1, 40, 60)
    masks[0, 0, 12:20, 12:20] = 1.0
    detections = {
        "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [35.0, 5.0, 55.0, 35.0]]),
        "labels": torch.tensor([1, 2]),
        "scores": torch.tensor([0.9, 0.2]),
        "masks": masks,
    }
    drawn = draw_detections(image, detections, ["circle", "rectangle"], score_thresh=0.5, min_side=0)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 40, 60)
    assert drawn[:, 10, 20].tolist() == [255, 0, 0]  # box edge of label 1 in its palette colour (red)
    assert drawn[0, 15, 15] > 0 and drawn[1:, 15, 15].sum() == 0  # mask tinted red
    assert drawn[:, 34, 45].sum() == 0  # the low-score box (bottom edge here) is not drawn

    enlarged = draw_detections(image, detections, None, score_thresh=0.5, min_side=80)
    assert enlarged.shape == (3, 80, 120)


def test_save_grid_pads_different_sizes(tmp_path):
    images = [torch.full((3, 10, 20), 100, dtype=torch.uint8), torch.full((3, 30, 15), 50, dtype=torch.uint8)]
    path = save_grid(images, tmp_path / "grid.png", ncol=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (30 + 8, 2 * 20 + 12, 3)  # padded to 30x20 each, 4 px borders
    with pytest.raises(ValueError):
        save_grid([], tmp_path / "empty.png")
