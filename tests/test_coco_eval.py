"""COCO evaluation: perfect detections, agreement with pycocotools run directly, empty and bad inputs."""
import contextlib
import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools.engine.coco_dataset import CocoDetection
from tools.engine.coco_results import detections_to_coco_results
from tools.engine.coco_eval import METRIC_NAMES, evaluate_coco, write_metrics
from tools.engine.coco_results import load_results, results_have_segm, validate_results
from tools.engine.coco_eval import score_results_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gt(coco_varied):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_varied["val_ann"]))


def _gt_as_results(gt):
    results = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        rle = gt.annToRLE(ann)
        rle = mask_utils.frPyObjects(rle, *rle["size"]) if isinstance(rle["counts"], list) else rle
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
                        "score": 1.0, "segmentation": {"size": list(rle["size"]), "counts": counts}})
    return results


def _direct(gt, results, iou_type):
    """pycocotools run by hand, the reference the wrapper must reproduce."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return list(evaluator.stats)


def test_ground_truth_as_detections_scores_one(gt, coco_varied, capsys):
    results = _gt_as_results(gt)
    before = copy.deepcopy(results)
    metrics = evaluate_coco(coco_varied["val_ann"], results, iou_types=("bbox", "segm"))
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert list(metrics[iou_type]) == list(METRIC_NAMES)
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0) and metrics[iou_type]["AR100"] == pytest.approx(1.0)
    assert results == before  # the caller's list is not modified
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 12 and out.count("Average Recall") == 12


def test_perturbed_detections_match_pycocotools(gt):
    rng = np.random.default_rng(0)
    results = []
    for res in _gt_as_results(gt):
        if rng.random() < 0.2:
            continue
        x, y, w, h = res["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
        results.append(dict(res, bbox=[x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)],
                            score=float(rng.random())))
    results.append({"image_id": results[0]["image_id"], "category_id": 3, "bbox": [0.0, 0.0, 10.0, 10.0],
                    "score": 0.99, "segmentation": results[0]["segmentation"]})  # a false positive
    metrics = evaluate_coco(gt, results, iou_types=("bbox",))
    expected = _direct(gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], "bbox")
    assert [metrics["bbox"][name] for name in METRIC_NAMES] == expected
    assert 0.2 < metrics["bbox"]["AP"] < 0.95

    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    for r in segm_only:  # perturb the masks too: erase a random fraction of the detections
        if rng.random() < 0.3:
            r["segmentation"] = results[0]["segmentation"]
    metrics = evaluate_coco(gt, segm_only, iou_types=("segm",))
    assert [metrics["segm"][name] for name in METRIC_NAMES] == _direct(gt, segm_only, "segm")
    assert metrics["segm"]["AP"] < 0.95


def test_dataset_round_trip_scores_one(coco_varied):
    """Targets -> torchvision-style outputs -> results with the dataset's sparse ids -> AP 1."""
    dataset = CocoDetection(coco_varied["val_images"], coco_varied["val_ann"])
    outputs, image_ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["boxes"])
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                        "scores": torch.ones(n), "masks": target["masks"][:, None].float()})
        image_ids.append(target["image_id"])
    results = detections_to_coco_results(outputs, image_ids, dataset.label_to_cat_id)
    metrics = evaluate_coco(dataset.coco, results, iou_types=("bbox", "segm"))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)

    as_labels = [dict(r, category_id=dataset.cat_id_to_label[r["category_id"]]) for r in results]
    with pytest.raises(ValueError, match="category ids"):  # labels 2, 3 are not dataset ids
        evaluate_coco(dataset.coco, as_labels)


def test_empty_results_give_zeros(gt, tmp_path):
    metrics = evaluate_coco(gt, [], iou_types=("bbox", "segm"))
    assert metrics == {t: dict.fromkeys(METRIC_NAMES, 0.0) for t in ("bbox", "segm")}
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert evaluate_coco(gt, path)["bbox"]["AP"] == 0.0


def test_results_file_and_metrics_file(gt, tmp_path):
    results = _gt_as_results(gt)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert load_results(path) == results
    metrics = evaluate_coco(gt, path)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    write_metrics(tmp_path / "out" / "metrics.json", metrics)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_results_file_of_masks_only_or_boxes_only(gt, coco_varied, tmp_path):
    """A results file is scored for the kinds every result carries; a mix without a common kind is refused."""
    results = _gt_as_results(gt)
    masks_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    for name, entries, kinds in (("masks", masks_only, {"segm"}), ("boxes", boxes_only, {"bbox"}),
                                 ("both", results, {"bbox", "segm"})):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(entries))
        metrics = score_results_file(path, coco_varied["val_ann"], tmp_path / name)
        assert set(metrics) == kinds and all(metrics[k]["AP"] == pytest.approx(1.0) for k in kinds)
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(masks_only[:3] + boxes_only[3:]))
    with pytest.raises(ValueError, match="only a box and others only a segmentation"):
        score_results_file(path, coco_varied["val_ann"], tmp_path / "mixed")
    with pytest.raises(ValueError, match="not every result has a 'bbox'"):
        evaluate_coco(gt, masks_only, iou_types=("bbox",))


