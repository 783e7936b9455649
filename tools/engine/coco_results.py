"""COCO results: made from detections, read from files, and checked before scoring."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tools.engine.coco_annotations import compressed_rle_length
from tools.engine.values import finite_number, read_json

if TYPE_CHECKING:  # the results-file path (tools/eval_coco.py --results) runs without importing torch
    import torch

__all__ = ["detections_to_coco_results", "validate_results", "check_result_masks", "load_results", "results_have_segm"]


def detections_to_coco_results(outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                               label_to_cat_id: dict[int, int], *, mask_threshold: float = 0.5) -> list[dict]:
    """Convert torchvision-style detections into COCO result dicts.

    Args:
        outputs: per image ``boxes`` (N x 4 XYXY), ``scores`` (N), ``labels`` (N, 1..K)
            and optionally ``masks`` (N x 1 x H x W probabilities, or N x H x W).
        image_ids: the COCO image id of each output.
        label_to_cat_id: e.g. ``dataset.label_to_cat_id``; labels are written as these ids.
        mask_threshold: probability above which a mask pixel is foreground.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation"?}]``,
        segmentation as compressed RLE with ``counts`` a str (JSON-ready).
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs but {len(image_ids)} image ids")
    if not label_to_cat_id:
        raise ValueError("label_to_cat_id is empty")
    lookup = np.full(max(label_to_cat_id) + 1, -1, dtype=np.int64)
    for label, cat_id in label_to_cat_id.items():
        lookup[label] = cat_id

    results: list[dict] = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        if len(boxes) == 0:
            continue
        scores = out["scores"].detach().float().cpu().tolist()
        labels = out["labels"].detach().cpu().numpy().astype(np.int64)
        valid = (labels >= 0) & (labels < len(lookup))
        cat_ids = np.where(valid, lookup[np.clip(labels, 0, len(lookup) - 1)], -1)
        if (cat_ids < 0).any():
            bad = sorted(set(labels[cat_ids < 0].tolist()))
            raise ValueError(f"labels {bad} have no category id; valid labels: {sorted(label_to_cat_id)}")
        xywh = boxes.copy()
        xywh[:, 2:] -= xywh[:, :2]
        entries = [{"image_id": int(image_id), "category_id": c, "bbox": b, "score": s}
                   for c, b, s in zip(cat_ids.tolist(), xywh.tolist(), scores)]
        if "masks" in out:
            masks = out["masks"].detach()
            if masks.dim() == 4:
                masks = masks[:, 0]
            binary = (masks > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))  # one call for all
            for entry, rle in zip(entries, rles):
                entry["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
        results.extend(entries)
    return results


def validate_results(results: Any, source: str = "results") -> list[dict]:
    """Check that ``results`` is a list of COCO result dicts; raise ValueError naming ``source`` otherwise.

    Each entry needs an integer ``image_id`` and ``category_id``, a finite ``score``
    and a ``bbox`` of 4 numbers and/or a ``segmentation`` RLE dict (size, counts).
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: COCO results must be a JSON list of objects, got {type(results).__name__}")
    if _plain_results(results):
        return results
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
        if finite_number(res["score"]) is None:
            raise ValueError(f"{source}: result #{i} score must be a finite number, got {res['score']!r}")
        bbox = res.get("bbox")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(finite_number(v) is not None for v in bbox)):
            raise ValueError(f"{source}: result #{i} bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        segm = res.get("segmentation")
        if segm is not None and not (isinstance(segm, dict) and isinstance(segm.get("counts"), str)
                                     and isinstance(segm.get("size"), list) and len(segm["size"]) == 2
                                     and all(isinstance(v, int) and not isinstance(v, bool) for v in segm["size"])):
            raise ValueError(f"{source}: result #{i} segmentation must be a compressed RLE dict: size [height, width] "
                             "and counts a string")
    return results


def _types(values: Iterable[Any]) -> set[type]:
    return set(map(type, values))


def _finite_floats(values: list[Any]) -> bool:
    """Whether every value is a plain int or float (no bool) that is finite as a float."""
    if not _types(values) <= {int, float}:
        return False
    try:
        return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())
    except OverflowError:  # an int too large for a float
        return False


def _plain_results(results: list[Any]) -> bool:
    """True when every result passes :func:`validate_results`' checks as plain JSON values (dicts, lists, str, int,
    float), checked a column at a time with builtins and numpy: 200,000 results take a fraction of a second instead
    of seconds entry by entry. False means "look closer", not "invalid": the caller then checks entry by entry, which
    also accepts other number types (numpy scalars) and names the first bad entry."""
    if not _types(results) <= {dict}:
        return False
    try:
        image_ids = [r["image_id"] for r in results]
        cat_ids = [r["category_id"] for r in results]
        scores = [r["score"] for r in results]
    except KeyError:
        return False
    if not (_types(image_ids) <= {int} and _types(cat_ids) <= {int} and _finite_floats(scores)):
        return False
    boxes = [r.get("bbox") for r in results]
    segms = [r.get("segmentation") for r in results]
    if any(b is None and s is None for b, s in zip(boxes, segms)):
        return False
    boxes = [b for b in boxes if b is not None]
    if not (_types(boxes) <= {list} and set(map(len, boxes)) <= {4}
            and _finite_floats(list(itertools.chain.from_iterable(boxes)))):
        return False
    segms = [s for s in segms if s is not None]
    if not _types(segms) <= {dict}:
        return False
    sizes = [s.get("size") for s in segms]
    return (_types(s.get("counts") for s in segms) <= {str} and _types(sizes) <= {list}
            and set(map(len, sizes)) <= {2} and _types(itertools.chain.from_iterable(sizes)) <= {int})


def check_result_masks(results: Sequence[dict], gt: COCO) -> None:
    """Raise ValueError unless every result's segmentation is a valid RLE of its image's size.

    pycocotools would score a mask of another size, or undecodable counts, without complaint. For results
    read from a file (our own detections always fit); the run lengths are read in Python, so it takes a
    moment on large files.
    """
    for i, res in enumerate(results):
        img = gt.imgs.get(res["image_id"])
        if img is None:
            continue  # evaluate_coco names results for unknown images
        size, counts = res["segmentation"]["size"], res["segmentation"]["counts"]
        if size != [img["height"], img["width"]] or compressed_rle_length(counts) != size[0] * size[1]:
            raise ValueError(f"result #{i} segmentation is not a valid RLE of image id {res['image_id']}'s size "
                             f"{img['height']}x{img['width']} (size {size})")


def load_results(path: str | Path) -> list[dict]:
    """Read and validate a COCO results JSON file (see :func:`validate_results`)."""
    return validate_results(read_json(path, "results file"), str(path))


def results_have_segm(results: Sequence[dict]) -> bool:
    """True when there is at least one result and every result has a segmentation."""
    return bool(results) and all(r.get("segmentation") is not None for r in results)

