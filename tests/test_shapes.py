"""Synthetic shapes datasets: COCO validity, variety, determinism, caching, ImageFolder layout, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.datasets import ImageFolder

from tools.engine import shapes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_paths(tmp_path_factory):
    return shapes.make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_train=20, num_val=10, seed=3)


def test_coco_json_is_valid_and_varied(coco_paths):
    for split in ("train", "val"):
        coco = COCO(str(coco_paths[f"{split}_ann"]))
        assert sorted(coco.getCatIds()) == [1, 3, 7]  # sparse on purpose
        anns = coco.dataset["annotations"]
        kinds = {"polygon" if isinstance(a["segmentation"], list)
                 else "rle_str" if isinstance(a["segmentation"]["counts"], str) else "rle_list" for a in anns}
        if split == "train":
            assert kinds == {"polygon", "rle_str", "rle_list"}
            assert any(a["iscrowd"] for a in anns)
        assert any(not coco.getAnnIds(imgIds=[i]) for i in coco.getImgIds()), "no empty image"
        assert len({a["category_id"] for a in anns}) == 3
        for ann in anns:
            img = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            assert mask.shape == (img["height"], img["width"])
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            # the box is the mask's extent, fully inside the image
            assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
            assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
            assert ann["area"] == pytest.approx(mask.sum(), rel=0.02)
            assert 0 <= x and x + w <= img["width"] and 0 <= y and y + h <= img["height"]


def test_images_are_real_jpegs_of_varied_size(coco_paths):
    data = json.loads(coco_paths["train_ann"].read_text())
    sizes = set()
    for img in data["images"]:
        with Image.open(coco_paths["train_images"] / img["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
            assert 128 <= im.width <= 192 and 128 <= im.height <= 192
            sizes.add(im.size)
    assert len(sizes) > 10
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_shapes_are_visible_in_the_pixels(coco_paths):
    data = json.loads(coco_paths["train_ann"].read_text())
    img = next(i for i in data["images"] if any(a["image_id"] == i["id"] for a in data["annotations"]))
    ann = next(a for a in data["annotations"] if a["image_id"] == img["id"])
    pixels = np.asarray(Image.open(coco_paths["train_images"] / img["file_name"]), dtype=np.float64)
    rle = mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"])
    mask = mask_utils.decode(mask_utils.merge(rle) if isinstance(rle, list) else rle).astype(bool)
    inside = pixels[mask].std(0).mean()
    assert inside < pixels.reshape(-1, 3).std(0).mean()  # a flat-coloured shape, not noise


def test_coco_is_deterministic_from_seed(tmp_path, coco_paths):
    again = shapes.make_shapes_coco(tmp_path / "a", num_train=20, num_val=10, seed=3)
    other = shapes.make_shapes_coco(tmp_path / "b", num_train=20, num_val=10, seed=4)
    assert again["train_ann"].read_bytes() == coco_paths["train_ann"].read_bytes()
    assert again["val_ann"].read_bytes() == coco_paths["val_ann"].read_bytes()
    assert ((again["train_images"] / "000001.jpg").read_bytes()
            == (coco_paths["train_images"] / "000001.jpg").read_bytes())
    assert other["train_ann"].read_bytes() != coco_paths["train_ann"].read_bytes()


def _small_coco(root):
    return _REAL_MAKE_COCO(root, num_train=4, num_val=2, image_size=(40, 48))


_REAL_MAKE_COCO = shapes.make_shapes_coco


def test_default_coco_is_cached_and_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(shapes, "make_shapes_coco", lambda root: calls.append(root) or _small_coco(root))
    monkeypatch.setenv("RESDET_CACHE", str(tmp_path / "cache"))
    first = shapes.default_shapes_coco()
    assert first["train_ann"].parent.parent == tmp_path / "cache" / shapes.COCO_CACHE_NAME
    mtime = first["train_ann"].stat().st_mtime_ns
    second = shapes.default_shapes_coco()
    assert second == first and len(calls) == 1
    assert second["train_ann"].stat().st_mtime_ns == mtime
    COCO(str(second["val_ann"]))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [shapes.COCO_CACHE_NAME]  # no temp dirs left


def test_default_coco_race_loser_uses_winner(tmp_path, monkeypatch):
    """A process that finishes second discards its copy and returns the winner's folder."""
    cache = tmp_path / "cache"

    def slow_loser(root):
        if not (cache / shapes.COCO_CACHE_NAME).exists():
            monkeypatch.setattr(shapes, "make_shapes_coco", _small_coco)
            winner = shapes.default_shapes_coco(cache)  # another process wins meanwhile
            (winner["train_ann"].parent / "winner").touch()
        return _small_coco(root)

    monkeypatch.setattr(shapes, "make_shapes_coco", slow_loser)
    paths = shapes.default_shapes_coco(cache)
    assert (paths["train_ann"].parent / "winner").exists()
    assert [p.name for p in cache.iterdir()] == [shapes.COCO_CACHE_NAME]


def test_imagefolder_layout_loads(tmp_path):
    root = shapes.make_shapes_imagefolder(tmp_path, num_classes=6, train_per_class=3, val_per_class=2,
                                          image_size=32, seed=1)
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    assert train.classes == sorted(shapes.CLASSIFICATION_KINDS[:6]) == val.classes
    assert len(train) == 18 and len(val) == 12
    image, label = train[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0
    assert all(p.endswith(".JPEG") for p, _ in train.samples)
    # classes differ visibly: the mean image of two classes is not the same
    mean = [np.mean([np.asarray(train[i][0], dtype=float) for i in range(c * 3, c * 3 + 3)], 0) for c in (0, 1)]
    assert np.abs(mean[0] - mean[1]).mean() > 1.0


def test_imagefolder_deterministic_and_cached(tmp_path, monkeypatch):
    a = shapes.make_shapes_imagefolder(tmp_path / "a", num_classes=2, train_per_class=2, val_per_class=1,
                                       image_size=24, seed=5)
    b = shapes.make_shapes_imagefolder(tmp_path / "b", num_classes=2, train_per_class=2, val_per_class=1,
                                       image_size=24, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*.JPEG"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.JPEG"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    real = shapes.make_shapes_imagefolder
    calls = []
    monkeypatch.setattr(shapes, "make_shapes_imagefolder",
                        lambda root: calls.append(root) or real(root, 2, 1, 1, 24))
    first = shapes.default_shapes_imagefolder(tmp_path / "cache")
    assert shapes.default_shapes_imagefolder(tmp_path / "cache") == first and len(calls) == 1
    assert len(ImageFolder(str(first / "train"))) == 2


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        shapes.make_shapes_imagefolder("/nonexistent", num_classes=99)
    with pytest.raises(ValueError, match="image_size"):
        shapes.make_shapes_coco("/nonexistent", image_size=(200, 100))
    with pytest.raises(ValueError, match="valid kinds"):
        shapes.shape_polygons("hexagon", 0, 0, 1)


def test_cli_writes_coco(tmp_path):
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_shapes.py"), "--kind", "coco", "--output-dir",
                    str(out), "--num-train", "3", "--num-val", "2", "--seed", "1"], check=True, cwd=tmp_path,
                   capture_output=True)
    data = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 3 and len(list((out / "val").glob("*.jpg"))) == 2
