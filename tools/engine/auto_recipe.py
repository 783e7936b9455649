"""Recipes chosen from the data, for a user who gives a dataset and no ``--config``.

The COCO and ImageNet recipes assume COCO and ImageNet: 90k iterations at 800 px, or 90 epochs
of RandomResizedCrop(0.08-1) at 224 px with SGD. On a few hundred small images they train for
days, at a resolution far above the images', or not at all. These functions look at the
training set (how many images, how large, how many objects) and return the config values that
fit it, each with the reason, for the training log. Flags the user gives override them, and
``--config`` replaces the choice entirely.

Example::

    values, reasons = det_recipe(det_data_stats("data/annotations/train.json"), batch_size=4)
    cfg, _ = build_config(None, {**values, **user_flags})
"""
from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tools.engine.values import read_json

__all__ = [
    "DetDataStats",
    "ClsDataStats",
    "det_data_stats",
    "cls_data_stats",
    "det_recipe",
    "cls_recipe",
    "under_flags",
    "SMALL_DET_SET",
    "LARGE_CLS_SET",
]

logger = logging.getLogger(__name__)

# Below this many training images a detection set is "small": 128 sampled RoIs per image instead of 512
# (detectron2's advice for small datasets; the box and mask heads then train on a quarter of the RoIs).
SMALL_DET_SET = 20_000
# From this many training images (ImageNet has 1.28M) a classification set gets the ImageNet V1 recipe.
LARGE_CLS_SET = 300_000
# Detection epochs when --iters is not given: the 1x schedule is 12.3 COCO epochs.
DET_EPOCHS = 12
_COCO_TEST_SIZE, _COCO_MAX_SIZE = 800, 1333
_CLS_RECIPES = Path(__file__).resolve().parents[2] / "configs" / "cls"


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass(frozen=True)
class DetDataStats:
    """What the detection recipe is chosen from."""

    num_images: int
    median_short_side: float
    median_long_side: float
    objects_per_image: float


@dataclass(frozen=True)
class ClsDataStats:
    """What the classification recipe is chosen from (image sides from a sample of the files' headers)."""

    num_images: int
    num_classes: int
    median_short_side: float


def det_data_stats(ann_file: str | Path) -> DetDataStats:
    """Image count, median image sides and objects per image of a COCO instances file (its JSON only)."""
    try:
        data = read_json(ann_file, "annotation file")
        images = [im for im in data.get("images", []) if isinstance(im, dict)]
        sides = [(float(im["width"]), float(im["height"])) for im in images
                 if isinstance(im.get("width"), (int, float)) and isinstance(im.get("height"), (int, float))]
        annotations = len(data.get("annotations", []))
    except (OSError, ValueError, AttributeError, TypeError):
        raise ValueError(f"{ann_file}: cannot read the COCO annotation file to choose a recipe; "
                         "pass --config to choose one yourself") from None
    if not images or not sides:
        raise ValueError(f"{ann_file}: no images with width and height in the annotation file")
    return DetDataStats(
        num_images=len(images),
        median_short_side=statistics.median(min(s) for s in sides),
        median_long_side=statistics.median(max(s) for s in sides),
        objects_per_image=annotations / len(images),
    )


def cls_data_stats(train_dir: str | Path, sample: int = 64) -> ClsDataStats:
    """Image count and class count of an ImageFolder ``train`` folder; median shorter side of ``sample`` images."""
    root = Path(train_dir)
    classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    files = [f for c in classes for f in sorted(c.iterdir()) if f.is_file()]
    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step][:sample]:
        try:
            with Image.open(f) as im:  # reads the header only
                sides.append(min(im.size))
        except (OSError, ValueError, SyntaxError):
            continue  # unreadable files are reported by the dataset itself
    return ClsDataStats(num_images=len(files), num_classes=len(classes),
                        median_short_side=statistics.median(sides) if sides else 224.0)


