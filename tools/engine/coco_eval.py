"""COCO evaluation: metrics as plain dicts, empty results handled, inputs checked.

The numbers are pycocotools' COCOeval's (the reference the tests hold this module to, to 1e-6); the work is done by
``faster-coco-eval``, which runs COCOeval's per-image matching and accumulation in C++ (BENCHMARKS.md, COCO
evaluation rows). The ground truth stays a pycocotools ``COCO`` at this API.

Example:
    >>> metrics = evaluate_coco(val_set.coco, results, iou_types=("bbox", "segm"))
    >>> metrics["bbox"]["AP"]          # fraction in [0, 1], as pycocotools reports it
    >>> write_metrics("out/metrics.json", metrics)
    >>> details = evaluate_coco_details(val_set.coco, results, iou_types=("bbox",))
    >>> details.per_category["bbox"]   # {"circle": 0.71, ...}
    >>> write_metrics("out/metrics.json", details.to_json())
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from faster_coco_eval.core.mask import area as mask_area
from faster_coco_eval.core.mask import toBbox as mask_to_bbox
from pycocotools.coco import COCO
from pycocotools.cocoeval import Params

from tools.engine.coco_annotations import checked_coco
from tools.engine.coco_results import check_result_masks, load_results, results_have_segm, validate_results

__all__ = ["METRIC_NAMES", "IOU_TYPES", "CocoEvaluation", "evaluate_coco", "evaluate_coco_details",
           "category_keys", "write_metrics", "write_eval", "score_results_file"]

logger = logging.getLogger(__name__)

# Same order as COCOeval.stats.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


@dataclass
class CocoEvaluation:
    """Everything one COCOeval run per IoU type yields: the 12 numbers, AP per category and the precision arrays.

    Attributes:
        metrics: ``{iou_type: {name: value}}`` for each name in :data:`METRIC_NAMES` (what
            :func:`evaluate_coco` returns).
        per_category: ``{iou_type: {category key: AP or None}}``: AP@[.50:.95], area "all", 100 detections,
            the mean of the category's entries of ``precision``. ``None`` for a category without (non-crowd)
            ground truth, where pycocotools has no value (-1); 0.0 for one with ground truth and no detection.
        precision: ``{iou_type: array [T, R, K, A, M]}``, COCOeval's ``eval["precision"]``: precision at IoU
            threshold t, recall threshold r, category k (order of ``cat_ids``), area range a (all, small,
            medium, large) and detection limit m (1, 10, 100); -1 where the category has no ground truth.
        iou_thresholds: [T] (0.50, 0.55, ..., 0.95).
        recall_thresholds: [R] (0, 0.01, ..., 1).
        cat_ids: the ground truth's category ids in id order, the K axis of ``precision``.
        category_names: the key of each of ``cat_ids`` in ``per_category`` (see :func:`category_keys`).
    """

    metrics: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, float | None]]
    precision: dict[str, np.ndarray]
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    cat_ids: list[int]
    category_names: list[str]

    def to_json(self) -> dict:
        """The ``metrics.json`` layout: ``{"bbox": {12 numbers}, "segm"?: {...}, "per_category": {"bbox": {name: AP
        or null}, "segm"?: {...}}}``."""
        return {**self.metrics, "per_category": self.per_category}


def _load_gt(coco_gt: COCO | str | Path) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_gt))


def category_keys(gt: COCO) -> list[str]:
    """The name of each ground-truth category in id order; a name shared by several categories gets its id
    appended (``"cat (id 7)"``) so that no two keys collide."""
    cat_ids = sorted(gt.getCatIds())
    names = [str(gt.cats[c].get("name", c)) for c in cat_ids]
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name} (id {cat_id})" for name, cat_id in zip(names, cat_ids)]


def _per_category_ap(precision: np.ndarray, keys: Sequence[str]) -> dict[str, float | None]:
    """AP@[.50:.95] per category from ``precision`` [T, R, K, A, M], area "all" (0), 100 detections (last):
    the mean over IoU and recall thresholds of the entries > -1, as ``COCOeval.summarize`` computes AP."""
    per_category: dict[str, float | None] = {}
    for k, key in enumerate(keys):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        per_category[key] = float(values.mean()) if values.size else None
    return per_category


def _empty_precision(gt: COCO, params: Params) -> np.ndarray:
    """The precision array of an evaluation without detections: 0 where ground truth exists, else -1.

    "Exists" as COCOeval decides it: a non-crowd, non-ignored object of the category whose area is in the range.
    """
    shape = (len(params.iouThrs), len(params.recThrs), len(params.catIds), len(params.areaRng), len(params.maxDets))
    precision = np.full(shape, -1.0)
    for k, cat_id in enumerate(params.catIds):
        areas = [ann["area"] for ann in gt.loadAnns(gt.getAnnIds(catIds=[cat_id]))
                 if not ann.get("iscrowd", 0) and not ann.get("ignore", 0)]
        for a, (low, high) in enumerate(params.areaRng):
            if any(low <= area <= high for area in areas):
                precision[:, :, k, a] = 0.0
    return precision


def evaluate_coco(coco_gt: COCO | str | Path, results: list[dict] | str | Path,
                  iou_types: Sequence[str] = ("bbox",)) -> dict[str, dict[str, float]]:
    """Run COCOeval for each IoU type; print the standard summary and return the 12 stats.

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco`` or an annotation file path.
        results: COCO result dicts (or a results file path). Category ids are the
            dataset's own ids, not contiguous labels.
        iou_types: any of ``"bbox"``, ``"segm"``.

    Returns:
        ``{iou_type: {name: value}}`` for each name in :data:`METRIC_NAMES`, values as
        fractions. No results gives all zeros.

    Raises:
        ValueError: unknown IoU type, "segm" without segmentations or "bbox" without boxes in the results,
            results naming image or category ids absent from the ground truth.
    """
    return evaluate_coco_details(coco_gt, results, iou_types).metrics


def evaluate_coco_details(coco_gt: COCO | str | Path, results: list[dict] | str | Path,
                          iou_types: Sequence[str] = ("bbox",)) -> CocoEvaluation:
    """:func:`evaluate_coco` plus AP per category and the precision arrays, from the same COCOeval run.

    Same arguments, checks and printed table as :func:`evaluate_coco`; see :class:`CocoEvaluation` for what is
    returned. No results: the 12 numbers are zeros, every category with ground truth has AP 0.0.

    Example:
        >>> details = evaluate_coco_details("instances_val.json", "coco_results.json", ("bbox", "segm"))
        >>> details.per_category["segm"]["person"]
    """
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown iou type {iou_type!r}; valid: {IOU_TYPES}")
    if isinstance(results, (str, Path)):
        results = load_results(results)
    else:
        results = validate_results(results)
    if "segm" in iou_types and results and not results_have_segm(results):
        raise ValueError("iou_types includes 'segm' but not every result has a 'segmentation'")
    if "bbox" in iou_types and any(r.get("bbox") is None for r in results):
        raise ValueError("iou_types includes 'bbox' but not every result has a 'bbox'")
    gt = _load_gt(coco_gt)

    unknown_images = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown_images:
        raise ValueError(f"results name {len(unknown_images)} image ids absent from the ground truth, e.g. "
                         f"{sorted(unknown_images)[:5]}")
    unknown_cats = {r["category_id"] for r in results} - set(gt.getCatIds())
    if unknown_cats:
        raise ValueError(f"results use category ids {sorted(unknown_cats)[:10]} absent from the ground truth "
                         f"(valid: {sorted(gt.getCatIds())}); were contiguous labels written instead of ids?")

    keys = category_keys(gt)
    evaluation_gt = _evaluation_gt(gt) if results else None
    params = Params("bbox")
    params.imgIds, params.catIds = sorted(gt.getImgIds()), sorted(gt.getCatIds())
    evaluation = CocoEvaluation({}, {}, {}, params.iouThrs, params.recThrs, list(params.catIds), keys)
    for iou_type in iou_types:
        if not results:
            # Nothing detected scores zero everywhere (pycocotools' loadRes fails on an empty list).
            evaluation.metrics[iou_type] = dict.fromkeys(METRIC_NAMES, 0.0)
            precision = _empty_precision(gt, params)
        else:
            evaluator = _run_cocoeval(evaluation_gt, results, iou_type)
            # COCOeval reports -1 where no ground truth exists (e.g. no small objects); keep it.
            evaluation.metrics[iou_type] = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
            precision = evaluator.eval["precision"]
        evaluation.precision[iou_type] = precision
        evaluation.per_category[iou_type] = _per_category_ap(precision, keys)
    return evaluation


def _evaluation_gt(gt: COCO) -> FasterCOCO:
    """``gt`` as faster-coco-eval's COCO. Each annotation is a shallow copy: the evaluator writes into them (the
    ``ignore`` flag, the mask's RLE), and the caller's ground truth stays as it was."""
    dataset = {**gt.dataset, "annotations": [dict(ann) for ann in gt.dataset.get("annotations", [])]}
    return FasterCOCO(dataset)


def _detections(gt: FasterCOCO, results: list[dict], iou_type: str) -> FasterCOCO:
    """The results as the detections COCO that pycocotools' ``loadRes`` makes of them, built in one pass.

    Each detection gets an ``id`` from 1 in results order, ``iscrowd`` 0 and an ``area``: the box's for ``bbox``;
    the mask's for ``segm`` (with the box taken from the mask, as ``loadRes`` does for results without one), so
    that the mask decides small/medium/large, as in the official protocol. New dicts: the caller's results stay
    as they were. ``loadRes`` itself copies and edits one result at a time and adds a box polygon ``bbox``
    evaluation never reads (seconds on 200,000 results).
    """
    if iou_type == "segm":
        segmentations = [r["segmentation"] for r in results]
        areas = mask_area(segmentations).tolist()
        boxes = mask_to_bbox(segmentations).tolist()
        annotations = [{"id": i, "image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                        "segmentation": r["segmentation"], "area": area, "bbox": box, "iscrowd": 0}
                       for i, (r, area, box) in enumerate(zip(results, areas, boxes), start=1)]
    else:
        annotations = [{"id": i, "image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
                        "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
                       for i, r in enumerate(results, start=1)]
    return FasterCOCO({"images": gt.dataset.get("images", []), "categories": gt.dataset.get("categories", []),
                       "annotations": annotations})


def _run_cocoeval(gt: FasterCOCO, results: list[dict], iou_type: str) -> COCOeval_faster:
    """COCOeval evaluated, accumulated and summarized (pycocotools' 12-line table printed) for one IoU type."""
    lines: list[str] = []
    evaluator = COCOeval_faster(gt, _detections(gt, results, iou_type), iou_type, print_function=lambda *_: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.print_function = lines.append
    evaluator.summarize()
    # faster-coco-eval appends AR@0.50 and AR@0.75 to the table; print pycocotools' 12 lines only.
    print(f"COCO {iou_type} evaluation:")
    print("\n".join(lines[:len(METRIC_NAMES)]))
    return evaluator


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Write metrics (e.g. :meth:`CocoEvaluation.to_json`) as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_eval(out: Path, evaluation: CocoEvaluation, results: list[dict] | None,
               extra: dict[str, Any] | None = None) -> None:
    """Write ``coco_results.json`` (unless ``results`` is None), ``metrics.json`` (``extra`` keys added) and
    ``pr_curves.png`` into ``out``."""
    from tools.engine.plots import plot_pr_curves  # matplotlib: only where a picture is drawn

    out.mkdir(parents=True, exist_ok=True)
    if results is not None:
        (out / "coco_results.json").write_text(json.dumps(results))
    write_metrics(out / "metrics.json", {**evaluation.to_json(), **(extra or {})})
    plot_pr_curves(evaluation, out / "pr_curves.png")


def score_results_file(results: str | Path, val_ann: str | Path, output_dir: str | Path,
                       allow_outside_root: bool = False) -> dict[str, dict[str, float]]:
    """Score an existing COCO results file: ``bbox`` when every result has a box, ``segm`` when every result has a
    segmentation (the body of ``tools/eval_coco.py --results``, which imports no torch).

    The ground truth goes through the same checks as in training
    (:func:`tools.engine.coco_annotations.checked_coco`, as :class:`tools.engine.coco_dataset.CocoDetection` does).
    Prints the table and writes ``OUTPUT_DIR/metrics.json`` and ``OUTPUT_DIR/pr_curves.png``; returns the 12
    numbers per IoU type.
    """
    entries = load_results(results)
    segm = results_have_segm(entries)
    gt, checked = checked_coco(val_ann, Path(val_ann).parent, with_masks=segm, allow_outside_root=allow_outside_root)
    dropped = ", ".join(f"{k}={v}" for k, v in checked.dropped.items() if v)
    logger.log(logging.WARNING if dropped or checked.clipped else logging.INFO,
               "%s: %d images, %d annotations kept; dropped: %s; clipped boxes: %d", val_ann, len(gt.imgs),
               len(gt.anns), dropped or "none", checked.clipped)
    try:
        if segm:
            check_result_masks(entries, gt)
        boxes = not entries or all(r.get("bbox") is not None for r in entries)
        iou_types = (("bbox",) if boxes else ()) + (("segm",) if segm else ())
        if not iou_types:
            raise ValueError("some results have only a box and others only a segmentation; give every result a "
                             "'bbox', or every result a 'segmentation'")
        evaluation = evaluate_coco_details(gt, entries, iou_types)
    except ValueError as e:
        raise ValueError(f"{results}: {e}") from None
    write_eval(Path(output_dir), evaluation, None)
    return evaluation.metrics
