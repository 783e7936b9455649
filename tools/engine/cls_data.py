"""Classification data: ImageFolder sets (``DIR/train`` and ``DIR/val``) with timm's transforms, unreadable
images named or skipped, and the loaders."""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate
from torchvision.datasets import ImageFolder

from tools.engine.cls_config import ClsTrainConfig
from tools.engine.images import read_rgb_image
from tools.engine.samplers import ShardSampler

__all__ = ["EXPECTED_LAYOUT", "image_folder", "collate_skipping_none", "check_layout", "build_transforms",
           "build_datasets", "eval_loader"]

logger = logging.getLogger(__name__)

EXPECTED_LAYOUT = "DIR/train/<class_name>/<image>.jpg and DIR/val/<class_name>/<image>.jpg (torchvision ImageFolder)"


class _CheckedImageFolder(ImageFolder):
    """ImageFolder that reads every pixel format (:func:`tools.engine.images.read_rgb_image`) and names
    unreadable images in a ValueError, or yields ``None`` for them when skipping."""

    def __init__(self, root: str | Path, transform: Any, skip_bad_images: bool) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb_image)
        self.skip_bad_images = skip_bad_images

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, ValueError) as e:  # read_rgb_image names the file
            if self.skip_bad_images:
                logger.warning("skipping unreadable image %s: %s", path, e)
                return None
            raise ValueError(f"{e}. Fix or delete it, or pass --skip-bad-images") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skipping_none(
    batch: list[tuple[Tensor, int] | None], min_images: int = 2
) -> tuple[Tensor | None, Tensor | None, int]:
    """``(images, targets, number of skipped images)``; images is None if the whole batch was skipped.

    A batch that skipping shrank below ``min_images`` is skipped whole (its images counted as skipped):
    training BatchNorm fails on a batch of one image once the feature maps are 1x1. Evaluation passes 1.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if skipped and len(good) < min_images:
        good, skipped = [], len(batch)
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)
    return images, targets, skipped


def image_folder(root: Path, transform: Any, skip_bad_images: bool) -> _CheckedImageFolder:
    try:
        return _CheckedImageFolder(root, transform, skip_bad_images)
    except FileNotFoundError as e:  # ImageFolder: no class folders, or no images in them
        raise ValueError(f"bad dataset folder {root}: {e}. Expected layout: {EXPECTED_LAYOUT}") from None


def check_layout(data: str | Path) -> tuple[Path, Path]:
    """``(DIR/train, DIR/val)`` after checking both exist; ``ValueError`` naming the expected layout otherwise."""
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"data folder {root} has no {' or '.join(missing)} folder. Expected layout: {EXPECTED_LAYOUT}")
    return root / "train", root / "val"


def build_transforms(cfg: ClsTrainConfig) -> tuple[Any, Any]:
    """``(train_transform, eval_transform)`` from timm's ``create_transform``."""
    train_size = cfg.train_image_size or cfg.image_size
    train_tf = create_transform(
        train_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.re_prob,
    )
    eval_tf = create_transform(
        cfg.image_size, is_training=False, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation
    )
    return train_tf, eval_tf


def build_datasets(data: str | Path, cfg: ClsTrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """``(train_set, val_set, class_names)`` from ``DIR/train`` and ``DIR/val``; checks the layout."""
    train_dir, val_dir = check_layout(data)
    train_tf, eval_tf = build_transforms(cfg)
    train_set = image_folder(train_dir, train_tf, cfg.skip_bad_images)
    val_set = image_folder(val_dir, eval_tf, cfg.skip_bad_images)
    if train_set.classes != val_set.classes:
        raise ValueError(
            f"train and val class folders differ: train {train_set.classes}, val {val_set.classes}. "
            f"Expected layout: {EXPECTED_LAYOUT}"
        )
    return train_set, val_set, list(train_set.classes)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers,
        collate_fn=functools.partial(collate_skipping_none, min_images=1),
        # Own generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(0),
    )
