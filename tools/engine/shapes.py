"""Synthetic shape datasets (COCO detection and ImageNet-style classification).

They let every tool run end to end on a CPU in minutes, without downloads: the
images are real JPEG files on disk and everything is deterministic from a seed.
Both generators draw through the same two functions, :func:`shape_polygons` and
:func:`textured_background`.

Example:
    >>> paths = make_shapes_coco("/tmp/shapes", num_train=20, num_val=10)
    >>> paths["train_ann"].name
    'instances_train.json'
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# Sparse on purpose: code that confuses dataset category ids with contiguous labels fails on them.
COCO_CATEGORIES: dict[int, str] = {1: "circle", 3: "rectangle", 7: "triangle"}
CLASSIFICATION_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "stripes", "checker")

# Bump when the generated content changes so that old caches are not reused.
COCO_CACHE_NAME = "shapes_coco_v1"
IMAGEFOLDER_CACHE_NAME = "shapes_imagefolder_v2"

_CIRCLE_VERTICES = 32


def _regular_polygon(cx: float, cy: float, radius: float, n: int, angle: float) -> np.ndarray:
    t = angle + np.arange(n) * (2 * math.pi / n)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)


def _rotate(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = points - (cx, cy)
    return np.stack([cx + c * d[:, 0] - s * d[:, 1], cy + s * d[:, 0] + c * d[:, 1]], axis=1)


def shape_polygons(
    kind: str, cx: float, cy: float, size: float, angle: float = 0.0, aspect: float = 1.0
) -> list[np.ndarray]:
    """Polygons (each ``K x 2`` float array of x, y) that draw one shape of the given kind.

    Args:
        kind: one of ``"circle", "rectangle", "square", "triangle", "star", "cross", "stripes", "checker"``.
        cx, cy: centre in pixels.
        size: half the extent (radius) in pixels; the shape fits in a circle of radius ``size``.
        angle: rotation in radians (ignored for circle; rectangles stay axis aligned).
        aspect: width / height for rectangles.
    """
    if kind == "circle":
        return [_regular_polygon(cx, cy, size, _CIRCLE_VERTICES, 0.0)]
    if kind == "rectangle":
        # Axis aligned so that the polygon and the box agree exactly.
        half_h = size / math.sqrt(1 + aspect * aspect)
        half_w = aspect * half_h
        return [np.array([[cx - half_w, cy - half_h], [cx + half_w, cy - half_h],
                          [cx + half_w, cy + half_h], [cx - half_w, cy + half_h]])]
    if kind == "square":
        return [_regular_polygon(cx, cy, size, 4, angle + math.pi / 4)]
    if kind == "triangle":
        return [_regular_polygon(cx, cy, size, 3, angle - math.pi / 2)]
    if kind == "star":
        outer = _regular_polygon(cx, cy, size, 5, angle - math.pi / 2)
        inner = _regular_polygon(cx, cy, size * 0.4, 5, angle - math.pi / 2 + math.pi / 5)
        return [np.stack([outer, inner], axis=1).reshape(10, 2)]
    if kind == "cross":
        a, b = size, size * 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                        [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], dtype=np.float64)
        return [_rotate(pts + (cx, cy), cx, cy, angle)]
    if kind == "stripes":
        half, bars = size * 0.7, 4
        step = 2 * half / bars
        polys = []
        for i in range(bars):
            x0 = -half + i * step
            bar = np.array([[x0, -half], [x0 + step / 2, -half], [x0 + step / 2, half], [x0, half]])
            polys.append(_rotate(bar + (cx, cy), cx, cy, angle))
        return polys
    if kind == "checker":
        half, cells = size * 0.7, 3
        step = 2 * half / cells
        polys = []
        for i in range(cells):
            for j in range(cells):
                if (i + j) % 2:
                    continue
                x0, y0 = -half + i * step, -half + j * step
                cell = np.array([[x0, y0], [x0 + step, y0], [x0 + step, y0 + step], [x0, y0 + step]])
                polys.append(_rotate(cell + (cx, cy), cx, cy, angle))
        return polys
    valid = sorted({"circle", "rectangle", *CLASSIFICATION_KINDS})
    raise ValueError(f"unknown shape kind {kind!r}; valid kinds: {valid}")


def draw_polygons(image: Image.Image, polygons: list[np.ndarray], color: tuple[int, int, int]) -> None:
    """Fill the polygons on ``image`` in place."""
    draw = ImageDraw.Draw(image)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly.tolist()], fill=color)


def textured_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image with a random base colour, smooth low-frequency blotches and pixel noise."""
    base = rng.uniform(50, 205, size=3)
    coarse = rng.uniform(-40, 40, size=(height // 16 + 2, width // 16 + 2, 3))
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    pixels = base + (np.asarray(coarse_img, dtype=np.float64) - 128) + rng.normal(0, 10, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _contrasting_color(rng: np.random.Generator, background: Image.Image) -> tuple[int, int, int]:
    mean = np.asarray(background, dtype=np.float64).reshape(-1, 3).mean(0)
    for _ in range(50):
        color = rng.integers(0, 256, size=3)
        if np.abs(color - mean).sum() > 150:
            break
    return tuple(int(c) for c in color)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _place_shapes(rng: np.random.Generator, width: int, height: int, count: int) -> list[tuple[float, float, float]]:
    """Centres and sizes that fit in the image and overlap each other only partially."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(count):
        for _attempt in range(30):
            size = rng.uniform(0.1, 0.3) * min(width, height)
            cx = rng.uniform(size + 1, width - size - 1)
            cy = rng.uniform(size + 1, height - size - 1)
            if all(math.hypot(cx - x, cy - y) > 0.7 * (size + s) for x, y, s in placed):
                placed.append((cx, cy, size))
                break
    return placed


def _make_coco_split(rng: np.random.Generator, image_dir: Path, num_images: int,
                     image_size: tuple[int, int], image_id_offset: int) -> dict:
    image_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = image_size
    cat_ids = sorted(COCO_CATEGORIES)
    images, annotations = [], []
    for i in range(num_images):
        width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        image_id = image_id_offset + 3 * i  # sparse ids too: ids are not indices
        image = textured_background(rng, width, height)
        # Every tenth image (from the fourth on) is empty so that small sets still contain some.
        count = 0 if i % 10 == 3 else int(rng.integers(1, 6))
        for cx, cy, size in _place_shapes(rng, width, height, count):
            cat_id = int(rng.choice(cat_ids))
            polys = shape_polygons(COCO_CATEGORIES[cat_id], cx, cy, size,
                                   angle=rng.uniform(0, 2 * math.pi), aspect=rng.uniform(0.5, 2.0))
            draw_polygons(image, polys, _contrasting_color(rng, image))
            flat = [np.round(p, 2).flatten().tolist() for p in polys]
            rle = mask_utils.merge(mask_utils.frPyObjects(flat, height, width))
            ann_id = len(annotations) + 1
            # Counter based (not random) so that even a 10-image split has crowds and RLEs.
            iscrowd = int(ann_id % 17 == 4)
            if iscrowd or ann_id % 7 == 2:
                segmentation = _uncompressed_rle(mask_utils.decode(rle))
            elif ann_id % 7 == 5:
                segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = flat
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": cat_id,
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                "area": float(mask_utils.area(rle)), "iscrowd": iscrowd, "segmentation": segmentation,
            })
        file_name = f"{i:06d}.jpg"
        image.save(image_dir / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": c, "name": COCO_CATEGORIES[c], "supercategory": "shape"} for c in cat_ids]
    return {"info": {"description": "resdet synthetic shapes"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def make_shapes_coco(root: str | Path, num_train: int = 240, num_val: int = 60,
                     image_size: tuple[int, int] = (128, 192), seed: int = 0) -> dict:
    """Write a small COCO instances dataset of circles, rectangles and triangles.

    Images have random width and height in ``image_size`` (min, max), a textured
    background and 0..5 partly overlapping shapes. Category ids are sparse
    (``{1: circle, 3: rectangle, 7: triangle}``). Most segmentations are polygons,
    some are compressed or uncompressed RLE, some objects are ``iscrowd=1`` and
    every tenth image has no annotation.

    Returns:
        ``{"train_images", "train_ann", "val_images", "val_ann"}`` as Paths.
    """
    lo, hi = image_size
    if not 32 <= lo <= hi:
        raise ValueError(f"image_size must be (min, max) with 32 <= min <= max, got {image_size}")
    root = Path(root)
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for split, num, offset in (("train", num_train, 100), ("val", num_val, 100_000)):
        data = _make_coco_split(rng, root / split, num, (lo, hi), offset)
        ann_file = ann_dir / f"instances_{split}.json"
        ann_file.write_text(json.dumps(data))
        paths[f"{split}_images"], paths[f"{split}_ann"] = root / split, ann_file
    return paths


def make_shapes_imagefolder(root: str | Path, num_classes: int = 4, train_per_class: int = 1000,
                            val_per_class: int = 100, image_size: int = 48, seed: int = 0) -> Path:
    """Write an ImageNet-layout classification set: ``root/{train,val}/<class>/*.JPEG``.

    One class per shape kind (first ``num_classes`` of :data:`CLASSIFICATION_KINDS`),
    each image one shape at a random position, scale, rotation and colour on a
    textured background, with a few random clutter lines.

    The defaults (4 classes x 1000 training images of 48 px, about 20 s to write) are the
    embedded set of ``tools/train_cls.py``: with 60 images per class a ResNet-18 memorised
    the training set and stayed near chance on val; with 1000 it generalises.
    """
    if not 2 <= num_classes <= len(CLASSIFICATION_KINDS):
        raise ValueError(f"num_classes must be in 2..{len(CLASSIFICATION_KINDS)}, got {num_classes}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for kind in CLASSIFICATION_KINDS[:num_classes]:
            class_dir = root / split / kind
            class_dir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image = textured_background(rng, image_size, image_size)
                draw = ImageDraw.Draw(image)
                for _ in range(int(rng.integers(0, 3))):
                    xy = [tuple(p) for p in rng.uniform(0, image_size, size=(2, 2)).tolist()]
                    draw.line(xy, fill=_contrasting_color(rng, image), width=1)
                size = rng.uniform(0.2, 0.45) * image_size
                cx, cy = rng.uniform(size, image_size - size, size=2)
                polys = shape_polygons(kind, cx, cy, size, angle=rng.uniform(0, 2 * math.pi))
                draw_polygons(image, polys, _contrasting_color(rng, image))
                image.save(class_dir / f"{kind}_{i:05d}.JPEG", quality=90)
    return root


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("RESDET_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "resdet"


def _generate_once(target: Path, generate: Callable[[Path], object]) -> Path:
    """Create ``target`` with ``generate(tmp)`` once; later calls (and racing processes) reuse it.

    The data is written into a temporary sibling and renamed into place, so a
    reader never sees a half-written folder; a process that loses the rename race
    discards its copy and uses the winner's.
    """
    marker = target / ".complete"
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        generate(tmp)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, target)
        except OSError:
            if not marker.is_file():
                raise OSError(f"cannot create dataset cache {target}: it exists but is incomplete; delete it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_shapes_coco(cache_dir: str | Path | None = None) -> dict:
    """The default shapes COCO set, generated once into ``cache_dir`` (default
    ``$RESDET_CACHE`` or ``~/.cache/resdet``) and reused afterwards.

    Returns the same dict as :func:`make_shapes_coco`.
    """
    root = _generate_once(_cache_root(cache_dir) / COCO_CACHE_NAME, make_shapes_coco)
    return {"train_images": root / "train", "train_ann": root / "annotations" / "instances_train.json",
            "val_images": root / "val", "val_ann": root / "annotations" / "instances_val.json"}


def default_shapes_imagefolder(cache_dir: str | Path | None = None) -> Path:
    """The default shapes classification set (ImageNet layout), generated once and cached."""
    return _generate_once(_cache_root(cache_dir) / IMAGEFOLDER_CACHE_NAME, make_shapes_imagefolder)
