"""Checks on the images and targets given to a detector, with messages that say what is wrong and where.

torchvision's detectors check little (and with ``torch._assert``, i.e. AssertionError); a wrong input there
tends to fail deep inside the RPN or the loss with an unrelated shape error, or to train on NaNs silently.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_images", "check_targets"]


def check_images(images: Any, max_size: int | None = None) -> None:
    """Raise ValueError unless ``images`` is a non-empty list of finite float tensors shaped 3×H×W with H, W > 0.

    With ``max_size`` (the detector's cap on the longer side), also unless every image keeps at least one pixel
    on its shorter side when resized to it: a 1×5000 image would otherwise fail inside ``interpolate``.
    """
    if isinstance(images, Tensor) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(
            "images must be a non-empty list of 3xHxW float tensors, got "
            + (f"a tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else repr(type(images)))
            + (" (pass list(batch) to split a batch tensor)" if isinstance(images, Tensor) else "")
        )
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"images[{i}] must be a torch.Tensor, got {type(image)}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images[{i}] must have shape 3xHxW (RGB, channels first), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(
                f"images[{i}] must be a float tensor with values in [0, 1], got dtype {image.dtype} "
                "(convert with image.float() / 255)"
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")
        short, long = sorted(image.shape[1:])
        if max_size is not None and short * max_size < long:
            raise ValueError(
                f"images[{i}] is {image.shape[1]}x{image.shape[2]} (HxW): its aspect ratio exceeds {max_size}:1, so "
                f"resizing its longer side to max_size={max_size} would leave the shorter side under one pixel; "
                "crop or pad such images"
            )
    # One pass per image; NaN/inf pixels would otherwise train on NaN losses or give garbage detections silently.
    finite = [bool(torch.isfinite(image).all()) for image in images]
    if not all(finite):
        raise ValueError(f"images[{finite.index(False)}] holds NaN or infinite values")


def check_targets(targets: Any, images: Sequence[Tensor], num_classes: int, needs_masks: bool) -> None:
    """Raise ValueError unless ``targets`` holds one valid training target per image.

    Each target is a dict with ``boxes`` (float N×4, x1 < x2 and y1 < y2, in pixels), ``labels`` (int64 N, in
    1..num_classes-1, 0 is background) and, when ``needs_masks``, ``masks`` (N×H×W, uint8 0/1 or bool, the image's
    size). N may be 0: an image without objects trains as a negative.
    """
    if targets is None:
        raise ValueError("targets are required in training mode (call model.eval() for inference)")
    if not isinstance(targets, Sequence) or isinstance(targets, (str, Mapping)):
        raise ValueError(f"targets must be a list with one dict per image, got {type(targets)}")
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets; pass one target per image")
    for i, (target, image) in enumerate(zip(targets, images)):
        if not isinstance(target, Mapping):
            raise ValueError(f"targets[{i}] must be a dict, got {type(target)}")
        required = ("boxes", "labels", "masks") if needs_masks else ("boxes", "labels")
        missing = [key for key in required if key not in target]
        if missing:
            raise ValueError(f"targets[{i}] lacks {missing}; a target needs the keys {list(required)}")
        boxes, labels = target["boxes"], target["labels"]
        _check_boxes(boxes, i)
        _check_labels(labels, len(boxes), num_classes, i)
        if needs_masks:
            _check_masks(target["masks"], len(boxes), image, i, target.get("image_id"))


def _check_boxes(boxes: Any, i: int) -> None:
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        kind = boxes.dtype if isinstance(boxes, Tensor) else type(boxes)
        raise ValueError(f"targets[{i}]['boxes'] must be a float tensor of shape Nx4, got {kind}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"targets[{i}]['boxes'] must have shape Nx4 (x1, y1, x2, y2; use shape (0, 4) for no objects), "
            f"got {tuple(boxes.shape)}"
        )
    if not torch.isfinite(boxes).all():
        j = int(torch.nonzero(~torch.isfinite(boxes).all(dim=1))[0])
        raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is not finite")
    degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if degenerate.any():
        j = int(torch.nonzero(degenerate)[0])
        raise ValueError(
            f"image {i}, box {j}: {boxes[j].tolist()} has x2 <= x1 or y2 <= y1; boxes must be (x1, y1, x2, y2) "
            "with positive width and height"
        )


def _check_labels(labels: Any, num_boxes: int, num_classes: int, i: int) -> None:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels)
        raise ValueError(f"targets[{i}]['labels'] must be an int64 tensor, got {kind}")
    if labels.shape != (num_boxes,):
        raise ValueError(f"targets[{i}]['labels'] must have shape ({num_boxes},), one per box, got {tuple(labels.shape)}")
    bad = (labels < 1) | (labels >= num_classes)
    if bad.any():
        j = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"targets[{i}]['labels'][{j}] = {int(labels[j])} is out of range 1..{num_classes - 1} "
            f"(num_classes={num_classes} includes the background class 0)"
        )


def _check_masks(masks: Any, num_boxes: int, image: Tensor, i: int, image_id: Any = None) -> None:
    expected = (num_boxes, image.shape[1], image.shape[2])
    if not isinstance(masks, Tensor) or masks.dtype not in (torch.uint8, torch.bool):
        kind = masks.dtype if isinstance(masks, Tensor) else type(masks)
        raise ValueError(f"targets[{i}]['masks'] must be a uint8 (or bool) tensor of shape {expected}, got {kind}")
    if tuple(masks.shape) != expected:
        raise ValueError(
            f"targets[{i}]['masks'] must have shape {expected} (one HxW mask per box, at the image's size), "
            f"got {tuple(masks.shape)}"
        )
    if masks.dtype == torch.uint8 and masks.numel() and int(masks.max()) > 1:
        values = torch.unique(masks)[:5].tolist()
        raise ValueError(
            f"targets[{i}]['masks'] (image {i}{'' if image_id is None else f', image_id {image_id}'}) holds values "
            f"{values}{'...' if len(values) == 5 else ''}; masks must be 0/1 (uint8) or bool: divide 0/255 masks by "
            "255 or compare them with > 0"
        )
