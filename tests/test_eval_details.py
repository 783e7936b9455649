"""AP per category and precision-recall curves: agreement with pycocotools run per category, metrics.json, pictures."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools import eval_coco
from tools.engine.coco_dataset import CocoDetection
from tools.engine.coco_eval import METRIC_NAMES, category_keys, evaluate_coco, evaluate_coco_details
from tools.engine.config import load_config
from tools.engine.det_config import DetTrainConfig, model_spec
from tools.engine.coco_eval import write_eval
from tools.engine.det_eval import evaluate
from tools.engine.det_loader import build_det_loader
from heads.spec import build_from_spec
from tools.engine.plots import plot_pr_curves
from tools.engine.shapes import make_shapes_coco
from tools.reference_models import TINY_DETECTOR

NAMES = {1: "circle", 3: "rectangle", 7: "triangle", 9: "hexagon"}  # hexagon: added below, without ground truth
# matplotlib's first colours (the averaged curves at IoU 0.50, 0.75 and 0.50:0.95), as RGB
CURVE_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    paths = make_shapes_coco(tmp_path_factory.mktemp("coco"), num_train=1, num_val=12, image_size=(48, 72), seed=3)
    data = json.loads(paths["val_ann"].read_text())
    data["categories"].append({"id": 9, "name": "hexagon", "supercategory": "shape"})
    paths["val_ann"].write_text(json.dumps(data))
    return paths


@pytest.fixture(scope="module")
def gt(paths) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(paths["val_ann"]))


@pytest.fixture(scope="module")
def noisy_results(gt) -> list[dict]:
    """Ground truth moved, some of it missed, with random scores and some false positives: APs strictly in (0, 1)."""
    rng = np.random.default_rng(0)
    results = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.2:
            continue
        img = gt.imgs[ann["image_id"]]
        shift = rng.integers(-3, 4, size=2)
        mask = np.roll(gt.annToMask(ann), tuple(shift[::-1]), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        box = np.asarray(ann["bbox"], dtype=float) + [shift[0], shift[1], 0, 0] + rng.normal(0, 1, 4)
        for category in (ann["category_id"], int(rng.choice([1, 3, 7]))):  # the right class, and a guess
            results.append({"image_id": img["id"], "category_id": category, "bbox": box.tolist(),
                            "score": float(rng.random()),
                            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    return results


def _ap_of_one_category(gt: COCO, results: list[dict], iou_type: str, cat_id: int) -> float:
    """pycocotools run by hand on one category: the reference for per-category AP."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    entries = [{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(entries), iou_type)
        evaluator.params.catIds = [cat_id]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def _curve_pixels(png: Path) -> list[int]:
    """How many pixels of each averaged curve's colour the picture holds."""
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return [int((np.abs(pixels - colour).sum(axis=1) < 30).sum()) for colour in CURVE_COLOURS]


def test_per_category_ap_equals_pycocotools_run_per_category(gt, noisy_results, capsys):
    details = evaluate_coco_details(gt, noisy_results, ("bbox", "segm"))
    assert details.metrics == evaluate_coco(gt, noisy_results, ("bbox", "segm"))  # same 12 numbers as before
    assert "Average Precision" in capsys.readouterr().out
    assert details.cat_ids == [1, 3, 7, 9] and details.category_names == [NAMES[c] for c in details.cat_ids]
    for iou_type in ("bbox", "segm"):
        per_category = details.per_category[iou_type]
        assert list(per_category) == ["circle", "rectangle", "triangle", "hexagon"]
        assert per_category["hexagon"] is None  # no ground truth: pycocotools has no value (-1)
        assert _ap_of_one_category(gt, noisy_results, iou_type, 9) == -1.0
        for cat_id in (1, 3, 7):
            expected = _ap_of_one_category(gt, noisy_results, iou_type, cat_id)
            assert 0.0 < expected < 1.0
            assert per_category[NAMES[cat_id]] == pytest.approx(expected, abs=1e-6)
        # the overall AP is the mean over the categories that have ground truth
        known = [v for v in per_category.values() if v is not None]
        assert details.metrics[iou_type]["AP"] == pytest.approx(np.mean(known), abs=1e-9)
        assert details.precision[iou_type].shape == (10, 101, 4, 4, 3)
        assert (details.precision[iou_type][:, :, 3] == -1).all()
    assert list(details.iou_thresholds) == pytest.approx(np.linspace(0.5, 0.95, 10))
    assert len(details.recall_thresholds) == 101


