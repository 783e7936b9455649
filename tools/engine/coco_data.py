"""COCO detection data: dataset with validation, transforms, batching and result conversion.

The pieces, in the order a training script uses them::

    dataset = CocoDetection(images_dir, ann_file, build_det_transforms(train=True, min_sizes=(480, 512)))
    loader = build_det_loader(dataset, batch_size=4, train=True, workers=2, seed=cfg.seed)
    for iteration, (images, targets) in zip(range(start_iter, max_iter), InfiniteBatches(loader, start_iter)):
        ...

    # evaluation
    loader = build_det_loader(val_set, batch_size=2, train=False)
    results += detections_to_coco_results(outputs, [t["image_id"] for t in targets], val_set.label_to_cat_id)
    evaluate_coco(val_set.coco, results)      # tools.engine.coco_eval

Labels are contiguous ``1..K`` (0 is background, the torchvision convention); the
dataset's own category ids, however sparse, are kept in ``label_to_cat_id`` and
restored by :func:`detections_to_coco_results`.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from tools.engine.images import read_rgb_array
from tools.engine.samplers import ShardSampler

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


# ----------------------------------------------------------------------------------------------
# Annotation file validation
# ----------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: annotation file is not valid UTF-8 (bad byte at offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid or truncated JSON at line {err.lineno} column {err.colno}: "
                         f"{err.msg}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a number, NaN/inf, or an integer too large for a float)."""
    if not _is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _is_id(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= _INT64_MAX


def _within(value: float, size: int) -> bool:
    """Whether a coordinate lies within ``_OUTSIDE_TOLERANCE`` image sizes of the image ``0..size``."""
    return -_OUTSIDE_TOLERANCE * size <= value <= (1 + _OUTSIDE_TOLERANCE) * size


def _escapes_root(file_name: str) -> bool:
    if os.path.isabs(file_name) or file_name.startswith(("/", "\\")):
        return True
    norm = os.path.normpath(file_name)
    return norm == ".." or norm.startswith(".." + os.sep)


def _compressed_rle_length(counts: str) -> int | None:
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
            coords = [_finite(v) for v in poly]
            if any(c is None for c in coords) or not all(
                    _within(c, width if k % 2 == 0 else height) for k, c in enumerate(coords)):
                return "bad_polygon"
        return None
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)) or size != [height, width]:
            return "bad_rle"
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return "bad_rle"
            return None
        if isinstance(counts, str):
            return None if _compressed_rle_length(counts) == height * width else "bad_rle"
        return "bad_rle"
    return "bad_polygon"


@dataclass
class _Record:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray      # (N, 4) float32 XYXY, clipped to the image
    labels: np.ndarray     # (N,) int64 in 1..K
    ann_ids: list[int]     # the annotations behind boxes, for their masks


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

