"""COCO instances files checked before use: what must be fixed raises, what is unusable alone is dropped and counted.

:func:`validate_annotations` returns a cleaned copy of the file's dict, ready for pycocotools, with the counts of
what it dropped, clipped and recomputed (the rules are listed on :class:`tools.engine.coco_dataset.CocoDetection`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from tools.engine.values import finite_number, is_int, is_number, read_json

__all__ = ["DROP_REASONS", "Validated", "validate_annotations", "checked_coco", "ann_to_rle", "compressed_rle_length"]

logger = logging.getLogger(__name__)

DROP_REASONS: tuple[str, ...] = (
    "unknown_image",    # annotation's image_id is not in "images"
    "bad_box",          # NaN/inf or far-outside coordinates, or width/height <= 0 after clipping to the image
    "bad_polygon",      # polygon with fewer than 3 points, odd length, non-numeric, NaN/inf or far-outside values
    "bad_rle",          # RLE whose size differs from the image, or whose counts do not cover it
    "no_segmentation",  # with_masks=True but the annotation has no segmentation
    "empty_image",      # image without training annotations, only with drop_empty=True
)

# Ids are stored and compared as int64 (numpy, torch, pycocotools' evaluation).
_INT64_MAX = 2**63 - 1
# pycocotools keeps run lengths as uint32: a mask of up to 65535 x 65535 pixels fits. Also JPEG's limit.
_MAX_IMAGE_SIDE = 65535
# Box and polygon coordinates may lie outside their image by up to one image width/height (sloppy annotation,
# clipped); anything further is corrupt. The bound also caps what pycocotools allocates to rasterise a polygon,
# which grows with its coordinates (a vertex at 1e9 needs tens of GB, or crashes it).
_OUTSIDE_TOLERANCE = 1.0


def _is_id(value: Any) -> bool:
    return is_int(value) and 0 <= value <= _INT64_MAX


def _within(value: float, size: int) -> bool:
    """Whether a coordinate lies within ``_OUTSIDE_TOLERANCE`` image sizes of the image ``0..size``."""
    return -_OUTSIDE_TOLERANCE * size <= value <= (1 + _OUTSIDE_TOLERANCE) * size


def _escapes_root(file_name: str) -> bool:
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")):
        return True
    norm = os.path.normpath(file_name)
    return norm == ".." or norm.startswith(".." + os.sep)


def compressed_rle_length(counts: str) -> int | None:
    """Total pixels covered by a compressed COCO RLE string, or None if it is malformed.

    pycocotools has no cheap way to check an RLE string without decoding the full
    mask, so this reads the run lengths only (the documented 6-bit, 5-bits-per-char
    delta code of the COCO format) to validate it when the dataset is built.
    """
    runs: list[int] = []
    value, shift = 0, 0
    for char in counts:
        code = ord(char) - 48
        if not 0 <= code < 64:
            return None
        value |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
        value, shift = 0, 0
    if shift:
        return None
    return sum(runs)


def _segmentation_problem(segm: Any, height: int, width: int) -> str | None:
    """The drop reason for an unusable segmentation, or None if it is fine."""
    if segm is None or (isinstance(segm, list) and not segm):
        return "no_segmentation" if segm is None else "bad_polygon"
    if isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return "bad_polygon"
            coords = [finite_number(v) for v in poly]
            if any(c is None for c in coords) or not all(
                    _within(c, width if k % 2 == 0 else height) for k, c in enumerate(coords)):
                return "bad_polygon"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)) or size != [height, width]:
            return "bad_rle"
        if isinstance(counts, list):
            if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return "bad_rle"
            return None
        if isinstance(counts, str):
            return None if compressed_rle_length(counts) == height * width else "bad_rle"
        return "bad_rle"
    return "bad_polygon"


def ann_to_rle(segm: list | dict, height: int, width: int) -> dict:
    """One RLE for a validated polygon list, uncompressed or compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm




