"""Synthetic held-out datasets for judging training defaults: COCO detection and ImageFolder classification.

The training defaults were tuned on the embedded shapes set (:mod:`tools.engine.shapes`).
The sets here differ from it, and from each other, in object types, object sizes, class
counts, category ids, image sizes, backgrounds and file format, so that a default can be
tuned on one set and then measured on a set nobody tuned on. Each generator takes a
``style``:

* ``"tune"``: the set to tune defaults on.
* ``"measure"``: the held-out set to report quality on; do not tune on it.

Detection (:func:`make_det_set`):

==================  ===========================================  ==========================================
                    ``"tune"`` (geometric)                        ``"measure"`` (cluttered glyphs)
==================  ===========================================  ==========================================
categories          ``{2: ellipse, 5: ring, 11: cross,``          ``{6: letter, 900: blob, 1001: arrow,``
                    ``40: star, 77: crescent}``                   ``2024: chevron}``
images              PNG, 312-400 px long side, aspect 1.1-1.5,    JPEG, width and height each 224-400 px
                    landscape or portrait
background          colour gradient and pixel noise               multi-scale noise with unlabelled strokes,
                                                                  boxes and arcs
objects             1-8, extent 8 px to 0.55 x short side,        1-8, extent 10 px to 0.65 x short side,
                    fully inside, at least 70 % visible           may leave the image, at least 45 % visible
crowd regions       a cluster of small stars                      a cluster of small letters
==================  ===========================================  ==========================================

Every split has an image without annotations (its second image) and a crowd region
(``iscrowd=1``, uncompressed RLE, in its third image), plus more of both at random.
Instances are painted from their own masks, so an annotation covers exactly the pixels
drawn for it and left visible by the objects painted over it. Segmentations are polygons
where the visible part is one (unoccluded, inside the image, no hole), otherwise RLE,
alternating between uncompressed counts and compressed strings as pycocotools writes them;
a share of polygon-shaped instances is written as RLE too. ``area`` is the visible pixel
count and ``bbox`` (x, y, w, h) the visible mask's box.

Classification (:func:`make_cls_set`), ImageFolder layout ``root/{train,val}/<class>/*``:

* ``"tune"``: 5 texture classes (grating, plaid, waves, dots, blobs) with random colours,
  contrast and noise, and on half the images a patch of another class's texture. PNG.
* ``"measure"``: 6 letter classes (A, C, G, K, O, X: two groups of similar outline) at random
  position, scale, rotation and colour over clutter with small distractor letters. JPEG.

Everything is deterministic from ``seed``; each image has its own random stream, so a
smaller set is a prefix of a larger one with the same seed.

Example:
    >>> paths = make_det_set("/tmp/det_tune", "tune", num_train=20, num_val=10)
    >>> root = make_cls_set("/tmp/cls_measure", "measure", num_train_per_class=20, num_val_per_class=5)
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils

from tools.engine.shapes import _uncompressed_rle

STYLES: tuple[str, ...] = ("tune", "measure")

TUNE_DET_CATEGORIES: dict[int, str] = {2: "ellipse", 5: "ring", 11: "cross", 40: "star", 77: "crescent"}
MEASURE_DET_CATEGORIES: dict[int, str] = {6: "letter", 900: "blob", 1001: "arrow", 2024: "chevron"}
TUNE_CLS_CLASSES: tuple[str, ...] = ("grating", "plaid", "waves", "dots", "blobs")
MEASURE_CLS_CLASSES: tuple[str, ...] = ("letter_A", "letter_C", "letter_G", "letter_K", "letter_O", "letter_X")

# Written into every generated set; bump when the generated content changes.
GENERATOR_VERSION = 1
INFO_FILE = "synthetic_set.json"

_STYLE_CODES = {"tune": 1, "measure": 2}
_SPLIT_CODES = {"train": 1, "val": 2}
_GLYPH_FONT_SIZE = 96
_LETTERS = "ABDEFGHKMNPRSTUWXYZ"
_DISTRACTOR_LETTERS = "HLTVNZ"  # none of them a class letter


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")


# ----------------------------------------------------------------------------------------------
# Drawing primitives: masks first, pixels from masks
# ----------------------------------------------------------------------------------------------

def _rounded_flat(points: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in points.reshape(-1)]


def _polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise flat polygons exactly as pycocotools does, so that the annotation equals the pixels."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return mask_utils.decode(rle).astype(bool)


def _ellipse_points(cx: float, cy: float, a: float, b: float, angle: float, n: int = 48) -> np.ndarray:
    t = np.arange(n) * (2 * math.pi / n)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _transform(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * points[:, 0] - s * points[:, 1], cy + s * points[:, 0] + c * points[:, 1]], axis=1)


def _star_points(cx: float, cy: float, radius: float, points: int, inner: float, angle: float) -> np.ndarray:
    t = angle + np.arange(2 * points) * (math.pi / points)
    r = np.where(np.arange(2 * points) % 2 == 0, radius, radius * inner)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _plus_points(cx: float, cy: float, radius: float, thickness: float, angle: float) -> np.ndarray:
    a, b = radius, radius * thickness
    pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                    [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], dtype=np.float64)
    return _transform(pts, cx, cy, angle)


def _blob_points(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int = 40) -> np.ndarray:
    """A smooth star-convex outline: a circle whose radius varies with a few random harmonics."""
    t = np.arange(n) * (2 * math.pi / n)
    r = np.ones(n)
    for k in range(2, 6):
        r += rng.uniform(0, 0.3 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    r = radius * r / r.max()
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _arrow_points(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    half = length / 2
    shaft, head = width / 2, width * 1.3
    neck = half - min(length * 0.4, head * 1.6)
    pts = np.array([[-half, -shaft], [neck, -shaft], [neck, -head], [half, 0.0],
                    [neck, head], [neck, shaft], [-half, shaft]])
    return _transform(pts, cx, cy, angle)


def _chevron_points(cx: float, cy: float, half_width: float, angle: float, height: float,
                    thickness: float) -> np.ndarray:
    a, b, t = half_width, height / 2, thickness
    notch = min(b - 2 * t, b * 0.6)
    pts = np.array([[-a, -b], [-a + t, -b], [0.0, notch], [a - t, -b], [a, -b], [0.0, b]])
    return _transform(pts, cx, cy, angle)


@functools.lru_cache(maxsize=None)
def _glyph_template(char: str) -> np.ndarray:
    """The character's coverage (uint8, 0..255) in Pillow's default font, tightly cropped."""
    try:
        font = ImageFont.load_default(size=_GLYPH_FONT_SIZE)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: its bitmap font, scaled up below
        font = ImageFont.load_default()
    left, top, right, bottom = (int(v) for v in font.getbbox(char))
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text((2 - left, 2 - top), char, fill=255, font=font)
    coverage = np.asarray(image)
    ys, xs = np.nonzero(coverage)
    return coverage[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _paste(patch: np.ndarray, cx: float, cy: float, height: int, width: int) -> np.ndarray:
    """A full-size boolean mask with ``patch`` centred on (cx, cy), clipped to the image."""
    mask = np.zeros((height, width), dtype=bool)
    ph, pw = patch.shape
    x0, y0 = int(round(cx - pw / 2)), int(round(cy - ph / 2))
    sx, sy = max(0, -x0), max(0, -y0)
    ex, ey = min(pw, width - x0), min(ph, height - y0)
    if ex > sx and ey > sy:
        mask[y0 + sy:y0 + ey, x0 + sx:x0 + ex] = patch[sy:ey, sx:ex]
    return mask


def _glyph_patch(char: str, extent: float, angle_deg: float) -> np.ndarray:
    """Boolean pixels of ``char`` scaled so that its longer side is ``extent``, then rotated."""
    template = Image.fromarray(_glyph_template(char))
    scale = extent / max(template.size)
    size = (max(1, round(template.width * scale)), max(1, round(template.height * scale)))
    patch = template.resize(size, Image.Resampling.BILINEAR).rotate(
        angle_deg, resample=Image.Resampling.BILINEAR, expand=True)
    return np.asarray(patch) > 127


def _noise_field(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random ``cells``-wide grid upsampled bicubically."""
    grid_w = max(2, cells)
    grid_h = max(2, round(cells * height / width))
    grid = rng.uniform(-1, 1, size=(grid_h, grid_w)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)


