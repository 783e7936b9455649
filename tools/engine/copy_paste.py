"""Simple copy-paste between the images of a training batch (Ghiasi et al. 2021, "Simple Copy-Paste is a Strong
Data Augmentation Method for Instance Segmentation").

It works on collated batches, after the per-image transforms (large-scale jitter in the paper, which makes all
images the same size), so it runs in the training loop between the loader and the model::

    copy_paste = CopyPaste(p=0.5)
    for images, targets in loader:               # (list[Tensor 3xHxW], list[dict]) from collate_detection
        images, targets = to_device(images, targets)
        images, targets = copy_paste(images, targets)
        losses = model(images, targets)

It gives the same result on any device (its random draws are made on the CPU); on the GPU its mask work is
negligible, on the CPU it is not at 1024 px, so call it after moving the batch to the device.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tools.engine.coco_dataset import INSTANCE_KEYS, boxes_from_masks

__all__ = ["CopyPaste"]


class CopyPaste:
    """Paste random instances of another image of the batch onto each image, with probability ``p`` per image.

    For each image ``i`` (in batch order), with probability ``p``: a source image ``j != i`` is drawn uniformly
    from the batch, then ``k`` of its instances, ``k`` uniform in ``1..n`` over the ``n`` instances that have
    pixels in the pasting region, chosen uniformly. Their pixels (the union of their masks) replace image
    ``i``'s pixels at the same place, with no blending (the paper reports the same accuracy without it).
    The pasted instances are appended to ``i``'s target with their masks and labels. Image ``i``'s own
    instances lose the pasted pixels from their masks; a box whose mask lost pixels is recomputed from the
    pixels left (:func:`tools.engine.coco_dataset.boxes_from_masks`), and an instance with less than
    ``min_visible`` of its pixels left, or none, is dropped with its label (and ``iscrowd``, if present).
    Instances whose masks lost nothing keep their boxes.

    Sources are always the input images, never an already pasted output, so each output depends only on the
    input batch and the random draws. A batch of one image, or sources without instances, change nothing.

    Images of different sizes (without large-scale jitter): both are aligned at their top-left corner (where
    the detector aligns its batch too) and only the overlap of the two images is pasted. Source instances cut
    by the overlap get their boxes recomputed from the part pasted; those with no pixels in it are not
    candidates. The source is never resized: a resize would change the objects' scale and aspect ratio, which
    large-scale jitter already controls.

    Needs instance masks (Mask R-CNN data): a target without ``"masks"`` raises ValueError, because without
    masks the occluded instances cannot be updated and a pasted box would carry its whole background.

    Randomness comes from ``generator`` or, when None, from torch's global RNG (CPU), whatever the device of
    the batch: a training loop that seeds or restores the global RNG per iteration gets the same batch again.
    The inputs are not modified.

    Args:
        p: probability that an image receives pasted instances, in [0, 1]; 0 returns the batch unchanged.
        min_visible: fraction of its pixels, in [0, 1], an occluded instance must keep to stay; 0 drops
            only fully occluded instances (as the paper does).
        generator: CPU generator for the random draws (default: the global RNG).

    Example::

        images, targets = CopyPaste(p=0.5)(images, targets)
    """

    def __init__(self, p: float = 0.5, *, min_visible: float = 0.0, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"copy-paste probability p must be in [0, 1], got {p}")
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
        self.p = float(p)
        self.min_visible = float(min_visible)
        self.generator = generator

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, min_visible={self.min_visible})"

    def __call__(self, images: list[Tensor],
                 targets: list[dict[str, Any]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """``images``: ``3 x H x W`` tensors; ``targets``: dicts with ``boxes`` (``N x 4`` XYXY), ``labels``
        (``N``) and ``masks`` (``N x H x W``). Returns new lists (untouched entries are the input objects)."""
        _check_batch(images, targets)
        images_out, targets_out = list(images), list(targets)
        if self.p == 0.0 or len(images) < 2:
            return images_out, targets_out
        for i in range(len(images)):
            if float(torch.rand((), generator=self.generator)) >= self.p:
                continue
            j = int(torch.randint(len(images) - 1, (), generator=self.generator))
            j += j >= i  # uniform over the other images
            chosen = self._choose(targets[j]["masks"], images[i].shape[-2:])
            if chosen is not None:
                images_out[i], targets_out[i] = _paste(images[i], targets[i], images[j], targets[j], chosen,
                                                       self.min_visible)
        return images_out, targets_out

    def _choose(self, masks: Tensor, size: torch.Size) -> Tensor | None:
        """Indices of the source instances to paste (sorted), drawn among those with pixels inside ``size``."""
        height, width = min(masks.shape[-2], size[0]), min(masks.shape[-1], size[1])
        candidates = torch.nonzero(masks[:, :height, :width].flatten(1).any(1)).flatten().cpu()
        if len(candidates) == 0:
            return None
        count = int(torch.randint(1, len(candidates) + 1, (), generator=self.generator))
        order = torch.randperm(len(candidates), generator=self.generator)[:count]
        return candidates[order.sort().values]


def _check_batch(images: list[Tensor], targets: list[dict[str, Any]]) -> None:
    if len(images) != len(targets):
        raise ValueError(f"copy-paste needs one target per image, got {len(images)} images and {len(targets)} targets")
    for index, (image, target) in enumerate(zip(images, targets)):
        if "masks" not in target:
            raise ValueError(f"copy-paste needs instance masks (Mask R-CNN data), but targets[{index}] has only "
                             f"{sorted(target)}")
        missing = [key for key in ("boxes", "labels") if key not in target]
        if missing:
            raise ValueError(f"targets[{index}] has no {missing}: copy-paste needs boxes, labels and masks")
        masks, boxes = target["masks"], target["boxes"]
        if masks.ndim != 3 or tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(f"targets[{index}]['masks'] must be N x H x W with the image's H x W "
                             f"{tuple(image.shape[-2:])}, got {tuple(masks.shape)}")
        for key in ("boxes", *INSTANCE_KEYS):
            if key in target and len(target[key]) != len(masks):
                raise ValueError(f"targets[{index}] has {len(masks)} masks but {len(target[key])} {key}")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{index}]['boxes'] must be N x 4 (XYXY), got {tuple(boxes.shape)}")


def _areas(masks: Tensor) -> Tensor:
    """Pixel count of each ``N x H x W`` mask."""
    return masks.flatten(1).bool().sum(1, dtype=torch.int32)


def _paste(image: Tensor, target: dict[str, Any], source: Tensor, source_target: dict[str, Any], chosen: Tensor,
           min_visible: float) -> tuple[Tensor, dict[str, Any]]:
    """Image and target after pasting ``source``'s instances ``chosen`` onto ``image`` (top-left aligned).

    Pixel work is limited to the pasted region and to ``any()`` reductions: on CPU, pixel counts over every
    mask cost many times more, so they are taken only for ``min_visible``.
    """
    height, width = image.shape[-2:]
    h, w = min(height, source.shape[-2]), min(width, source.shape[-1])
    chosen = chosen.to(source_target["masks"].device)
    masks = target["masks"]
    source_masks = source_target["masks"][chosen]
    if source_masks.shape[-2:] == masks.shape[-2:]:
        pasted_masks = source_masks.to(masks.dtype)
    else:
        pasted_masks = masks.new_zeros((len(chosen), height, width))
        pasted_masks[:, :h, :w] = source_masks[:, :h, :w].to(masks.dtype)
    alpha = pasted_masks.bool().any(0)  # H x W: where the pasted objects cover the image
    x1, y1, x2, y2 = (int(v) for v in boxes_from_masks(alpha[None])[0])  # inside the overlap h x w
    cover = alpha[y1:y2, x1:x2]

    out_image = image.clone()
    out_image[:, y1:y2, x1:x2] = torch.where(cover, source[:, y1:y2, x1:x2].to(image.dtype), image[:, y1:y2, x1:x2])

    # The image's own instances that lose pixels under the pasted ones: new masks and boxes, or dropped.
    boxes = target["boxes"].clone()
    remaining = masks
    keep = torch.ones(len(masks), dtype=torch.bool, device=masks.device)
    hit = torch.logical_and(masks[:, y1:y2, x1:x2], cover).flatten(1).any(1)
    if hit.any():
        remaining = masks.clone()
        remaining[:, y1:y2, x1:x2] *= ~cover
        keep = ~hit | remaining.flatten(1).any(1).bool()  # any() of uint8 is uint8
        if min_visible > 0:
            keep &= ~hit | (_areas(remaining) >= min_visible * _areas(masks))
        boxes[hit] = boxes_from_masks(remaining[hit]).to(boxes.dtype)

    # The pasted instances: source boxes, except where the overlap cut the mask.
    pasted_boxes = source_target["boxes"][chosen].to(boxes.dtype).clone()
    cut = (source_masks[:, h:, :].flatten(1).any(1) | source_masks[:, :, w:].flatten(1).any(1)).bool()
    if cut.any():
        pasted_boxes[cut] = boxes_from_masks(pasted_masks[cut]).to(boxes.dtype)
    pasted_boxes[:, 0::2] = pasted_boxes[:, 0::2].clamp(0, width)
    pasted_boxes[:, 1::2] = pasted_boxes[:, 1::2].clamp(0, height)

    out = dict(target)
    out["masks"] = torch.cat([remaining if keep.all() else remaining[keep], pasted_masks])
    out["boxes"] = torch.cat([boxes[keep], pasted_boxes])
    for key in INSTANCE_KEYS:
        if key in target:
            if key not in source_target:
                raise ValueError(f"copy-paste: the target image has '{key}' but the source image has not")
            out[key] = torch.cat([target[key][keep], source_target[key][chosen].to(target[key].dtype)])
    return out_image, out