@dataclass
class Validated:
    """A cleaned annotation dict and what cleaning it changed."""

    data: dict
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    clipped: int = 0            # boxes clipped to their image
    recomputed_areas: int = 0   # negative or non-finite areas replaced


def checked_coco(ann_file: str | Path, images_dir: str | Path, *, with_masks: bool,
                 allow_outside_root: bool = False) -> tuple[COCO, Validated]:
    """The annotation file read, checked (:func:`validate_annotations`) and indexed as a pycocotools ``COCO``; also
    what the checks dropped, clipped and recomputed."""
    checked = validate_annotations(read_json(ann_file, "annotation file"), ann_file, images_dir,
                                   with_masks=with_masks, allow_outside_root=allow_outside_root)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
        coco = COCO()
        coco.dataset = checked.data
        coco.createIndex()
    return coco, checked


def validate_annotations(data: Any, ann_file: str | Path, images_dir: str | Path, *, with_masks: bool,
                         allow_outside_root: bool) -> Validated:
    """A cleaned copy of a COCO instances dict; ValueError naming ``ann_file`` for what a user must fix.

    Segmentations are checked only ``with_masks``; ``file_name``s that are absolute or leave ``images_dir`` are
    refused unless ``allow_outside_root``.
    """
    where = str(ann_file)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{where}: missing or non-list {key!r} (required keys: images, annotations, "
                             f"categories)")
    categories = _checked_categories(data["categories"], where)
    images = _checked_images(data["images"], where, images_dir, allow_outside_root)
    cat_ids = {c["id"] for c in categories}
    image_sizes = {img["id"]: (img["height"], img["width"]) for img in images}
    result = Validated({})
    annotations, seen_ids = [], set()
    for i, ann in enumerate(data["annotations"]):
        _check_annotation_fields(ann, i, where, cat_ids, seen_ids)
        clean = _cleaned_annotation(ann, image_sizes.get(ann["image_id"]), with_masks, result)
        if clean is not None:
            annotations.append(clean)
    if any(a["id"] <= 0 for a in annotations):
        # pycocotools' evaluation stores a match as the ground truth's id, 0 meaning "unmatched": a
        # detection matching an annotation of id 0 would count as a false positive. Number them from 1.
        annotations = [dict(a, id=k) for k, a in enumerate(annotations, start=1)]
        logger.info("%s: annotation ids renumbered from 1 (the file has ids <= 0, which pycocotools' "
                    "evaluation cannot match)", where)
    result.data = dict(data, images=images, annotations=annotations, categories=categories)
    return result


def _checked_categories(entries: list, where: str) -> list[dict]:
    categories, names = [], {}
    for i, cat in enumerate(entries):
        if not isinstance(cat, dict) or not is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"{where}: category #{i} needs an integer 'id' and a string 'name', got {cat!r}")
        if not _is_id(cat["id"]):
            raise ValueError(f"{where}: category #{i} ({cat['name']!r}) id must be in 0..{_INT64_MAX}, "
                             f"got {cat['id']}")
        if cat["id"] in names:
            raise ValueError(f"{where}: duplicate category id {cat['id']}")
        names[cat["id"]] = cat["name"]
        categories.append(cat)
    if not categories:
        raise ValueError(f"{where}: no categories")
    return categories


