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
import math
from numbers import Integral, Real
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Same order as COCOeval.stats.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                 "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_results(results: Any, source: str = "results") -> list[dict]:
    """Check that ``results`` is a list of COCO result dicts; raise ValueError naming ``source`` otherwise.

    Each entry needs an integer ``image_id`` and ``category_id``, a finite ``score``
    and a ``bbox`` of 4 numbers and/or a ``segmentation`` RLE dict (size, counts).
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a JSON list of objects, got {type(results).__name__}")
    for i, res in enumerate(results):
        if not isinstance(res, dict):
            raise ValueError(f"{source}: result #{i} is not an object: {res!r}")
        missing = [k for k in ("image_id", "category_id", "score") if k not in res]
        if "bbox" not in res and "segmentation" not in res:
            missing.append("bbox or segmentation")
        if missing:
            raise ValueError(f"{source}: result #{i} is missing {missing}")
        for key in ("image_id", "category_id"):
            if not isinstance(res[key], Integral) or isinstance(res[key], bool):
                raise ValueError(f"{source}: result #{i} {key} must be an integer, got {res[key]!r}")
        if not _is_number(res["score"]):
            raise ValueError(f"{source}: result #{i} score must be a finite number, got {res['score']!r}")
        bbox = res.get("bbox")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise ValueError(f"{source}: result #{i} bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        segm = res.get("segmentation")
        if segm is not None and not (isinstance(segm, dict) and isinstance(segm.get("counts"), str)
                                     and isinstance(segm.get("size"), list) and len(segm["size"]) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) for v in segm["size"])):
            raise ValueError(f"{source}: result #{i} segmentation must be a compressed RLE dict: size [height, width] "
                             "and counts a string")
    return results


def check_result_masks(results: Sequence[dict], gt: COCO) -> None:
    """Raise ValueError unless every result's segmentation is a valid RLE of its image's size.

    pycocotools would score a mask of another size, or undecodable counts, without complaint. For results
    read from a file (our own detections always fit); the run lengths are read in Python, so it takes a
    moment on large files.
    """
    from tools.engine.coco_data import _compressed_rle_length  # the same run-length check as the dataset's

    for i, res in enumerate(results):
        img = gt.imgs.get(res["image_id"])
        if img is None:
            continue  # evaluate_coco names results for unknown images
        size, counts = res["segmentation"]["size"], res["segmentation"]["counts"]
        if size != [img["height"], img["width"]] or _compressed_rle_length(counts) != size[0] * size[1]:
            raise ValueError(f"result #{i} segmentation is not a valid RLE of image id {res['image_id']}'s size "
                             f"{img['height']}x{img['width']} (size {size})")


def load_results(path: str | Path) -> list[dict]:
    """Read and validate a COCO results JSON file (see :func:`validate_results`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: results file is not valid UTF-8 (bad byte at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid or truncated JSON at line {err.lineno} column {err.colno}: "
                         f"{err.msg}") from None
    return validate_results(data, str(path))


def results_have_segm(results: Sequence[dict]) -> bool:
    """True when there is at least one result and every result has a segmentation."""
    return bool(results) and all(r.get("segmentation") is not None for r in results)


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
