"""COCO evaluation with pycocotools: metrics as plain dicts, empty results handled, inputs checked.

Example:
    >>> metrics = evaluate_coco(val_set.coco, results, iou_types=("bbox", "segm"))
    >>> metrics["bbox"]["AP"]          # fraction in [0, 1], as pycocotools reports it
    >>> write_metrics("out/metrics.json", metrics)
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools.engine.coco_results import load_results, results_have_segm, validate_results

# Same order as COCOeval.stats.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def _load_gt(coco_gt: COCO | str | Path) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_gt))


def evaluate_coco(coco_gt: COCO | str | Path, results: list[dict] | str | Path,
                  iou_types: Sequence[str] = ("bbox",)) -> dict[str, dict[str, float]]:
    """Run pycocotools COCOeval for each IoU type; print the standard summary and return the 12 stats.

    Args:
        coco_gt: ground truth, e.g. ``CocoDetection.coco`` or an annotation file path.
        results: COCO result dicts (or a results file path). Category ids are the
            dataset's own ids, not contiguous labels.
        iou_types: any of ``"bbox"``, ``"segm"``.

    Returns:
        ``{iou_type: {name: value}}`` for each name in :data:`METRIC_NAMES`, values as
        fractions. No results gives all zeros.

    Raises:
        ValueError: unknown IoU type, "segm" without segmentations in the results,
            results naming image or category ids absent from the ground truth.
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
    gt = _load_gt(coco_gt)

    unknown_images = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown_images:
        raise ValueError(f"results name {len(unknown_images)} image ids absent from the ground truth, e.g. "
                         f"{sorted(unknown_images)[:5]}")
    unknown_cats = {r["category_id"] for r in results} - set(gt.getCatIds())
    if unknown_cats:
        raise ValueError(f"results use category ids {sorted(unknown_cats)[:10]} absent from the ground truth "
                         f"(valid: {sorted(gt.getCatIds())}); were contiguous labels written instead of ids?")

    metrics: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if not results:
            # pycocotools' loadRes fails on an empty list; nothing detected scores zero everywhere.
            metrics[iou_type] = dict.fromkeys(METRIC_NAMES, 0.0)
            continue
        # loadRes edits its input (adds area, id, a box polygon), so give it copies. For masks,
        # drop the box so that pycocotools takes the mask area for small/medium/large, as the
        # official protocol does.
        if iou_type == "segm":
            entries = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        else:
            entries = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(entries)
        evaluator = COCOeval(gt, dt, iou_type)
        print(f"COCO {iou_type} evaluation:")
        with contextlib.redirect_stdout(io.StringIO()):  # per-step timing chatter
            evaluator.evaluate()
            evaluator.accumulate()
        evaluator.summarize()
        # pycocotools reports -1 where no ground truth exists (e.g. no small objects); keep it.
        metrics[iou_type] = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    return metrics


def write_metrics(path: str | Path, metrics: dict[str, dict[str, float]]) -> None:
    """Write metrics as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
