"""Drawing detections (boxes, masks, class names and scores) and saving image grids, with torchvision.utils.

Example::

    model.eval()
    det = model([image])[0]
    picture = draw_detections(image, det, class_names=["circle", "rectangle"], score_thresh=0.5)
    save_grid([picture], "out/pred.png")
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

__all__ = ["draw_detections", "save_grid", "PALETTE"]

# One colour per class (label 1 is the first; modulo the list), so a class keeps its colour across images.
PALETTE: tuple[str, ...] = ("red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "brown")


def _to_uint8(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def draw_detections(
    image: Tensor,
    detections: dict[str, Tensor],
    class_names: Sequence[str] | None = None,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    min_side: int = 256,
) -> Tensor:
    """Image with the detections scoring ``>= score_thresh`` drawn: masks, boxes, "name score" labels.

    Args:
        image: 3×H×W, float in [0, 1] or uint8.
        detections: a detector's output for this image: ``boxes`` (N×4 xyxy pixels), ``labels``
            (N, 1..K), ``scores`` (N) and optionally ``masks`` (N×1×H×W or N×H×W probabilities).
        class_names: ``class_names[label - 1]`` names a label; ``None`` writes the label number.
        min_side: small images are enlarged (nearest) until their shorter side is this long, so
            that the label text stays readable.

    Returns:
        uint8 3×H'×W' tensor.
    """
    image = _to_uint8(image.cpu())
    det = {k: v.detach().cpu() for k, v in detections.items()}
    keep = det["scores"] >= score_thresh
    boxes, labels, scores = det["boxes"][keep].float(), det["labels"][keep], det["scores"][keep]
    masks = det.get("masks")
    scale = max(1, -(-min_side // max(1, min(image.shape[1:]))))  # integer factor: pixels stay square
    if scale > 1:
        image = F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)
        boxes = boxes * scale
    colors = [PALETTE[(int(label) - 1) % len(PALETTE)] for label in labels]
    if masks is not None and keep.any():
        masks = masks[keep].float()
        if masks.dim() == 3:
            masks = masks[:, None]
        if scale > 1:
            masks = F.interpolate(masks, scale_factor=scale, mode="nearest")
        image = draw_segmentation_masks(image, masks[:, 0] > mask_thresh, alpha=0.4, colors=colors)
    if len(boxes):
        names = [
            (class_names[int(label) - 1] if class_names and 0 < int(label) <= len(class_names) else str(int(label)))
            + f" {float(score):.2f}"
            for label, score in zip(labels, scores)
        ]
        image = draw_bounding_boxes(image, boxes, labels=names, colors=colors, width=2)
    return image


def save_grid(images: Sequence[Tensor], path: str | Path, ncol: int = 4) -> Path:
    """Write ``images`` (uint8 3×H×W, any sizes: padded to the largest) as one PNG grid of ``ncol`` columns."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    height = max(img.shape[1] for img in images)
    width = max(img.shape[2] for img in images)
    padded = [F.pad(_to_uint8(img.cpu()), (0, width - img.shape[2], 0, height - img.shape[1])) for img in images]
    grid = make_grid(torch.stack(padded), nrow=min(ncol, len(padded)), padding=4, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, str(path))
    return path