def load_rgb_image(path: str | Path) -> torch.Tensor:
    """Decode an image file into a float32 ``3 x H x W`` tensor in [0, 1].

    Grayscale, palette, CMYK, RGBA, 16-bit, 32-bit integer and float images are converted to RGB
    (alpha is dropped; see :mod:`tools.engine.images` for how wide pixel types are scaled). The
    file's extension is ignored: the content decides. EXIF orientation is not applied, matching
    COCO's width/height. The pixel count is checked against ``PIL.Image.MAX_IMAGE_PIXELS`` before
    decoding.

    Raises:
        FileNotFoundError / OSError: naming ``path`` for missing, empty, truncated or non-image files.
        ValueError: naming ``path`` for images over the pixel limit or with pixel values no scale fits.
    """
    array = read_rgb_array(path)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class CocoDetection(Dataset):
    """COCO instances dataset returning torchvision-style ``(image, target)`` pairs.

    The annotation file is read with pycocotools and validated once, without
    decoding any image:

    * **ValueError** (naming the file, and the image / annotation id) for problems a
      user must fix because no safe guess exists: unreadable, non-UTF-8 or truncated
      JSON; missing "images"/"annotations"/"categories"; an image without
      id/file_name/width/height or with non-positive size; a category without
      id/name; image or category ids outside 0..2^63-1, annotation ids that do not fit
      int64, image sides over 65535; an annotation without id/image_id/category_id/bbox or with a bbox
      that is not 4 numbers; duplicate image, category or annotation ids (pycocotools
      would silently keep only the last one); an annotation whose category_id is not
      a listed category (it must never receive a wrong label); a ``file_name`` that
      is absolute or leaves ``images_dir`` via ``..`` (unless ``allow_outside_root``).
    * **dropped and counted** (see :data:`DROP_REASONS`) where the annotation alone is
      unusable but the rest of the file is sound: an unknown image_id, NaN/inf or
      empty boxes (after clipping to the image), invalid polygons, RLE of the wrong
      size (segmentations are checked only when ``with_masks``). A box or polygon
      coordinate more than one image width/height outside the image makes its box or
      polygon invalid (nothing that large reaches pycocotools). Boxes partly outside
      the image are clipped and counted in ``clipped``. One summary line is logged
      and the counts are kept in ``dropped``.
    * Missing ``iscrowd`` defaults to 0 and a missing, negative or non-finite ``area`` is
      computed (mask area when a segmentation is available, else box area; counted in
      ``recomputed_areas`` unless missing), so that ``coco`` can be handed to COCOeval.
      Annotation ids <= 0 are renumbered from 1 in ``coco`` (pycocotools' evaluation
      takes id 0 for "unmatched").

    Crowd annotations (``iscrowd=1``) are excluded from the training targets but
    kept in ``coco``, the cleaned ground truth to evaluate against.

    Image files are read in ``__getitem__``: a missing or corrupt file raises
    FileNotFoundError/OSError naming the path; an image whose decoded size differs
    from the file's width/height raises ValueError.

    Args:
        images_dir: folder that ``file_name`` entries are relative to.
        ann_file: COCO instances JSON.
        transforms: callable ``(image, target) -> (image, target)`` on tv_tensors,
            e.g. :func:`build_det_transforms`.
        with_masks: also return instance masks (and validate segmentations).
        drop_empty: leave out images without any (non-crowd) annotation.
        allow_outside_root: accept absolute ``file_name`` or ones containing ``..``.

    Attributes:
        cat_ids: sorted category ids of the file. ``cat_id_to_label`` / ``label_to_cat_id``
            map them to labels 1..K and back; ``class_names[label - 1]`` names a label.
        ids: image id of each index. ``aspect_ratios``: width / height of each index.
        coco: the cleaned pycocotools COCO ground truth.
        dropped: ``{reason: count}`` for every reason in :data:`DROP_REASONS`. ``clipped``: boxes clipped.

    Example:
        >>> ds = CocoDetection("shapes/val", "shapes/annotations/instances_val.json")
        >>> image, target = ds[0]    # image: Image 3xHxW float; target: boxes, labels, masks, image_id, orig_size
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path,
                 transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None, *,
                 with_masks: bool = True, drop_empty: bool = False, allow_outside_root: bool = False) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.clipped = 0
        self.recomputed_areas = 0

        data = self._validated(_read_json(self.ann_file), allow_outside_root)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints "creating index..."
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()

        self.cat_ids: list[int] = sorted(self.coco.cats)
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: dict[int, int] = {label: c for c, label in self.cat_id_to_label.items()}
        self.class_names: list[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]

        self._records: list[_Record] = []
        for img in data["images"]:
            anns = [a for a in self.coco.imgToAnns.get(img["id"], []) if not a["iscrowd"]]
            if drop_empty and not anns:
                self.dropped["empty_image"] += 1
                continue
            x, y, w, h = (np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4).T)
            self._records.append(_Record(
                image_id=img["id"], path=self.images_dir / os.path.normpath(img["file_name"]),
                width=img["width"], height=img["height"],
                boxes=np.stack([x, y, x + w, y + h], axis=1),
                labels=np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64),
                ann_ids=[a["id"] for a in anns]))
        self.ids: list[int] = [r.image_id for r in self._records]
        self.aspect_ratios: list[float] = [r.width / r.height for r in self._records]

        counts = ", ".join(f"{k}={v}" for k, v in self.dropped.items() if v)
        summary = (f"{self.ann_file}: {len(self._records)} images, {len(self.coco.anns)} annotations kept; "
                   f"dropped: {counts or 'none'}; clipped boxes: {self.clipped}"
                   + (f"; negative or non-finite areas recomputed: {self.recomputed_areas}"
                      if self.recomputed_areas else ""))
        logger.log(logging.WARNING if counts or self.clipped or self.recomputed_areas else logging.INFO, summary)

    # -- validation ----------------------------------------------------------------------------

    def _validated(self, data: Any, allow_outside_root: bool) -> dict:
        """A cleaned copy of the annotation dict; raises ValueError or counts drops (see class doc)."""
        where = str(self.ann_file)
        if not isinstance(data, dict):
            raise ValueError(f"{where}: top level must be a JSON object, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{where}: missing or non-list {key!r} (required keys: images, annotations, "
                                 f"categories)")

        categories, cat_names = [], {}
        for i, cat in enumerate(data["categories"]):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
                raise ValueError(f"{where}: category #{i} needs an integer 'id' and a string 'name', got {cat!r}")
            if not _is_id(cat["id"]):
                raise ValueError(f"{where}: category #{i} ({cat['name']!r}) id must be in 0..{_INT64_MAX}, "
                                 f"got {cat['id']}")
            if cat["id"] in cat_names:
                raise ValueError(f"{where}: duplicate category id {cat['id']}")
            cat_names[cat["id"]] = cat["name"]
            categories.append(cat)
        if not categories:
            raise ValueError(f"{where}: no categories")

        images, image_sizes = [], {}
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict):
                raise ValueError(f"{where}: image #{i} is not an object")
            missing = [k for k in ("id", "file_name", "width", "height") if k not in img]
            if missing:
                raise ValueError(f"{where}: image #{i} (id {img.get('id')!r}) is missing {missing}")
            if not _is_int(img["id"]) or not isinstance(img["file_name"], str):
                raise ValueError(f"{where}: image #{i} needs an integer id and a string file_name, "
                                 f"got id={img['id']!r} file_name={img['file_name']!r}")
            if not _is_id(img["id"]):
                raise ValueError(f"{where}: image #{i} id must be in 0..{_INT64_MAX}, got {img['id']}")
            if not (_is_int(img["width"]) and _is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
                raise ValueError(f"{where}: image id {img['id']} needs positive integer width/height, "
                                 f"got {img['width']!r}x{img['height']!r}")
            if max(img["width"], img["height"]) > _MAX_IMAGE_SIDE:
                raise ValueError(f"{where}: image id {img['id']} is {img['width']}x{img['height']}; width and "
                                 f"height must be at most {_MAX_IMAGE_SIDE}")
            if img["id"] in image_sizes:
                raise ValueError(f"{where}: duplicate image id {img['id']}")
            if not allow_outside_root and _escapes_root(img["file_name"]):
                raise ValueError(f"{where}: image id {img['id']} file_name {img['file_name']!r} is absolute or "
                                 f"leaves {self.images_dir} (pass allow_outside_root=True to accept it)")
            image_sizes[img["id"]] = (img["height"], img["width"])
            images.append(img)

        annotations, seen_ids = [], set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not _is_int(ann.get("id")):
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
            if not _is_int(ann["image_id"]) or not _is_int(ann["category_id"]):
                raise ValueError(f"{where}: annotation id {ann_id} needs integer image_id and category_id, got "
                                 f"{ann['image_id']!r} and {ann['category_id']!r}")
            if ann["category_id"] not in cat_names:
                raise ValueError(f"{where}: annotation id {ann_id} has category_id {ann['category_id']}, which is "
                                 f"not among the categories {sorted(cat_names)}")
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
                raise ValueError(f"{where}: annotation id {ann_id} bbox must be 4 numbers [x, y, w, h], "
                                 f"got {bbox!r}")
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1):
                raise ValueError(f"{where}: annotation id {ann_id} iscrowd must be 0 or 1, got {iscrowd!r}")
            if ann["image_id"] not in image_sizes:
                self.dropped["unknown_image"] += 1
                continue
            height, width = image_sizes[ann["image_id"]]

            x, y, w, h = (_finite(v) for v in bbox)
            if None in (x, y, w, h) or not (_within(x, width) and _within(x + w, width)
                                            and _within(y, height) and _within(y + h, height)):
                self.dropped["bad_box"] += 1
                continue
            x1, y1 = max(x, 0.0), max(y, 0.0)
            x2, y2 = min(x + w, float(width)), min(y + h, float(height))
            if x2 <= x1 or y2 <= y1:
                self.dropped["bad_box"] += 1
                continue
            if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                self.clipped += 1

            segm = ann.get("segmentation")
            if self.with_masks:
                problem = _segmentation_problem(segm, height, width)
                if problem:
                    self.dropped[problem] += 1
                    continue
            clean = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=int(iscrowd))
            area = _finite(clean.get("area"))
            if area is None or area < 0:
                self.recomputed_areas += "area" in clean
                if self.with_masks:
                    clean["area"] = float(mask_utils.area(_ann_to_rle(segm, height, width)))
                else:
                    clean["area"] = (x2 - x1) * (y2 - y1)
            annotations.append(clean)
        if any(a["id"] <= 0 for a in annotations):
            # pycocotools' evaluation stores a match as the ground truth's id, 0 meaning "unmatched": a
            # detection matching an annotation of id 0 would count as a false positive. Number them from 1.
            annotations = [dict(a, id=k) for k, a in enumerate(annotations, start=1)]
            logger.info("%s: annotation ids renumbered from 1 (the file has ids <= 0, which pycocotools' "
                        "evaluation cannot match)", where)
        return dict(data, images=images, annotations=annotations, categories=categories)

    # -- access --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        rec = self._records[index]
        pixels = load_rgb_image(rec.path)
        if tuple(pixels.shape[1:]) != (rec.height, rec.width):
            raise ValueError(f"image {rec.path} is {pixels.shape[2]}x{pixels.shape[1]} (WxH) but "
                             f"{self.ann_file} says {rec.width}x{rec.height} (image id {rec.image_id})")
        size = (rec.height, rec.width)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(rec.boxes.copy()), format="XYXY", canvas_size=size),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
            "orig_size": size,
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._masks(rec))
        image = tv_tensors.Image(pixels)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _masks(self, rec: _Record) -> torch.Tensor:
        if not rec.ann_ids:
            return torch.zeros((0, rec.height, rec.width), dtype=torch.uint8)
        rles = [_ann_to_rle(self.coco.anns[i]["segmentation"], rec.height, rec.width) for i in rec.ann_ids]
        masks = mask_utils.decode(rles)  # H x W x N, one call for all instances
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


def _ann_to_rle(segm: list | dict, height: int, width: int) -> dict:
    """One RLE for a validated polygon list, uncompressed or compressed RLE."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


