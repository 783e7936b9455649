"""Detection on image files: drawn pictures and a JSON of the detections (the body of ``tools/infer.py``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from tools.engine.coco_dataset import load_rgb_image
from tools.engine.det_model import for_inference, load_detector
from tools.engine.runner import default_device
from tools.engine.visualize import draw_detections, save_grid

__all__ = ["infer_images"]


def infer_images(
    weights: str | Path,
    images: Sequence[str | Path],
    output_dir: str | Path,
    score_thresh: float = 0.5,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    bf16: bool = False,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Run a detector on image files; writes ``OUTPUT_DIR/<stem>.png`` (detections drawn) and ``detections.json``.

    Returns the JSON content: per image ``{"image", "output", "detections": [{"box" (xyxy),
    "score", "label", "category_id", "category_name"}]}`` for detections scoring ``>= score_thresh``.
    ``bf16`` / ``compile``: run through :func:`backbones.optimize_for_inference` with those options.

    Nothing that exists is ever written over, inputs included: a name already taken (by an input
    inside ``OUTPUT_DIR``, an earlier run's output, another image of the same name) gets the first
    free suffix, ``<stem>_1.png``, ``<stem>_2.png``, ... (``detections_1.json``, ...); each record's
    ``"output"`` and the returned list say which file is whose.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if not images:
        raise ValueError("no images given")
    dev = torch.device(device or default_device())
    model, info = load_detector(weights, overrides)
    model = for_inference(model.to(dev), bf16, compile)
    names = info["class_names"]
    mapping = info["label_to_cat_id"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image_path in images:
        image_path = Path(image_path)
        image = load_rgb_image(image_path)
        with torch.no_grad():
            det = model([image.to(dev)])[0]
        keep = det["scores"] >= score_thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        png = _new_file(out, image_path.stem, ".png")
        save_grid([draw_detections(image, det, names, score_thresh)], png)
        detections = []
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            detections.append({
                "box": [round(v, 2) for v in box],
                "score": round(score, 4),
                "label": int(label),
                "category_id": (mapping or {}).get(int(label), int(label)),
                "category_name": names[label - 1] if names and 0 < label <= len(names) else str(label),
            })
        records.append({"image": str(image_path), "output": str(png), "detections": detections})
    _new_file(out, "detections", ".json").write_text(json.dumps(records, indent=2) + "\n")
    return records


def _new_file(folder: Path, stem: str, suffix: str) -> Path:
    """Create and return ``folder/<stem><suffix>``, or the first of ``<stem>_1<suffix>``, ... that does not exist.

    Created with O_EXCL, so an existing file (an input, an earlier run's output) or a link is never written
    through, even if it appears while the names are tried.
    """
    path, k = folder / f"{stem}{suffix}", 0
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            k += 1
            path = folder / f"{stem}_{k}{suffix}"
