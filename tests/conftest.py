"""Fixtures shared by the test modules.

The data sets are written once per session: tests only read them (a test that changes data copies it to its own
``tmp_path`` first).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.engine.shapes import make_shapes_coco, make_shapes_imagefolder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny inputs skip OpenMP's per-op synchronisation, and in-process results match
    subprocesses run with one thread (CPU kernels may sum in a thread-dependent order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def coco_shapes(tmp_path_factory) -> dict[str, str]:
    """The shapes COCO set (tools.engine.shapes) at its smallest: 8 training and 4 validation images of 64 x 64,
    sparse category ids {1, 3, 7}, polygon, RLE and crowd annotations, an image without any. Paths as strings,
    as configs hold them: ``train_images``, ``train_ann``, ``val_images``, ``val_ann``."""
    paths = make_shapes_coco(tmp_path_factory.mktemp("coco_shapes"), num_train=8, num_val=4, image_size=(64, 64))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def coco_varied(tmp_path_factory) -> dict[str, Path]:
    """A larger shapes COCO set for the data and evaluation tests: 24 training and 20 validation images of 64 to
    96 pixels a side (portrait and landscape)."""
    return make_shapes_coco(tmp_path_factory.mktemp("coco_varied"), num_train=24, num_val=20, image_size=(64, 96),
                            seed=1)


@pytest.fixture(scope="session")
def shapes_imagefolder(tmp_path_factory) -> Path:
    """The synthetic shapes classification set, 2 classes x (6 training + 2 validation) images of 32 px:
    3 iterations an epoch at batch 4."""
    return make_shapes_imagefolder(tmp_path_factory.mktemp("shapes_imagefolder"), num_classes=2, train_per_class=6,
                                   val_per_class=2, image_size=32, seed=1)


@pytest.fixture(scope="session")
def colour_imagefolder(tmp_path_factory) -> Path:
    """Two classes told apart by colour ("blue" and "red" noise), 8 training and 4 validation images each, 16 px:
    learnable in a few iterations, 4 iterations an epoch at batch 4."""
    root = tmp_path_factory.mktemp("colour_imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for cls, channel in (("blue", 2), ("red", 0)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 120, size=(16, 16, 3), dtype=np.uint8)
                img[..., channel] = 200
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root