def test_scoring_a_results_file_imports_no_torch(gt, coco_varied, tmp_path):
    """eval_coco.py --results skips the seconds that importing torch takes (BENCHMARKS.md, COCO evaluation)."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_gt_as_results(gt)))
    code = ("import sys; from tools import eval_coco; "
            f"rc = eval_coco.main(['--results', {str(path)!r}, '--val-ann', {str(coco_varied['val_ann'])!r}, "
            f"'--output-dir', {str(tmp_path / 'out')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split()[-2:] == ["0", "False"], done.stdout + done.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["segm"]["AP"] == pytest.approx(1.0)


def test_results_have_segm():
    box = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}
    segm = dict(box, segmentation={"size": [2, 2], "counts": "04"})
    assert results_have_segm([segm, segm]) and not results_have_segm([segm, box]) and not results_have_segm([])


@pytest.mark.parametrize("content, message", [
    ("{\"image_id\": 1}", "must be a JSON list"),
    ("[{\"image_id\": 1, \"category_id\": 1, \"bbox\": [0, 0, 1, 1]}]", "missing \\['score'\\]"),
    ("[{\"image_id\": 1, \"category_id\": 1, \"score\": 1}]", "bbox or segmentation"),
    ("[{\"image_id\": \"a\", \"category_id\": 1, \"score\": 1, \"bbox\": [0, 0, 1, 1]}]", "image_id must be"),
    ("[{\"image_id\": 1, \"category_id\": 1, \"score\": NaN, \"bbox\": [0, 0, 1, 1]}]", "score must be"),
    ("[{\"image_id\": 1, \"category_id\": 1, \"score\": 1, \"bbox\": [0, 0, 1]}]", "bbox must be"),
    ("[{\"image_id\": 1, \"category_id\": 1, \"score\": 1, \"bbox\": [0, 0, 1, 1]", "truncated JSON"),
])
def test_bad_results_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_results(path)
    assert str(path) in str(info.value)


def test_validation_of_large_result_lists():
    """Plain JSON results are checked a column at a time; anything else falls back to the entry-by-entry checks,
    which accept numpy numbers and name the first bad entry wherever it is."""
    box = {"image_id": 1, "category_id": 1, "bbox": [0, 0.5, 1, 2.5], "score": 0.5}
    segm = dict(box, segmentation={"size": [2, 2], "counts": "04"})
    good = [dict(box) for _ in range(500)] + [dict(segm) for _ in range(500)]
    assert validate_results(good) is good
    with_numpy = good + [{"image_id": np.int64(1), "category_id": 1, "bbox": [np.float32(0), 0, 1, 1],
                          "score": np.float64(0.5)}]
    assert validate_results(with_numpy) is with_numpy
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in good[500:]]
    assert validate_results(segm_only) is segm_only
    for bad, message in [(dict(box, score=float("inf")), "score must be"), (dict(box, score=10**400), "score must be"),
                         (dict(box, score=True), "score must be"), (dict(box, image_id=True), "image_id must be"),
                         (dict(box, category_id=1.0), "category_id must be"),
                         (dict(box, bbox=[0, 0, 1, True]), "bbox must be"), (dict(box, bbox=[0, 0, 1]), "bbox must be"),
                         (dict(box, bbox=[0, 0, 1, float("nan")]), "bbox must be"),
                         (dict(segm, segmentation={"size": [2, True], "counts": "04"}), "segmentation must be"),
                         (dict(segm, segmentation={"size": [2, 2], "counts": [0, 4]}), "segmentation must be"),
                         ({k: v for k, v in box.items() if k != "bbox"}, "bbox or segmentation"),
                         ({k: v for k, v in box.items() if k != "score"}, "missing"), ([1, 2], "not an object")]:
        with pytest.raises(ValueError, match=f"result #1000 .*{message}"):
            validate_results(good + [bad])


def test_bad_arguments(gt):
    results = [{k: v for k, v in r.items() if k != "segmentation"} for r in _gt_as_results(gt)]
    with pytest.raises(ValueError, match="segm"):
        evaluate_coco(gt, results, iou_types=("bbox", "segm"))
    with pytest.raises(ValueError, match="unknown iou type"):
        evaluate_coco(gt, results, iou_types=("keypoints",))
    with pytest.raises(ValueError, match="image ids absent"):
        evaluate_coco(gt, [dict(results[0], image_id=999_999)])