# ----------------------------------------------------------------------------------------------
# Transforms and collation
# ----------------------------------------------------------------------------------------------

def build_det_transforms(train: bool, *, min_sizes: tuple[int, ...] | None = None, max_size: int | None = None,
                         hflip_prob: float = 0.5) -> v2.Transform:
    """Detection augmentation on ``(Image, target)`` with tv_tensors (boxes and masks move together).

    Training: optional multi-scale shortest-side resize (one of ``min_sizes``, longer
    side capped at ``max_size``), horizontal flip with ``hflip_prob``, then removal of
    boxes that became smaller than a pixel (with their labels and masks).
    Evaluation: identity, because the detector resizes and normalises itself
    (torchvision convention).
    """
    if not train:
        return v2.Identity()
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
    steps: list[v2.Transform] = []
    if min_sizes:
        if not all(_is_int(s) and s > 0 for s in min_sizes):
            raise ValueError(f"min_sizes must be positive integers, got {min_sizes}")
        if max_size is not None and max_size < max(min_sizes):
            raise ValueError(f"max_size ({max_size}) must be >= the largest min_size ({max(min_sizes)})")
        steps.append(v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size))
    elif max_size is not None:
        raise ValueError("max_size needs min_sizes")
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    steps.append(v2.SanitizeBoundingBoxes(min_size=1))
    return v2.Compose(steps)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images as a list (they differ in size) and turn tv_tensors into plain tensors."""
    def plain(value: Any) -> Any:
        return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value

    images = [plain(image) for image, _ in batch]
    targets = [{key: plain(value) for key, value in target.items()} for _, target in batch]
    return images, targets


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def _set_epoch(sampler: Any, epoch: int) -> None:
    """Call ``set_epoch`` on the first sampler in a wrapper chain that has one."""
    while sampler is not None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return
        sampler = getattr(sampler, "sampler", None)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share an orientation (landscape/square vs portrait), to pad less.

    Indices come from ``sampler`` (any sampler, e.g. a ``DistributedSampler``) and are
    buffered per group; a batch is emitted when its group's buffer is full.

    * ``drop_last=False``: leftover partial batches are emitted at the end, so every
      index appears exactly once; ``len()`` counts them (it iterates ``sampler``, which
      must give the same order when iterated twice in an epoch, as Sequential and
      Distributed samplers do).
    * ``drop_last=True``: exactly ``len(sampler) // batch_size`` full batches per
      epoch; leftovers are completed with other indices of their group. A fixed count
      keeps DDP ranks in step, since the groups split differently on each rank.

    Args:
        aspect_ratios_or_group_ids: per dataset index, width/height as floats (grouped
            into w >= h and w < h) or group ids as ints.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], aspect_ratios_or_group_ids: Sequence[float | int],
                 batch_size: int, drop_last: bool = False) -> None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        values = list(aspect_ratios_or_group_ids)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            self.group_ids = [int(v) for v in values]
        else:
            self.group_ids = [0 if float(v) >= 1.0 else 1 for v in values]
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.sampler, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                emitted += 1
        leftovers = sorted(((g, b) for g, b in buffers.items() if b), key=lambda gb: len(gb[1]), reverse=True)
        if not self.drop_last:
            for _, batch in leftovers:
                yield batch
            return
        for group, batch in leftovers[:len(self) - emitted]:
            pool = seen[group]
            missing = self.batch_size - len(batch)
            yield batch + [pool[i % len(pool)] for i in range(missing)]

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        per_group = Counter(self.group_ids[i] for i in self.sampler)
        return sum(math.ceil(n / self.batch_size) for n in per_group.values())


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a per-epoch batch sampler so that any batch can be reproduced from (seed, epoch, batch).

    It yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`: the seed fixes
    the random augmentation of that sample, whatever worker loads it. The inner
    sampler must be a pure function of the epoch (``DistributedSampler`` with a seed
    is). :meth:`set_position` chooses the epoch and the first batch; skipped batches
    cost index arithmetic only, no image loading.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], seed: int = 0, rank: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batch_sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0 or epoch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch} and {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        _set_epoch(self.batch_sampler, self.epoch)
        for b, batch in enumerate(self.batch_sampler):
            if b < self.start_batch:
                continue
            seeds = np.random.SeedSequence([self.seed, self.rank, self.epoch, b]).generate_state(len(batch))
            yield [(int(i), int(s)) for i, s in zip(batch, seeds)]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` under ``torch.manual_seed(sample_seed)`` for ``(index, sample_seed)`` keys,
    so random transforms repeat exactly; the caller's RNG state is left untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def build_det_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0,
                     distributed: bool = False, seed: int = 0, group_aspect: bool = True) -> DataLoader:
    """DataLoader of ``(list[Tensor], list[dict])`` batches (see :func:`collate_detection`).

    Training: shuffled by a ``DistributedSampler`` (one replica unless ``distributed``)
    seeded with ``seed``, grouped by orientation if ``group_aspect``, full batches only,
    wrapped in :class:`ResumableBatchSampler`. Iterate it through
    :class:`InfiniteBatches`, which handles epochs and resumption.

    Evaluation: in order, each image once; with ``distributed`` each rank gets every
    ``world_size``-th image (no padding, so gathered results have no duplicates).

    ``group_aspect`` needs ``dataset.aspect_ratios`` (width / height per index), which
    :class:`CocoDetection` provides. The loader has its own seeded generator, so
    iterating it never touches the global torch RNG.
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        num_replicas, rank = 1, 0
    ratios = getattr(dataset, "aspect_ratios", None)
    if group_aspect and ratios is None:
        raise ValueError(f"group_aspect=True needs dataset.aspect_ratios, which {type(dataset).__name__} lacks; "
                         f"pass group_aspect=False")
    generator = torch.Generator().manual_seed(seed)

    if train:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(sampler) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(sampler)} training images per process")
        batches = (GroupedBatchSampler(sampler, ratios, batch_size, drop_last=True) if group_aspect
                   else BatchSampler(sampler, batch_size, drop_last=True))
        return DataLoader(SeededDataset(dataset), batch_sampler=ResumableBatchSampler(batches, seed, rank),
                          num_workers=workers, collate_fn=collate_detection, generator=generator)

    sampler = ShardSampler(len(dataset), rank, num_replicas)
    batches = (GroupedBatchSampler(sampler, ratios, batch_size, drop_last=False) if group_aspect
               else BatchSampler(sampler, batch_size, drop_last=False))
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_detection,
                      generator=generator)