def _colour_against(rng: np.random.Generator, reference: np.ndarray, min_distance: float) -> np.ndarray:
    """A random RGB colour at least ``min_distance`` (L1) from ``reference``, if one is found in 50 tries."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - reference).sum() >= min_distance:
            break
    return colour


def _to_image(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Detection styles
# ----------------------------------------------------------------------------------------------

@dataclass
class _Shape:
    mask: np.ndarray                    # H x W bool, the pixels the object covers
    polygons: list[list[float]] | None  # exact flat polygons of ``mask``, when it is a union of polygons


@dataclass
class _Instance:
    category_id: int
    mask: np.ndarray      # as drawn
    visible: np.ndarray   # what later objects left visible
    polygons: list[list[float]] | None
    iscrowd: int


@dataclass(frozen=True)
class _DetStyle:
    categories: dict[int, str]
    image_size: Callable[[np.random.Generator, tuple[int, int]], tuple[int, int]]
    default_image_size: tuple[int, int]     # side range handed to ``image_size``
    background: Callable[[np.random.Generator, int, int], np.ndarray]
    shape: Callable[[np.random.Generator, str, float, float, float, int, int], _Shape]
    paint: Callable[[np.random.Generator, np.ndarray, np.ndarray, str], None]
    min_extent: float
    max_extent_frac: float   # of the shorter image side
    inside_frac: float       # how far the centre stays from the border, in extents (0.5: fully inside)
    min_visible: float       # of an instance's drawn area that later objects must leave visible
    crowd_category: int
    crowd_extent: tuple[float, float]
    image_format: str
    image_id_step: int
    ann_id_start: int


def _tune_image_size(rng: np.random.Generator, sides: tuple[int, int]) -> tuple[int, int]:
    lo, hi = sides
    long_side = int(rng.integers(max(lo, (lo + hi) // 2), hi + 1))
    short_side = max(lo // 2, int(round(long_side / rng.uniform(1.1, 1.5))))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _measure_image_size(rng: np.random.Generator, sides: tuple[int, int]) -> tuple[int, int]:
    lo, hi = sides
    width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    return width, height


def _gradient_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    c0, c1 = rng.uniform(20, 235, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    noise = rng.normal(0, rng.uniform(4, 14), size=(height, width, 3))
    return c0 + t[..., None] * (c1 - c0) + noise


def _clutter_background(rng: np.random.Generator, width: int, height: int,
                        strokes: tuple[int, int] = (8, 26), reach: float = 0.2) -> np.ndarray:
    """Multi-scale coloured noise with unlabelled strokes, box outlines and arcs drawn over it.

    Args:
        strokes: (min, max) number of clutter items.
        reach: how far an item extends, as a fraction of the longer image side.
    """
    base = rng.uniform(40, 215, size=3)
    canvas = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    for cells, amplitude in ((3, 50.0), (12, 25.0), (40, 12.0)):
        tint = rng.uniform(0.3, 1.0, size=3)
        canvas = canvas + amplitude * _noise_field(rng, width, height, cells)[..., None] * tint
    image = _to_image(canvas)
    draw = ImageDraw.Draw(image)
    span = reach * max(width, height)
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(-span, span), y0 + rng.uniform(-span, span)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            if kind == 1:
                draw.rectangle(box, outline=colour, width=int(rng.integers(1, 3)))
            else:
                start = float(rng.uniform(0, 360))
                draw.arc(box, start, start + float(rng.uniform(60, 270)), fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(image, dtype=np.float32) + rng.normal(0, 4, size=(height, width, 3))


def _tune_shape(rng: np.random.Generator, kind: str, cx: float, cy: float, extent: float,
                height: int, width: int) -> _Shape:
    radius = extent / 2
    angle = rng.uniform(0, 2 * math.pi)
    if kind in ("ellipse", "ring"):
        b = radius * rng.uniform(0.45, 1.0)
        outer = [_rounded_flat(_ellipse_points(cx, cy, radius, b, angle))]
        mask = _polygon_mask(outer, height, width)
        if kind == "ellipse":
            return _Shape(mask, outer)
        t = rng.uniform(0.45, 0.7)
        inner = _polygon_mask([_rounded_flat(_ellipse_points(cx, cy, radius * t, b * t, angle))], height, width)
        return _Shape(mask & ~inner, None)
    if kind == "cross":
        polygons = [_rounded_flat(_plus_points(cx, cy, radius, rng.uniform(0.22, 0.4), angle))]
        return _Shape(_polygon_mask(polygons, height, width), polygons)
    if kind == "star":
        points = int(rng.integers(5, 9))
        polygons = [_rounded_flat(_star_points(cx, cy, radius, points, rng.uniform(0.38, 0.55), angle))]
        return _Shape(_polygon_mask(polygons, height, width), polygons)
    if kind == "crescent":
        disc = _polygon_mask([_rounded_flat(_ellipse_points(cx, cy, radius, radius, 0.0))], height, width)
        r2, shift = radius * rng.uniform(0.75, 0.95), radius * rng.uniform(0.35, 0.6)
        bite = _polygon_mask([_rounded_flat(_ellipse_points(
            cx + shift * math.cos(angle), cy + shift * math.sin(angle), r2, r2, 0.0))], height, width)
        return _Shape(disc & ~bite, None)
    raise ValueError(f"unknown tune shape {kind!r}; valid: {sorted(TUNE_DET_CATEGORIES.values())}")


def _measure_shape(rng: np.random.Generator, kind: str, cx: float, cy: float, extent: float,
                   height: int, width: int) -> _Shape:
    if kind == "letter":
        char = _LETTERS[int(rng.integers(len(_LETTERS)))]
        patch = _glyph_patch(char, extent, float(rng.uniform(-35, 35)))
        return _Shape(_paste(patch, cx, cy, height, width), None)
    if kind == "blob":
        polygons = [_rounded_flat(_blob_points(rng, cx, cy, extent / 2))]
        return _Shape(_polygon_mask(polygons, height, width), polygons)
    if kind == "arrow":
        polygons = [_rounded_flat(_arrow_points(cx, cy, extent, extent * rng.uniform(0.12, 0.25),
                                                rng.uniform(0, 2 * math.pi)))]
        return _Shape(_polygon_mask(polygons, height, width), polygons)
    if kind == "chevron":
        half = extent / 2
        polygons = [_rounded_flat(_chevron_points(cx, cy, half, rng.uniform(0, 2 * math.pi),
                                                  2 * half * rng.uniform(0.5, 0.9), half * rng.uniform(0.25, 0.4)))]
        return _Shape(_polygon_mask(polygons, height, width), polygons)
    raise ValueError(f"unknown measure shape {kind!r}; valid: {sorted(MEASURE_DET_CATEGORIES.values())}")


def _paint_tune(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, kind: str) -> None:
    colour = _colour_against(rng, canvas[mask].mean(0), 150)
    canvas[mask] = colour + rng.normal(0, 5, size=(int(mask.sum()), 3))


def _paint_measure(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, kind: str) -> None:
    colour = _colour_against(rng, canvas[mask].mean(0), 90)
    ys, xs = np.nonzero(mask)
    if kind == "blob":  # two-colour stripes
        second = _colour_against(rng, colour, 120)
        theta, period = rng.uniform(0, math.pi), rng.uniform(3, 9)
        stripe = ((xs * math.cos(theta) + ys * math.sin(theta)) % period) < period / 2
        pixels = np.where(stripe[:, None], colour, second)
    elif kind == "arrow":  # shaded along a random direction
        theta = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        pixels = colour * (0.7 + 0.6 * t)[:, None]
    else:
        pixels = np.broadcast_to(colour, (len(xs), 3))
    canvas[ys, xs] = pixels + rng.normal(0, 6, size=(len(xs), 3))


_DET_STYLES: dict[str, _DetStyle] = {
    "tune": _DetStyle(
        categories=TUNE_DET_CATEGORIES, image_size=_tune_image_size, default_image_size=(224, 400),
        background=_gradient_background, shape=_tune_shape, paint=_paint_tune,
        min_extent=8.0, max_extent_frac=0.55, inside_frac=0.5, min_visible=0.7,
        crowd_category=40, crowd_extent=(5.0, 10.0), image_format="png", image_id_step=7, ann_id_start=1),
    "measure": _DetStyle(
        categories=MEASURE_DET_CATEGORIES, image_size=_measure_image_size, default_image_size=(224, 400),
        background=_clutter_background, shape=_measure_shape, paint=_paint_measure,
        min_extent=10.0, max_extent_frac=0.65, inside_frac=0.2, min_visible=0.45,
        crowd_category=6, crowd_extent=(7.0, 12.0), image_format="jpg", image_id_step=11, ann_id_start=5001),
}


def _fits(instances: list[_Instance], new_mask: np.ndarray, min_visible: float) -> bool:
    """Whether painting ``new_mask`` on top keeps every earlier instance visible enough."""
    for inst in instances:
        left = np.count_nonzero(inst.visible & ~new_mask)
        if left < max(min_visible * np.count_nonzero(inst.mask), 10):
            return False
    return True


def _add(instances: list[_Instance], canvas: np.ndarray, rng: np.random.Generator, style: _DetStyle,
         category_id: int, shape: _Shape, iscrowd: int) -> None:
    for inst in instances:
        inst.visible &= ~shape.mask
    style.paint(rng, canvas, shape.mask, style.categories[category_id])
    instances.append(_Instance(category_id, shape.mask, shape.mask.copy(), shape.polygons, iscrowd))


def _crowd_shape(rng: np.random.Generator, style: _DetStyle, height: int, width: int) -> _Shape:
    """A cluster of small objects of the crowd category, as one mask."""
    kind = style.categories[style.crowd_category]
    region = rng.uniform(0.2, 0.35) * min(width, height)
    x0, y0 = rng.uniform(0, width - region), rng.uniform(0, height - region)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(6, 15))):
        extent = rng.uniform(*style.crowd_extent)
        cx = x0 + rng.uniform(extent / 2, region - extent / 2)
        cy = y0 + rng.uniform(extent / 2, region - extent / 2)
        mask |= style.shape(rng, kind, cx, cy, extent, height, width).mask
    return _Shape(mask, None)


def _compose(rng: np.random.Generator, style: _DetStyle, canvas: np.ndarray, count: int,
             crowd: bool) -> list[_Instance]:
    height, width = canvas.shape[:2]
    instances: list[_Instance] = []
    if crowd:
        shape = _crowd_shape(rng, style, height, width)
        if np.count_nonzero(shape.mask) >= 16:
            _add(instances, canvas, rng, style, style.crowd_category, shape, 1)
    cat_ids = sorted(style.categories)
    lo = style.min_extent
    hi = max(lo + 1, style.max_extent_frac * min(width, height))
    for _ in range(count):
        for _attempt in range(25):
            cat_id = cat_ids[int(rng.integers(len(cat_ids)))]
            extent = lo * (hi / lo) ** rng.random()  # log-uniform: as many small objects as large ones
            margin = style.inside_frac * extent
            cx = rng.uniform(margin, max(margin, width - margin))
            cy = rng.uniform(margin, max(margin, height - margin))
            shape = style.shape(rng, style.categories[cat_id], cx, cy, extent, height, width)
            if np.count_nonzero(shape.mask) >= 16 and _fits(instances, shape.mask, style.min_visible):
                _add(instances, canvas, rng, style, cat_id, shape, 0)
                break
    return instances


def _inside(polygons: list[list[float]], height: int, width: int) -> bool:
    coords = np.concatenate([np.asarray(p) for p in polygons])
    return bool(coords[0::2].min() >= 0 and coords[0::2].max() <= width
                and coords[1::2].min() >= 0 and coords[1::2].max() <= height)


def _annotations(instances: list[_Instance], image_id: int, next_id: int, counter: list[int]) -> list[dict]:
    """COCO annotations for the visible parts; ``counter`` ([polygon-able, RLE]) persists across images."""
    annotations = []
    for inst in instances:
        height, width = inst.visible.shape
        visible = np.asfortranarray(inst.visible.astype(np.uint8))
        rle = mask_utils.encode(visible)
        polygon_ok = (not inst.iscrowd and inst.polygons is not None and _inside(inst.polygons, height, width)
                      and np.array_equal(inst.visible, inst.mask))
        if polygon_ok:
            counter[0] += 1
        if inst.iscrowd:
            segmentation: list | dict = _uncompressed_rle(visible)
        elif polygon_ok and counter[0] % 6 != 0:  # every sixth polygon shape goes out as RLE too
            segmentation = inst.polygons
        else:
            counter[1] += 1
            if counter[1] % 2:
                segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = _uncompressed_rle(visible)
        annotations.append({
            "id": next_id + len(annotations) * 2, "image_id": image_id, "category_id": inst.category_id,
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "area": float(mask_utils.area(rle)),
            "iscrowd": inst.iscrowd, "segmentation": segmentation,
        })
    return annotations


def _write_det_split(style_name: str, image_dir: Path, num_images: int, seed: int, split: str,
                     sides: tuple[int, int]) -> dict:
    style = _DET_STYLES[style_name]
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, counter = [], [], [0, 0]
    id_base = 1000 if split == "train" else 500_000
    for i in range(num_images):
        rng = np.random.default_rng([seed, _STYLE_CODES[style_name], _SPLIT_CODES[split], i])
        width, height = style.image_size(rng, sides)
        canvas = style.background(rng, width, height).astype(np.float32)
        empty = i == 1 or (i > 2 and rng.random() < 0.06)
        crowd = i == 2 or (i > 2 and rng.random() < 0.1)
        count = 0 if empty else int(rng.integers(1, 9))
        instances = _compose(rng, style, canvas, count, crowd and not empty)
        image_id = id_base + style.image_id_step * i
        next_id = style.ann_id_start + 2 * len(annotations)
        annotations += _annotations(instances, image_id, next_id, counter)
        file_name = f"{style_name}_{split}_{i:05d}.{style.image_format}"
        image = _to_image(canvas)
        if style.image_format == "jpg":
            image.save(image_dir / file_name, quality=92)
        else:
            image.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    categories = [{"id": c, "name": n, "supercategory": style_name} for c, n in sorted(style.categories.items())]
    return {"info": {"description": f"resdet synthetic detection set, style {style_name!r}",
                     "version": GENERATOR_VERSION},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


# ----------------------------------------------------------------------------------------------
# Classification styles
# ----------------------------------------------------------------------------------------------

def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A ``size x size`` texture of the given kind, values in about [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    period = rng.uniform(5, 14)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "grating":
        t = np.sin(2 * math.pi * u / period + phase)
    elif kind == "plaid":
        theta2 = theta + rng.uniform(math.radians(35), math.radians(90))
        u2 = xx * math.cos(theta2) + yy * math.sin(theta2)
        weight = rng.uniform(0.6, 1.0)
        t = (np.sin(2 * math.pi * u / period + phase)
             + weight * np.sin(2 * math.pi * u2 / rng.uniform(5, 14) + rng.uniform(0, 2 * math.pi))) / (1 + weight)
    elif kind == "waves":
        bend = rng.uniform(2.5, 5.0) * np.sin(2 * math.pi * v / rng.uniform(12, 30) + rng.uniform(0, 2 * math.pi))
        t = np.sin(2 * math.pi * (u + bend) / period + phase)
    elif kind == "dots":
        spacing = rng.uniform(7, 14)
        du = (u + rng.uniform(0, spacing)) % spacing - spacing / 2
        dv = (v + rng.uniform(0, spacing)) % spacing - spacing / 2
        dist = np.sqrt(du * du + dv * dv)
        t = np.clip((rng.uniform(0.2, 0.35) * spacing - dist) * 1.5, -1, 1)
    elif kind == "blobs":
        t = np.clip(_noise_field(rng, size, size, int(rng.integers(4, 9))) * 3, -1, 1)
    else:
        raise ValueError(f"unknown texture {kind!r}; valid: {list(TUNE_CLS_CLASSES)}")
    return (t + 1) / 2


def _texture_image(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    t = _texture(rng, kind, size)
    if rng.random() < 0.35:  # a patch of another class's texture
        other = TUNE_CLS_CLASSES[int(rng.integers(len(TUNE_CLS_CLASSES)))]
        side = int(size * rng.uniform(0.25, 0.45))
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        t[y0:y0 + side, x0:x0 + side] = _texture(rng, other, size)[y0:y0 + side, x0:x0 + side]
    dark = rng.uniform(0, 255, size=3)
    light = _colour_against(rng, dark, 150)
    contrast = rng.uniform(0.5, 1.0)
    t = 0.5 + contrast * (t - 0.5)
    canvas = dark + t[..., None] * (light - dark) + rng.normal(0, rng.uniform(3, 20), size=(size, size, 3))
    return _to_image(canvas)


def _glyph_image(rng: np.random.Generator, char: str, size: int) -> Image.Image:
    canvas = _clutter_background(rng, size, size, strokes=(1, 4), reach=0.35)
    for _ in range(int(rng.integers(0, 4))):  # small distractor letters
        distractor = _DISTRACTOR_LETTERS[int(rng.integers(len(_DISTRACTOR_LETTERS)))]
        patch = _glyph_patch(distractor, rng.uniform(0.1, 0.2) * size, float(rng.uniform(-90, 90)))
        mask = _paste(patch, *rng.uniform(0, size, size=2), size, size)
        if mask.any():
            canvas[mask] = _colour_against(rng, canvas[mask].mean(0), 60)
    extent = rng.uniform(0.4, 0.8) * size
    mask = _paste(_glyph_patch(char, extent, float(rng.uniform(-20, 20))),
                  *rng.uniform(0.45 * extent, size - 0.45 * extent, size=2), size, size)
    canvas[mask] = _colour_against(rng, canvas[mask].mean(0), 120) + rng.normal(0, 8, size=(int(mask.sum()), 3))
    if rng.random() < 0.25:  # an occluding bar across the image
        image = _to_image(canvas)
        points = [tuple(float(v) for v in rng.uniform(0, size, size=2)) for _ in range(2)]
        ImageDraw.Draw(image).line(points, fill=tuple(int(v) for v in rng.integers(0, 256, size=3)),
                                   width=int(rng.integers(2, max(3, size // 16))))
        return image
    return _to_image(canvas)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _write_atomically(root: Path, info: dict, generate: Callable[[Path], None]) -> None:
    """Write the set into a temporary sibling and rename it to ``root``.

    An existing ``root`` written by the same call (same ``info``) is kept as is;
    any other non-empty ``root`` raises FileExistsError rather than being overwritten.
    """
    info_file = root / INFO_FILE
    if info_file.is_file() and json.loads(info_file.read_text()) == info:
        return
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not empty (and not the same synthetic set); "
                              f"delete it or choose another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        generate(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_det_set(root: str | Path, style: str, num_train: int = 300, num_val: int = 100, seed: int = 0,
                 image_size: tuple[int, int] | None = None) -> dict[str, Path]:
    """Write a COCO instances detection set of the given style (see the module docstring).

    Args:
        root: folder to create; written atomically, and kept if it already holds this exact set.
        style: ``"tune"`` (geometric shapes; tune defaults on it) or ``"measure"`` (cluttered
            glyphs; held out for measuring).
        num_train, num_val: images per split.
        seed: everything follows from it (and from ``style``).
        image_size: (min, max) image side in pixels; default (224, 400).

    Returns:
        ``{"train_images", "train_ann", "val_images", "val_ann"}`` as Paths, like
        :func:`tools.engine.shapes.make_shapes_coco`.

    Example:
        >>> paths = make_det_set("data/det_measure", "measure")
        >>> paths["val_ann"].name
        'instances_val.json'
    """
    _check_style(style)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    sides = _DET_STYLES[style].default_image_size if image_size is None else tuple(image_size)
    if len(sides) != 2 or not 48 <= sides[0] <= sides[1]:
        raise ValueError(f"image_size must be (min, max) with 48 <= min <= max, got {image_size}")
    root = Path(root)
    info = {"kind": "det", "style": style, "num_train": num_train, "num_val": num_val, "seed": seed,
            "image_size": list(sides), "version": GENERATOR_VERSION}

    def generate(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        for split, num in (("train", num_train), ("val", num_val)):
            data = _write_det_split(style, tmp / split, num, seed, split, sides)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))

    _write_atomically(root, info, generate)
    return {"train_images": root / "train", "train_ann": root / "annotations" / "instances_train.json",
            "val_images": root / "val", "val_ann": root / "annotations" / "instances_val.json"}


def cls_classes(style: str) -> tuple[str, ...]:
    """The class folder names of a classification style."""
    _check_style(style)
    return TUNE_CLS_CLASSES if style == "tune" else MEASURE_CLS_CLASSES


def make_cls_set(root: str | Path, style: str, num_train_per_class: int = 200, num_val_per_class: int = 50,
                 image_size: int = 64, seed: int = 0) -> Path:
    """Write an ImageFolder classification set ``root/{train,val}/<class>/*`` of the given style.

    Args:
        root: folder to create; written atomically, and kept if it already holds this exact set.
        style: ``"tune"`` (5 texture classes, PNG; tune defaults on it) or ``"measure"``
            (6 letter classes in clutter, JPEG; held out for measuring).
        num_train_per_class, num_val_per_class: images per class and split.
        image_size: square side in pixels.
        seed: everything follows from it (and from ``style``).

    Returns:
        ``root``.

    Example:
        >>> root = make_cls_set("data/cls_tune", "tune")
        >>> sorted(p.name for p in (root / "train").iterdir())[:2]
        ['blobs', 'dots']
    """
    classes = cls_classes(style)
    if num_train_per_class < 1 or num_val_per_class < 1:
        raise ValueError(f"images per class must be >= 1, got {num_train_per_class} and {num_val_per_class}")
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24, got {image_size}")
    root = Path(root)
    info = {"kind": "cls", "style": style, "num_train_per_class": num_train_per_class,
            "num_val_per_class": num_val_per_class, "image_size": image_size, "seed": seed,
            "version": GENERATOR_VERSION}

    def generate(tmp: Path) -> None:
        for split, per_class in (("train", num_train_per_class), ("val", num_val_per_class)):
            for c, name in enumerate(classes):
                class_dir = tmp / split / name
                class_dir.mkdir(parents=True)
                for i in range(per_class):
                    rng = np.random.default_rng([seed, _STYLE_CODES[style], _SPLIT_CODES[split], c, i])
                    if style == "tune":
                        _texture_image(rng, name, image_size).save(class_dir / f"{name}_{i:05d}.png")
                    else:
                        _glyph_image(rng, name[-1], image_size).save(class_dir / f"{name}_{i:05d}.jpg",
                                                                     quality=92)

    _write_atomically(root, info, generate)
    return root
