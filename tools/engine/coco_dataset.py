"""COCO detection dataset: images and torchvision-style targets from a checked instances file, plus the
detection transforms and collation.

Labels are contiguous ``1..K`` (0 is background, the torchvision convention); the
dataset's own category ids, however sparse, are kept in ``label_to_cat_id`` and
restored by :func:`tools.engine.coco_results.detections_to_coco_results`.

Example::

    dataset = CocoDetection(images_dir, ann_file, build_det_transforms(train=True, min_sizes=(480, 512)))
    loader = build_det_loader(dataset, batch_size=4, train=True, workers=2, seed=cfg.seed)  # tools.engine.det_loader
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from tools.engine.coco_annotations import ann_to_rle, validate_annotations
from tools.engine.images import read_rgb_array
from tools.engine.values import is_int, read_json

__all__ = ["CocoDetection", "load_rgb_image", "build_det_transforms", "collate_detection"]

logger = logging.getLogger(__name__)


@dataclass
class _Record:
    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray      # (N, 4) float32 XYXY, clipped to the image
    labels: np.ndarray     # (N,) int64 in 1..K
    ann_ids: list[int]     # the annotations behind boxes, for their masks


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
    * **dropped and counted** (see :data:`tools.engine.coco_annotations.DROP_REASONS`) where the annotation alone is
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
        dropped: ``{reason: count}`` for every reason in :data:`tools.engine.coco_annotations.DROP_REASONS`. ``clipped``: boxes clipped.

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
        checked = validate_annotations(read_json(self.ann_file, "annotation file"), self.ann_file, self.images_dir,
                                       with_masks=with_masks, allow_outside_root=allow_outside_root)
        data = checked.data
        self.dropped: dict[str, int] = checked.dropped
        self.clipped = checked.clipped
        self.recomputed_areas = checked.recomputed_areas
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
        rles = [ann_to_rle(self.coco.anns[i]["segmentation"], rec.height, rec.width) for i in rec.ann_ids]
        masks = mask_utils.decode(rles)  # H x W x N, one call for all instances
        return torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))


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
        if not all(is_int(s) and s > 0 for s in min_sizes):
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


