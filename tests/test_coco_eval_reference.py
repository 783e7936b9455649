"""The evaluation backend (faster-coco-eval) against pycocotools' COCOeval, the reference, on every test set.

For bbox and segm: the 12 numbers, AP per category and the whole precision array agree to 1e-6, on the shapes sets,
both synthetic styles and a set built for the edge cases (crowd regions under detections, empty images, images and
categories without detections, detections of a category without ground truth, id gaps, more than 100 detections on
an image, tied scores, objects on the small/medium/large borders, an "ignore" flag that pycocotools overrides).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools.engine.coco_eval import METRIC_NAMES, evaluate_coco_details
from tools.engine.synthetic_sets import make_det_set

TOLERANCE = 1e-6


def _coco(data: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
    return gt


def _read(path) -> COCO:
    return _coco(json.loads(Path(path).read_text()))


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _noisy_results(gt: COCO, seed: int) -> list[dict]:
    """Moved and missed ground truth, wrong classes, duplicates, background boxes; scores random with ties."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(gt.getCatIds())
    results = []
    for ann in gt.dataset["annotations"]:
        img = gt.imgs[ann["image_id"]]
        if rng.random() < 0.15:
            continue  # missed
        mask = gt.annToMask(ann)
        for _ in range(int(rng.integers(1, 3))):
            shift = rng.integers(-3, 4, size=2)
            moved = np.roll(mask, tuple(shift[::-1]), axis=(0, 1))
            box = np.asarray(ann["bbox"], dtype=float) + [shift[0], shift[1], 0, 0] + rng.normal(0, 1, 4)
            category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids))
            score = round(float(rng.random()), 1) if rng.random() < 0.3 else float(rng.random())
            results.append({"image_id": img["id"], "category_id": category, "score": score,
                            "bbox": [float(box[0]), float(box[1]), max(float(box[2]), 1.0), max(float(box[3]), 1.0)],
                            "segmentation": _rle(moved)})
    for img in gt.dataset["images"]:
        if rng.random() < 0.3:
            continue  # an image without detections
        for _ in range(int(rng.integers(1, 4))):
            w, h = rng.uniform(2, img["width"] / 2), rng.uniform(2, img["height"] / 2)
            x, y = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            mask = np.zeros((img["height"], img["width"]), dtype=np.uint8)
            mask[int(y):int(y + h), int(x):int(x + w)] = 1
            results.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                            "score": float(rng.random()), "bbox": [x, y, w, h], "segmentation": _rle(mask)})
    return results