def _checked_images(entries: list, where: str, images_dir: str | Path, allow_outside_root: bool) -> list[dict]:
    images, ids = [], set()
    for i, img in enumerate(entries):
        if not isinstance(img, dict):
            raise ValueError(f"{where}: image #{i} is not an object")
        missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
        if missing:
            raise ValueError(f"{where}: image #{i} (id {img.get('id')!r}) is missing {missing}")
        if not is_int(img["id"]) or not isinstance(img["file_name"], str):
            raise ValueError(f"{where}: image #{i} needs an integer id and a string file_name, "
                             f"got id={img['id']!r} file_name={img['file_name']!r}")
        if not _is_id(img["id"]):
            raise ValueError(f"{where}: image #{i} id must be in 0..{_INT64_MAX}, got {img['id']}")
        if not (is_int(img["width"]) and is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise ValueError(f"{where}: image id {img['id']} needs positive integer width/height, "
                             f"got {img['width']!r}x{img['height']!r}")
        if max(img["width"], img["height"]) > _MAX_IMAGE_SIDE:
            raise ValueError(f"{where}: image id {img['id']} is {img['width']}x{img['height']}; width and "
                             f"height must be at most {_MAX_IMAGE_SIDE}")
        if img["id"] in ids:
            raise ValueError(f"{where}: duplicate image id {img['id']}")
        if not allow_outside_root and _escapes_root(img["file_name"]):
            raise ValueError(f"{where}: image id {img['id']} file_name {img['file_name']!r} is absolute or "
                             f"leaves {images_dir} (pass allow_outside_root=True to accept it)")
        ids.add(img["id"])
        images.append(img)
    return images


def _check_annotation_fields(ann: Any, i: int, where: str, cat_ids: set[int], seen_ids: set[int]) -> None:
    """Raise ValueError for an annotation no safe guess can repair (missing or mistyped fields, duplicate id)."""
    if not isinstance(ann, dict) or not is_int(ann.get("id")):
        raise ValueError(f"{where}: annotation #{i} needs an integer 'id', got "
                         f"{ann.get('id') if isinstance(ann, dict) else ann!r}")
    ann_id = ann["id"]
    if not -_INT64_MAX - 1 <= ann_id <= _INT64_MAX:
        raise ValueError(f"{where}: annotation #{i} id {ann_id} does not fit a 64-bit integer")
    if ann_id in seen_ids:
        raise ValueError(f"{where}: duplicate annotation id {ann_id}")
    seen_ids.add(ann_id)
    missing = [k for k in ("image_id", "category_id", "bbox") if k not in ann]
    if missing:
        raise ValueError(f"{where}: annotation id {ann_id} is missing {missing}")
    if not is_int(ann["image_id"]) or not is_int(ann["category_id"]):
        raise ValueError(f"{where}: annotation id {ann_id} needs integer image_id and category_id, got "
                         f"{ann['image_id']!r} and {ann['category_id']!r}")
    if ann["category_id"] not in cat_ids:
        raise ValueError(f"{where}: annotation id {ann_id} has category_id {ann['category_id']}, which is "
                         f"not among the categories {sorted(cat_ids)}")
    bbox = ann["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        raise ValueError(f"{where}: annotation id {ann_id} bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{where}: annotation id {ann_id} iscrowd must be 0 or 1, got {ann['iscrowd']!r}")


def _cleaned_annotation(ann: dict, image_size: tuple[int, int] | None, with_masks: bool,
                        result: Validated) -> dict | None:
    """The annotation with its box clipped to the image and area filled in, or None (counted in ``result``)."""
    if image_size is None:
        result.dropped["unknown_image"] += 1
        return None
    height, width = image_size
    x, y, w, h = (finite_number(v) for v in ann["bbox"])
    if None in (x, y, w, h) or not (_within(x, width) and _within(x + w, width)
                                    and _within(y, height) and _within(y + h, height)):
        result.dropped["bad_box"] += 1
        return None
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        result.dropped["bad_box"] += 1
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        result.clipped += 1
    segm = ann.get("segmentation")
    if with_masks:
        problem = _segmentation_problem(segm, height, width)
        if problem:
            result.dropped[problem] += 1
            return None
    clean = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(ann.get("iscrowd", 0)))
    area = finite_number(clean.get("area"))
    if area is None or area < 0:
        result.recomputed_areas += "area" in clean
        if with_masks:
            clean["area"] = float(mask_utils.area(ann_to_rle(segm, height, width)))
        else:
            clean["area"] = (x2 - x1) * (y2 - y1)
    return clean
