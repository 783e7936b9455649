"""Detection on image files, folders, globs and videos: drawn pictures, one JSON per image or frame, a COCO results
JSON and detections.json (the body of ``tools/infer.py``), through ``heads.Predictor`` (eager or onnxruntime)."""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

import heads
from tools.engine.coco_dataset import load_rgb_image
from tools.engine.coco_results import detections_to_coco_results
from heads.spec import load_detector
from tools.engine.det_model import for_inference
from tools.engine.runner import default_device
from tools.engine.visualize import draw_detections, save_grid

__all__ = ["infer_images", "expand_inputs", "load_predictor", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, every image and video file under a folder (recursive, sorted), the matches of a glob
    pattern (``*``, ``?``, ``[``; ``**`` recursive). ValueError for a path that does not exist, a pattern or folder
    that matches nothing, or no input at all."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            suffixes = IMAGE_SUFFIXES + VIDEO_SUFFIXES
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ValueError(f"folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)}) or video file")
            files += found
        elif path.exists():
            files.append(path)
        elif glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not found:
                raise ValueError(f"pattern {item} matches no file")
            files += found
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError("no images given")
    return files


def _video_frames(path: Path, stride: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Every ``stride``-th frame of a video as (frame index, float32 3×H×W RGB in [0, 1]), decoded with PyAV."""
    try:
        import av
    except ImportError:
        raise ValueError(f"reading the video {path} needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                if index % stride == 0:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    yield index, rgb.permute(2, 0, 1).float() / 255
    except av.FFmpegError as e:
        raise ValueError(f"cannot decode the video {path}: {e}") from None


def load_predictor(
    weights: Optional[str | Path] = None,
    onnx: Optional[str | Path] = None,
    score_thresh: float = 0.5,
    overrides: dict[str, Any] | None = None,
    device: Optional[str] = None,
    bf16: bool = False,
    compile: bool = False,
) -> tuple[heads.Predictor, dict[str, Any]]:
    """A ``heads.Predictor`` from a checkpoint (any that ``load_detector`` reads, its class names and category ids)
    or from an exported ONNX file (names and ids from ``weights`` when given too). Returns it and the checkpoint's
    info (``label_to_cat_id``, ``class_names``; None without ``weights``)."""
    if weights is None and onnx is None:
        raise ValueError("give a checkpoint (--weights) or an exported model (--onnx)")
    info: dict[str, Any] = {"label_to_cat_id": None, "class_names": None}
    model = None
    if weights is not None:
        model, info = load_detector(weights, overrides)
    if onnx is not None:
        return heads.Predictor(onnx=onnx, device=device, score_thresh=score_thresh,
                               class_names=info["class_names"]), info
    dev = torch.device(device or default_device())
    model = for_inference(model.to(dev), bf16, compile)
    return heads.Predictor(model, device=dev, score_thresh=score_thresh, class_names=info["class_names"]), info


def _sources(files: list[Path], frame_stride: int) -> Iterator[tuple[Path, Optional[int], torch.Tensor]]:
    """(file, frame index or None, image) of every image file and every ``frame_stride``-th video frame."""
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            for index, frame in _video_frames(path, frame_stride):
                yield path, index, frame
        else:
            yield path, None, load_rgb_image(path)


def infer_images(
    weights: Optional[str | Path],
    images: Sequence[str | Path],
    output_dir: str | Path,
    score_thresh: float = 0.5,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    bf16: bool = False,
    compile: bool = False,
    *,
    onnx: Optional[str | Path] = None,
    frame_stride: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run a detector (a checkpoint, or an ONNX file in onnxruntime) on image files, folders, globs and videos.

    Writes to ``OUTPUT_DIR``, per image or video frame, ``<stem>.png`` (detections drawn; frames
    ``<stem>_f<index>.png``) and ``<stem>.json`` (its record), then ``detections.json`` (all records) and
    ``results.json`` (COCO results; ``image_id`` is the record's, masks as RLE).

    Returns the records: per image ``{"image", "frame" (videos), "image_id", "output", "json", "detections":
    [{"box" (xyxy), "score", "label", "category_id", "category_name"}]}`` for detections scoring
    ``>= score_thresh``. ``bf16`` / ``compile``: run through :func:`backbones.optimize_for_inference`.
    ``frame_stride``: every n-th frame of a video.

    Nothing that exists is ever written over, inputs included: a name already taken (by an input
    inside ``OUTPUT_DIR``, an earlier run's output, another image of the same name) gets the first
    free suffix, ``<stem>_1.png``, ``<stem>_2.png``, ... (``detections_1.json``, ...); an image's PNG and JSON
    always share their name, and each record's ``"output"`` and ``"json"`` say which files are whose.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if frame_stride < 1:
        raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
    files = expand_inputs(images)
    predictor, info = load_predictor(weights, onnx, score_thresh, overrides, device, bf16, compile)
    names, mapping = info["class_names"], info["label_to_cat_id"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, results = [], []
    bar = tqdm(_sources(files, frame_stride), desc="infer", unit="img", disable=not progress)
    for image_id, (path, frame, image) in enumerate(bar, start=1):
        det = predictor(image)
        stem = path.stem if frame is None else f"{path.stem}_f{frame:06d}"
        png, json_path = _new_files(out, stem, (".png", ".json"))
        tensors = {key: value for key, value in det.items() if isinstance(value, torch.Tensor)}
        save_grid([draw_detections(image, tensors, names, score_thresh)], png)
        detections = [
            {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label),
             "category_id": (mapping or {}).get(int(label), int(label)), "category_name": name}
            for box, score, label, name in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                               det["class_names"])
        ]
        record = {"image": str(path), **({} if frame is None else {"frame": frame}), "image_id": image_id,
                  "output": str(png), "json": str(json_path), "detections": detections}
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        results += detections_to_coco_results([tensors], [image_id], mapping or _identity(det["labels"]))
        records.append(record)
    bar.close()
    _new_files(out, "detections", (".json",))[0].write_text(json.dumps(records, indent=2) + "\n")
    _new_files(out, "results", (".json",))[0].write_text(json.dumps(results) + "\n")
    return records


def _identity(labels: torch.Tensor) -> dict[int, int]:
    """Labels as their own category ids (a checkpoint without a mapping, or an ONNX file alone)."""
    return {int(label): int(label) for label in labels.tolist()} or {0: 0}


def _new_files(folder: Path, stem: str, suffixes: Sequence[str]) -> list[Path]:
    """Create and return ``folder/<stem><suffix>`` for every suffix, or for the first ``<stem>_1``, ``<stem>_2``, ...
    under which none of them exists, so that files that belong together share a name.

    Created with O_EXCL, so an existing file (an input, an earlier run's output) or a link is never written
    through, even if it appears while the names are tried; an attempt that finds one taken removes only the files
    it created itself.
    """
    k = 0
    while True:
        name = stem if k == 0 else f"{stem}_{k}"
        created: list[Path] = []
        try:
            for suffix in suffixes:
                path = folder / f"{name}{suffix}"
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                created.append(path)
            return created
        except FileExistsError:
            for path in created:
                path.unlink()
            k += 1
