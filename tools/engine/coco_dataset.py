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

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from tools.engine.coco_annotations import ann_to_rle, checked_coco
from tools.engine.images import read_rgb_array
from tools.engine.values import is_int

__all__ = ["CocoDetection", "load_rgb_image", "build_det_transforms", "lsj_detector_options", "boxes_from_masks",
           "collate_detection"]

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
        self.coco, checked = checked_coco(self.ann_file, self.images_dir, with_masks=with_masks,
                                          allow_outside_root=allow_outside_root)
        data = checked.data
        self.dropped: dict[str, int] = checked.dropped
        self.clipped = checked.clipped
        self.recomputed_areas = checked.recomputed_areas

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


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""The detectors' default ``image_mean`` (heads.detectors), in [0, 1] image space: LSJ pads with it."""

# Per-instance entries besides boxes and masks that follow their boxes when instances are dropped or pasted.
INSTANCE_KEYS: tuple[str, ...] = ("labels", "iscrowd")


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes around instance masks, in pixel-edge coordinates (a mask covering columns 3..5 gets
    ``x1=3, x2=6``, COCO's convention), and all zeros for an empty mask.

    ``masks``: ``N x H x W`` (any dtype, nonzero is foreground). Returns ``N x 4`` float32.
    """
    boxes = masks_to_boxes(masks)  # x2, y2 are the last pixel's index: one less than the edge
    boxes[:, 2:] += masks.flatten(1).bool().any(1, keepdim=True)  # +1 on x2, y2 of non-empty masks only
    return boxes


class _ScaleJitter(v2.ScaleJitter):
    """``v2.ScaleJitter`` that never resizes a side to 0 pixels (a very elongated image at scale 0.1)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = super().make_params(flat_inputs)["size"]
        return {"size": (max(height, 1), max(width, 1))}


def _boxes_from_masks_step(image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Replace the boxes by their masks' boxes (the masks are what the crop left of each object)."""
    if "masks" in target:
        boxes = target["boxes"]
        target = dict(target, boxes=tv_tensors.wrap(boxes_from_masks(target["masks"]).to(boxes.dtype), like=boxes))
    return image, target


def _instance_entries(inputs: Any) -> tuple[torch.Tensor, ...]:
    """``SanitizeBoundingBoxes`` labels_getter: every per-instance entry of the target (see INSTANCE_KEYS)."""
    target = inputs[1] if isinstance(inputs, tuple) else inputs
    return tuple(target[key] for key in INSTANCE_KEYS if key in target)


def lsj_detector_options(lsj_size: int) -> dict[str, Any]:
    """Detector options under large-scale jitter: with ``min_size = max_size = lsj_size`` the detector's own
    resize (GeneralizedRCNNTransform) leaves LSJ's square ``lsj_size`` training images untouched (scale 1.0,
    bit-exact), and evaluation images are resized so that their longer side is ``lsj_size``.

    Example::

        options = {**model_options, **lsj_detector_options(1024)}   # min_size=(1024,), max_size=1024
    """
    _check_lsj_size(lsj_size)
    return {"min_size": (int(lsj_size),), "max_size": int(lsj_size)}


def _check_lsj_size(lsj_size: Any) -> None:
    if not (is_int(lsj_size) and lsj_size > 0):
        raise ValueError(f"lsj_size must be a positive integer (e.g. 1024), got {lsj_size!r}")


def build_det_transforms(train: bool, *, min_sizes: tuple[int, ...] | None = None, max_size: int | None = None,
                         hflip_prob: float = 0.5, lsj_size: int | None = None,
                         lsj_scale: tuple[float, float] = (0.1, 2.0),
                         lsj_fill: Sequence[float] = IMAGENET_MEAN) -> v2.Transform:
    """Detection augmentation on ``(Image, target)`` with tv_tensors (boxes and masks move together).

    Training: optional multi-scale shortest-side resize (one of ``min_sizes``, longer
    side capped at ``max_size``), horizontal flip with ``hflip_prob``, then removal of
    boxes that became smaller than a pixel (with their labels and masks).
    Evaluation: identity, because the detector resizes and normalises itself
    (torchvision convention).

    Large-scale jitter (``lsj_size``, replaces ``min_sizes``/``max_size``): resize keeping the aspect
    ratio so that the image fits in a square of ``s * lsj_size``, ``s`` uniform in ``lsj_scale``
    (``v2.ScaleJitter``), then crop or pad to exactly ``lsj_size x lsj_size`` at a random position
    (``v2.RandomCrop(pad_if_needed=True)``: a smaller image lies wholly inside the square), flip, and:

    * with masks, every box is recomputed from its mask (:func:`boxes_from_masks`): the crop cuts
      objects, and the clipped box of a cut non-rectangular object overstates what is left of it;
    * instances left with a box under one pixel (outside the crop, or a mask that vanished when
      shrunk) are dropped with their labels, masks and ``iscrowd``; an image may end up with none,
      which the detectors accept.

    Padding is ``lsj_fill``, the detector's ``image_mean``: the detector normalises with that mean, so
    the padding becomes 0, the same value as the detector's own batch padding, instead of a dark
    border (0 in [0, 1] space) that appears in no test image. Images must be float in [0, 1] (as
    :class:`CocoDetection` gives them). Masks are padded with 0.

    The detector must then not resize again: build it with :func:`lsj_detector_options` (``min_size =
    max_size = lsj_size``), which makes its resize the identity. A multiple of 32 avoids its padding.

    Args:
        lsj_size: output side of large-scale jitter (detectron2 and torchvision use 1024 on COCO).
        lsj_scale: range of the random scale ``s``; (0.1, 2.0) is large-scale jitter, (0.8, 1.25)
            the standard-scale jitter of Ghiasi et al.
        lsj_fill: padding colour, one value per channel in [0, 1].

    Example::

        transforms = build_det_transforms(train=True, lsj_size=1024)
    """
    if not train:
        return v2.Identity()
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
    steps: list[Callable[..., Any]] = []
    if lsj_size is not None:
        _check_lsj_size(lsj_size)
        if min_sizes or max_size is not None:
            raise ValueError("lsj_size replaces min_sizes and max_size: give either, not both")
        low, high = (tuple(lsj_scale) + (0.0, 0.0))[:2] if len(lsj_scale) == 2 else (0.0, 0.0)
        if not 0 < low <= high:
            raise ValueError(f"lsj_scale must be (low, high) with 0 < low <= high, got {tuple(lsj_scale)}")
        if len(lsj_fill) not in (1, 3) or not all(0.0 <= f <= 1.0 for f in lsj_fill):
            raise ValueError(f"lsj_fill must be 1 or 3 values in [0, 1], got {tuple(lsj_fill)}")
        steps.append(_ScaleJitter(target_size=(lsj_size, lsj_size), scale_range=(low, high)))
        steps.append(v2.RandomCrop(lsj_size, pad_if_needed=True,
                                   fill={tv_tensors.Image: [float(f) for f in lsj_fill], tv_tensors.Mask: 0}))
    elif min_sizes:
        if not all(is_int(s) and s > 0 for s in min_sizes):
            raise ValueError(f"min_sizes must be positive integers, got {min_sizes}")
        if max_size is not None and max_size < max(min_sizes):
            raise ValueError(f"max_size ({max_size}) must be >= the largest min_size ({max(min_sizes)})")
        steps.append(v2.RandomShortestSize(min_size=list(min_sizes), max_size=max_size))
    elif max_size is not None:
        raise ValueError("max_size needs min_sizes")
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip_prob))
    if lsj_size is not None:
        steps.append(_boxes_from_masks_step)
    steps.append(v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_instance_entries))
    return v2.Compose(steps)


def collate_detection(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images as a list (they differ in size) and turn tv_tensors into plain tensors."""
    def plain(value: Any) -> Any:
        return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value

    images = [plain(image) for image, _ in batch]
    targets = [{key: plain(value) for key, value in target.items()} for _, target in batch]
    return images, targets


