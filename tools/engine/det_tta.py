"""Test-time augmentation of a detector: several test sizes, each with and without a horizontal flip, merged.

The scheme of detectron2's ``GeneralizedRCNNWithTTA``, over the parts of a ``heads`` detector:

1. boxes: the detector runs on every augmented image (transform, backbone, RPN, box branch, its own
   post-processing); the boxes are mapped back to the image (resize, then mirror where flipped) and the union is
   merged per class by NMS at the detector's ``roi_heads.nms_thresh``, keeping its ``detections_per_img`` best.
   A merged detection keeps the score of the box that survived.
2. masks (Mask R-CNN): the merged boxes are mapped into every augmented image, the mask branch
   (``mask_roi_pool``, ``mask_head``, ``mask_predictor``) runs on them there, the M×M probabilities of each box's
   class are mirrored back where the image was flipped and averaged over the augmentations, then pasted into
   the image once (``heads.postprocess.paste_masks_in_image``).

The backbone runs twice per augmentation for Mask R-CNN (boxes first, masks on the merged boxes), as in
detectron2: only one augmentation's features are held at a time.

Example:
    >>> tta = DetectorWithTTA(model.eval(), TTASettings(sizes=(600, 800, 1000)))
    >>> detections = tta([image])          # same format as model([image]) in eval mode
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from heads.inputs import check_images
from heads.postprocess import grouped_nms, paste_masks_in_image

__all__ = ["DEFAULT_SCALES", "TTASettings", "Augmentation", "DetectorWithTTA", "hflip_boxes"]

# Default test sizes, as fractions of the model's own: a narrower band than detectron2's 0.5-1.5 x 800 (9 sizes),
# at a third of the cost (3 sizes x 2 flips).
DEFAULT_SCALES: tuple[float, ...] = (0.75, 1.0, 1.25)


@dataclass(frozen=True)
class TTASettings:
    """What :class:`DetectorWithTTA` runs.

    Args:
        sizes: shorter sides to test at; ``None``: :data:`DEFAULT_SCALES` times the model's test size.
        flip: also run each size on the horizontally flipped image.
        max_size: cap on the longer side at every size; ``None``: the model's cap scaled with the size (each
            size then resizes an image exactly as the model's own size does, only larger or smaller).
    """

    sizes: tuple[int, ...] | None = None
    flip: bool = True
    max_size: int | None = None

    def __post_init__(self) -> None:
        if self.sizes is not None:
            sizes = tuple(self.sizes)
            if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
                raise ValueError(f"TTA sizes (--tta-sizes) must be a non-empty list of positive integers (pixels), "
                                 f"got {list(sizes)}")
            object.__setattr__(self, "sizes", sizes)
        if self.max_size is not None and not (isinstance(self.max_size, int) and self.max_size > 0):
            raise ValueError(f"TTA max_size (--tta-max-size) must be a positive integer (pixels), got {self.max_size!r}")

    def to_json(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes) if self.sizes is not None else None, "flip": self.flip,
                "max_size": self.max_size}


class Augmentation(NamedTuple):
    """One test-time view of an image: its shorter side, the cap on its longer side and whether it is mirrored."""

    min_size: int
    max_size: int
    flip: bool


def hflip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """Mirror [N, 4] (x1, y1, x2, y2) boxes in an image ``width`` pixels wide (its own inverse)."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