def test_a_category_with_ground_truth_and_no_detection_scores_zero(gt, noisy_results):
    without_circles = [r for r in noisy_results if r["category_id"] != 1]
    per_category = evaluate_coco_details(gt, without_circles).per_category["bbox"]
    assert per_category["circle"] == 0.0 and per_category["hexagon"] is None
    assert per_category["rectangle"] == pytest.approx(_ap_of_one_category(gt, without_circles, "bbox", 3), abs=1e-6)


def test_no_results_give_zero_per_category_and_zero_curves(gt):
    details = evaluate_coco_details(gt, [], ("bbox", "segm"))
    assert details.metrics["segm"] == dict.fromkeys(METRIC_NAMES, 0.0)
    assert details.per_category["segm"] == {"circle": 0.0, "rectangle": 0.0, "triangle": 0.0, "hexagon": None}
    precision = details.precision["bbox"]
    assert precision.shape == (10, 101, 4, 4, 3)
    assert (precision[:, :, :3, 0] == 0).all() and (precision[:, :, 3] == -1).all()


def test_categories_sharing_a_name_get_distinct_keys(gt):
    dup = COCO()
    dup.dataset = copy.deepcopy(gt.dataset)
    dup.dataset["categories"] = [dict(c, name="shape") if c["id"] in (3, 7) else c for c in dup.dataset["categories"]]
    with contextlib.redirect_stdout(io.StringIO()):
        dup.createIndex()
    assert category_keys(dup) == ["circle", "shape (id 3)", "shape (id 7)", "hexagon"]


def test_pr_curves_picture_has_every_curve(gt, noisy_results, tmp_path):
    details = evaluate_coco_details(gt, noisy_results, ("bbox", "segm"))
    png = plot_pr_curves(details, tmp_path / "sub" / "pr.png")
    with Image.open(png) as image:
        assert image.size == (1100, 840)  # two rows (bbox, segm), two panels each
    assert all(count > 200 for count in _curve_pixels(png))  # curves drawn in the first three colours
    with pytest.raises(ValueError, match="at least one IoU type"):
        plot_pr_curves(evaluate_coco_details(gt, noisy_results, ()), tmp_path / "none.png")


def test_eval_coco_results_mode_writes_per_category_and_curves(paths, gt, noisy_results, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(noisy_results))
    out = tmp_path / "out"
    assert eval_coco.main(["--results", str(results), "--val-ann", str(paths["val_ann"]),
                           "--output-dir", str(out)]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"bbox", "segm", "per_category"}
    details = evaluate_coco_details(gt, noisy_results, ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        assert set(saved[iou_type]) == set(METRIC_NAMES)
        assert saved[iou_type] == pytest.approx(details.metrics[iou_type])
        assert saved["per_category"][iou_type]["hexagon"] is None  # JSON null
        assert saved["per_category"][iou_type] == pytest.approx(details.per_category[iou_type])
    assert all(count > 200 for count in _curve_pixels(out / "pr_curves.png"))


def test_evaluation_during_training_writes_per_category_and_curves(paths, tmp_path):
    """What the trainer's ``run_eval`` calls: :func:`evaluate` then :func:`write_eval`."""
    cfg = load_config(DetTrainConfig, None, {**TINY_DETECTOR, "min_sizes": [48], "max_size": 64, "workers": 0,
                                             **{k: str(v) for k, v in paths.items()}})
    torch.manual_seed(0)
    model = build_from_spec(model_spec(cfg, num_classes=5))
    val_set = CocoDetection(paths["val_images"], paths["val_ann"], None)
    loader = build_det_loader(val_set, 4, train=False, workers=0)
    evaluation, results = evaluate(model, loader, val_set, torch.device("cpu"))
    assert results and set(evaluation.metrics) == {"bbox"}
    write_eval(tmp_path, evaluation, results)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["bbox"] == evaluation.metrics["bbox"]
    assert set(saved["per_category"]["bbox"]) == {"circle", "rectangle", "triangle", "hexagon"}
    for name, cat_id in (("circle", 1), ("rectangle", 3), ("triangle", 7)):
        with contextlib.redirect_stdout(io.StringIO()):
            expected = _ap_of_one_category(val_set.coco, results, "bbox", cat_id)
        assert saved["per_category"]["bbox"][name] == pytest.approx(expected, abs=1e-6)
    assert json.loads((tmp_path / "coco_results.json").read_text()) == results
    assert (tmp_path / "pr_curves.png").stat().st_size > 10_000