class InfiniteBatches:
    """Endless stream of training batches that resumes exactly.

    Iteration ``k`` is batch ``k % E`` of epoch ``k // E`` (``E = batches_per_epoch``),
    and its content (images, order, augmentation) depends only on the loader's seed
    and ``k``. So a run restarted with ``InfiniteBatches(loader, start_iter=k)`` sees
    exactly the batches an uninterrupted run sees from iteration ``k`` on, with any
    number of workers. ``iteration`` is the number of batches consumed so far, i.e.
    the ``start_iter`` to save in a checkpoint.

    Args:
        loader: a training loader from :func:`build_det_loader` (its batch sampler
            must be a :class:`ResumableBatchSampler`).
        start_iter: first iteration to produce.

    Example:
        >>> batches = InfiniteBatches(build_det_loader(ds, 4, train=True, seed=1), start_iter=ckpt_iter)
        >>> for images, targets in itertools.islice(batches, max_iter - ckpt_iter): ...
    """

    def __init__(self, loader: DataLoader, start_iter: int = 0) -> None:
        if not isinstance(loader.batch_sampler, ResumableBatchSampler):
            raise ValueError("InfiniteBatches needs a training loader from build_det_loader(..., train=True)")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.loader = loader
        self.batches_per_epoch = loader.batch_sampler.batches_per_epoch
        self.iteration = start_iter
        self._batches: Iterator | None = None

    @property
    def epoch(self) -> int:
        return self.iteration // self.batches_per_epoch

    def __iter__(self) -> InfiniteBatches:
        return self

    def __next__(self) -> tuple[list[torch.Tensor], list[dict]]:
        # Plain state instead of a generator: a generator holding ``self`` forms a reference cycle,
        # and a loader iterator freed by the cycle collector waits 5 s per worker to shut down.
        if self._batches is None:
            epoch, offset = divmod(self.iteration, self.batches_per_epoch)
            self.loader.batch_sampler.set_position(epoch, offset)
            self._batches = iter(self.loader)
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = None
            return next(self)
        self.iteration += 1
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes now (they also stop when this object is freed)."""
        self._batches = None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

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