def _workers() -> int:
    """Loader processes: none on a machine of 2 cores or fewer, where they would take cores from the compute threads;
    else up to 4, leaving half the cores to compute."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def det_recipe(stats: DetDataStats, batch_size: int, world_size: int = 1) -> tuple[dict[str, Any], dict[str, str]]:
    """Config values for a detection set (over the 1x defaults of ``DetTrainConfig``) and, per key, why.

    - ``iters``: 12 epochs at the run's total batch (1x on COCO is 12.3), at least 1000.
    - ``min_sizes``/``max_size``: sets whose images are smaller than COCO's train near their own size
      (multi-scale 0.8-1.0 of the median shorter side, test at that side; max side 5/3 of it, as 800/1333)
      instead of upsampling them to 800 px.
    - ``detector_options.box_batch_size_per_image``: 128 on small sets, 512 (the default) on large ones.
    - ``workers``: loader processes for this machine (:func:`_workers`).
    """
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    epoch_iters = max(1, stats.num_images // (batch_size * world_size))
    values["iters"] = max(1000, DET_EPOCHS * epoch_iters)
    reasons["iters"] = (f"iters {values['iters']}: {DET_EPOCHS} epochs of {stats.num_images} images at "
                        f"{batch_size * world_size} per iteration (at least 1000)")
    if stats.median_short_side < 0.8 * _COCO_TEST_SIZE:
        test = _round_to(stats.median_short_side, 32)
        values["min_sizes"] = sorted({_round_to(test * f, 32) for f in (0.8, 0.85, 0.9, 0.95, 1.0)})
        values["max_size"] = _round_to(test * _COCO_MAX_SIZE / _COCO_TEST_SIZE, 32)
        reasons["min_sizes"] = (f"image sizes {values['min_sizes']}: the images' median shorter side is "
                                f"{stats.median_short_side:.0f} px, not upsampled to COCO's 800")
        reasons["max_size"] = f"max image side {values['max_size']}: 5/3 of the test size, as 1333 of 800"
    if stats.num_images < SMALL_DET_SET:
        values["detector_options"] = {"box_batch_size_per_image": 128}
        reasons["detector_options"] = (f"128 sampled RoIs per image: a small set ({stats.num_images} < "
                                       f"{SMALL_DET_SET} images, {stats.objects_per_image:.1f} objects per image)")
    values["workers"] = _workers()
    reasons["workers"] = f"{values['workers']} loader processes on {os.cpu_count()} cores"
    return values, reasons


def cls_recipe(stats: ClsDataStats) -> tuple[Path, dict[str, Any], dict[str, str]]:
    """``(recipe YAML, config values over it, why per key)`` for a classification set.

    ImageNet-sized sets (at least ``LARGE_CLS_SET`` images of 128 px or more) get the V1 recipe
    (``configs/cls/resnet50_v1.yaml``); all others ``configs/cls/small_set.yaml`` (AdamW, cosine with
    warmup, label smoothing, milder crops) at an image size near their own (median shorter side,
    multiple of 16, 32-224 px).
    """
    workers = {"workers": _workers()}
    why_workers = {"workers": f"{workers['workers']} loader processes on {os.cpu_count()} cores"}
    if stats.num_images >= LARGE_CLS_SET and stats.median_short_side >= 128:
        return (_CLS_RECIPES / "resnet50_v1.yaml", workers,
                {"config": f"recipe resnet50_v1.yaml: an ImageNet-sized set ({stats.num_images} images)",
                 **why_workers})
    size = min(224, max(32, _round_to(stats.median_short_side, 16)))
    reasons = {"config": f"recipe small_set.yaml: {stats.num_images} images in {stats.num_classes} classes "
                         f"(fewer than {LARGE_CLS_SET}, or smaller than 128 px)",
               "image_size": f"image size {size}: the images' median shorter side is "
                             f"{stats.median_short_side:.0f} px",
               **why_workers}
    return _CLS_RECIPES / "small_set.yaml", {"image_size": size, **workers}, reasons


def under_flags(values: dict[str, Any], reasons: dict[str, str], given: dict[str, Any]) -> dict[str, Any]:
    """The values chosen from the data with the flags ``given`` on top; logs the reason for each chosen value
    that no flag overrides."""
    for key, reason in reasons.items():
        if key not in given:
            logger.info("recipe from the data (--config to choose one): %s", reason)
    return {**values, **given}