def _reference(gt: COCO, results: list[dict], iou_type: str) -> COCOeval:
    """pycocotools run by hand (boxes dropped for segm, so that the mask area decides the size range)."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    entries = [{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(entries), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _assert_matches_pycocotools(gt: COCO, results: list[dict], iou_types=("bbox", "segm")) -> None:
    before = copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        ours = evaluate_coco_details(gt, results, iou_types)
    assert results == before  # the caller's results are not modified
    for iou_type in iou_types:
        reference = _reference(gt, results, iou_type)
        expected = np.asarray(reference.stats)
        got = np.array([ours.metrics[iou_type][name] for name in METRIC_NAMES])
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE, err_msg=iou_type)
        precision = reference.eval["precision"]
        assert ours.precision[iou_type].shape == precision.shape
        np.testing.assert_allclose(ours.precision[iou_type], precision, rtol=0, atol=TOLERANCE, err_msg=iou_type)
        for k, key in enumerate(ours.category_names):  # AP per category, as COCOeval.summarize averages
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            if values.size == 0:
                assert ours.per_category[iou_type][key] is None
            else:
                assert ours.per_category[iou_type][key] == pytest.approx(float(values.mean()), abs=TOLERANCE)
        assert 0.0 < ours.metrics[iou_type]["AP"] < 1.0  # a real test: neither nothing nor everything matched


@pytest.mark.parametrize("fixture", ["coco_shapes", "coco_varied"])
def test_shapes_sets_match_pycocotools(fixture, request):
    gt = _read(request.getfixturevalue(fixture)["val_ann"])
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])
    _assert_matches_pycocotools(gt, _noisy_results(gt, seed=1))


@pytest.mark.parametrize("style", ["tune", "measure"])
def test_synthetic_sets_match_pycocotools(style, tmp_path):
    paths = make_det_set(tmp_path / style, style, num_train=1, num_val=5, seed=2, image_size=(64, 112))
    gt = _read(paths["val_ann"])
    assert any(a["iscrowd"] for a in gt.dataset["annotations"])
    _assert_matches_pycocotools(gt, _noisy_results(gt, seed=2))


def _edge_case_set() -> tuple[COCO, list[dict]]:
    """Ground truth and detections that reach the corners of COCOeval's rules."""
    rng = np.random.default_rng(0)
    height, width = 120, 160
    images = [{"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}
              for image_id in (3, 10, 11, 57, 58, 900)]  # 11: no annotations; 58: no detections
    categories = [{"id": c, "name": f"class {c}"} for c in (2, 5, 40, 41)]  # 40: no detections; 41: no ground truth
    annotations, results = [], []

    def add(image_id: int, category: int, box: list[float], crowd: int = 0, **extra) -> None:
        x, y, w, h = box
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        rle = mask_utils.frPyObjects([polygon], height, width)[0]
        segmentation = ({"size": [height, width], "counts": rle["counts"].decode("ascii")} if crowd else [polygon])
        annotations.append({"id": 10 * len(annotations) + 7, "image_id": image_id, "category_id": category,
                            "bbox": box, "area": float(w * h), "iscrowd": crowd, "segmentation": segmentation,
                            **extra})

    add(3, 2, [10, 10, 32, 32])        # area 32² exactly: small and medium both include it
    add(3, 2, [60, 20, 48, 64])
    add(3, 5, [5, 60, 96, 96 - 60])
    add(10, 5, [0, 0, 96, 96])         # area 96² exactly
    add(10, 2, [100, 10, 50, 90], crowd=1)
    add(10, 2, [110, 20, 20, 20])
    add(57, 5, [20, 20, 40, 30], ignore=1)  # pycocotools replaces "ignore" with iscrowd
    add(57, 40, [70, 40, 60, 60])
    add(58, 2, [30, 30, 50, 50])
    add(900, 5, [40, 30, 30, 30])

    def detect(image_id: int, category: int, box: list[float], score: float) -> None:
        x, y, w, h = box
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[int(y):int(y + h), int(x):int(x + w)] = 1
        results.append({"image_id": image_id, "category_id": category, "bbox": [float(v) for v in box],
                        "score": score, "segmentation": _rle(mask)})

    detect(3, 2, [11, 10, 31, 33], 0.9)
    detect(3, 2, [11, 10, 31, 33], 0.9)  # a duplicate with the same score
    detect(3, 2, [60, 22, 46, 60], 0.5)
    detect(3, 5, [5, 62, 90, 30], 0.5)   # tied with the one above, another category
    detect(10, 5, [2, 1, 92, 95], 0.7)
    for _ in range(6):                    # detections on the crowd region: matched to it, ignored
        detect(10, 2, [102 + rng.uniform(0, 5), 12 + rng.uniform(0, 5), 40, 80], float(rng.random()))
    detect(10, 2, [111, 21, 19, 19], 0.3)
    detect(11, 2, [1, 1, 20, 20], 0.95)   # on an image without ground truth
    detect(11, 41, [40, 40, 20, 20], 0.6)  # a category without ground truth
    detect(57, 5, [20, 21, 40, 29], 0.8)
    for k in range(130):                  # more than 100 detections on one image, many tied scores
        x, y = rng.uniform(0, 120), rng.uniform(0, 80)
        detect(900, 5, [x, y, rng.uniform(5, 40), rng.uniform(5, 40)], 0.25 if k % 3 == 0 else float(rng.random()))
    detect(900, 5, [40, 31, 30, 29], 0.25)  # the true match, tied with a third of the others, after the 100th
    return _coco({"images": images, "annotations": annotations, "categories": categories}), results


def test_edge_cases_match_pycocotools():
    gt, results = _edge_case_set()
    _assert_matches_pycocotools(gt, results)
    # max-dets edges: as many detections as each limit, and one more
    for count in (1, 10, 11, 100, 101):
        subset = [r for r in results if r["image_id"] == 900][:count] + [r for r in results if r["image_id"] != 900]
        _assert_matches_pycocotools(gt, subset, ("bbox",))