class DetectorWithTTA(nn.Module):
    """A ``heads`` detector (or torchvision's) in eval mode, run with test-time augmentation.

    ``forward(images)`` takes and returns what the detector does in eval mode: a list of 3×H×W float images;
    per image a dict of ``boxes`` [N, 4] (input pixels), ``labels``, ``scores`` and, for Mask R-CNN, ``masks``
    [N, 1, H, W] probabilities. See the module docstring for how the augmentations are merged.

    Args:
        model: the detector; its ``transform`` gives the test size and cap that :class:`TTASettings` defaults
            scale, its ``roi_heads`` the NMS threshold and detection limit of the merge.
        settings: sizes and flip; ``None``: ``TTASettings()``.

    Example:
        >>> tta = DetectorWithTTA(model.eval(), TTASettings(sizes=(640, 800), flip=True))
        >>> tta.augmentations           # [(640, 1066, False), (640, 1066, True), (800, 1333, False), ...]
        >>> outputs = tta(images)
    """

    def __init__(self, model: nn.Module, settings: TTASettings | None = None) -> None:
        super().__init__()
        for part in ("transform", "backbone", "rpn", "roi_heads"):
            if not hasattr(model, part):
                raise ValueError(f"test-time augmentation needs a detector with `{part}` (a heads.FasterRCNN or "
                                 f"MaskRCNN, or torchvision's), got {type(model).__name__}")
        self.model = model
        self.settings = settings or TTASettings()
        self.augmentations = self._augmentations()

    def _augmentations(self) -> list[Augmentation]:
        base_min = int(self.model.transform.min_size[-1])  # the eval-mode size of GeneralizedRCNNTransform
        base_max = int(self.model.transform.max_size)
        sizes = self.settings.sizes
        if sizes is None:
            sizes = tuple(sorted({max(1, round(scale * base_min)) for scale in DEFAULT_SCALES}))
        augmentations = []
        for size in sizes:
            cap = self.settings.max_size or max(size, round(base_max * size / base_min))
            augmentations.append(Augmentation(size, cap, False))
            if self.settings.flip:
                augmentations.append(Augmentation(size, cap, True))
        return augmentations

    @torch.no_grad()
    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of every image, merged over :attr:`augmentations`."""
        check_images(images, max_size=min(a.max_size for a in self.augmentations))
        if self.model.training:
            raise ValueError("DetectorWithTTA runs detectors in eval mode; call model.eval() first")
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        found: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in images]
        for aug in self.augmentations:
            batch, features = self._features(images, aug)
            for i, (boxes, scores, labels) in enumerate(zip(*self._detect(batch, features))):
                found[i].append((self._to_image(boxes, batch.image_sizes[i], sizes[i], aug.flip), scores, labels))
        merged = [self._merge(*map(torch.cat, zip(*parts))) for parts in found]
        if self.model.roi_heads.has_mask():
            masks = self._average_masks(images, [m["boxes"] for m in merged], [m["labels"] for m in merged])
            for detections, probabilities, size in zip(merged, masks, sizes):
                detections["masks"] = paste_masks_in_image(probabilities, detections["boxes"], size)
        return merged

    def _features(self, images: list[Tensor], aug: Augmentation) -> tuple[ImageList, dict[str, Tensor]]:
        """The batch resized (and mirrored) for ``aug``, and its backbone features."""
        transform = copy.copy(self.model.transform)  # a shallow copy at another size; the model is left alone
        transform.min_size, transform.max_size = (aug.min_size,), aug.max_size
        batch, _ = transform([img.flip(-1) for img in images] if aug.flip else images)
        features = self.model.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return batch, features

    def _detect(self, batch: ImageList, features: dict[str, Tensor]) -> tuple[list[Tensor], ...]:
        """The RPN and box branch in eval mode: per image boxes (in the augmented image), scores and labels."""
        heads = self.model.roi_heads
        proposals, _ = self.model.rpn(batch, features)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)
        return heads.postprocess_detections(class_logits, box_regression, proposals, batch.image_sizes)

    @staticmethod
    def _to_image(boxes: Tensor, augmented: tuple[int, int], original: tuple[int, int], flip: bool) -> Tensor:
        boxes = resize_boxes(boxes, augmented, original)
        return hflip_boxes(boxes, original[1]) if flip else boxes

    @staticmethod
    def _to_augmented(boxes: Tensor, original: tuple[int, int], augmented: tuple[int, int], flip: bool) -> Tensor:
        if flip:
            boxes = hflip_boxes(boxes, original[1])
        return resize_boxes(boxes, original, augmented)

    def _merge(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Per-class NMS over the union of one image's detections, best ``detections_per_img`` kept.

        The boxes are not clipped again: each augmentation clipped them to its image already.
        """
        heads = self.model.roi_heads
        keep = grouped_nms(boxes, scores, labels, heads.nms_thresh)[: heads.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}

    def _average_masks(self, images: list[Tensor], boxes: list[Tensor], labels: list[Tensor]) -> list[Tensor]:
        """Per image [N, 1, M, M]: the mask probabilities of each merged box's class, averaged over augmentations."""
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            size = self._mask_resolution()
            return [torch.zeros((0, 1, size, size), device=b.device) for b in boxes]
        heads = self.model.roi_heads
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        rows = torch.arange(sum(counts), device=boxes[0].device)
        total = None
        for aug in self.augmentations:
            batch, features = self._features(images, aug)
            rois = [self._to_augmented(b, size, augmented, aug.flip)
                    for b, size, augmented in zip(boxes, sizes, batch.image_sizes)]
            pooled = heads.mask_roi_pool(features, rois, batch.image_sizes)
            logits = heads.mask_predictor(heads.mask_head(pooled))
            probabilities = logits[rows, torch.cat(labels)].sigmoid()[:, None]
            if aug.flip:
                probabilities = probabilities.flip(-1)
            total = probabilities if total is None else total + probabilities
        return list((total / len(self.augmentations)).split(counts))

    def _mask_resolution(self) -> int:
        pool_size = self.model.roi_heads.mask_roi_pool.output_size
        return 2 * int(pool_size[0] if isinstance(pool_size, Sequence) else pool_size)
