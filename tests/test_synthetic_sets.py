"""Synthetic tune/measure sets (tools.engine.synthetic_sets, tools/make_synthetic.py) and the torchvision
reference loops (tools/reference_loops.py)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.datasets import ImageFolder

from tools import make_synthetic, reference_loops
from tools.engine.coco_dataset import CocoDetection
from tools.engine.shapes import COCO_CATEGORIES
from tools.engine.synthetic_sets import STYLES, cls_classes, make_cls_set, make_det_set

SEED = 3


@pytest.fixture(scope="module")
def det_sets(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("synthetic_det")
    return {style: make_det_set(root / style, style, num_train=12, num_val=5, seed=SEED) for style in STYLES}


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


def _segm_kind(segm: list | dict) -> str:
    if isinstance(segm, list):
        return "polygon"
    return "rle_string" if isinstance(segm["counts"], str) else "rle_counts"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_det_set_loads_with_required_properties(det_sets, style, split):
    paths = det_sets[style]
    raw = _raw(paths[f"{split}_ann"])
    dataset = CocoDetection(paths[f"{split}_images"], paths[f"{split}_ann"], None, with_masks=True)
    assert not any(dataset.dropped.values()) and dataset.clipped == 0
    assert len(dataset) == len(raw["images"])

    cat_ids = {c["id"] for c in raw["categories"]}
    assert not cat_ids & set(COCO_CATEGORIES) and cat_ids != set(range(1, len(cat_ids) + 1))
    assert all(c["name"] for c in raw["categories"])
    kinds = Counter(_segm_kind(a["segmentation"]) for a in raw["annotations"] if not a["iscrowd"])
    assert set(kinds) == {"polygon", "rle_string", "rle_counts"}, kinds
    crowds = [a for a in raw["annotations"] if a["iscrowd"]]
    assert crowds and all(_segm_kind(a["segmentation"]) == "rle_counts" for a in crowds)
    annotated = {a["image_id"] for a in raw["annotations"]}
    assert any(img["id"] not in annotated for img in raw["images"])
    assert any(img["width"] != img["height"] for img in raw["images"])

    checked = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape[0] == 3
        anns = [a for a in raw["annotations"] if a["image_id"] == target["image_id"] and not a["iscrowd"]]
        assert len(target["masks"]) == len(anns) <= 8
        for mask, box, ann in zip(target["masks"], target["boxes"], anns):
            area = int(mask.sum())
            assert abs(area - ann["area"]) <= 0.03 * ann["area"], (area, ann)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(mask_box, box, atol=1.0), (mask_box, box)
            checked += 1
    assert checked >= 10
    for crowd in crowds:  # crowd areas and boxes are right too
        rle = mask_utils.frPyObjects(crowd["segmentation"], *crowd["segmentation"]["size"])
        assert mask_utils.area(rle) == crowd["area"] and list(mask_utils.toBbox(rle)) == crowd["bbox"]


def test_det_styles_differ(det_sets):
    raws = {style: _raw(det_sets[style]["train_ann"]) for style in STYLES}
    cats = {style: {c["id"] for c in raw["categories"]} for style, raw in raws.items()}
    assert not cats["tune"] & cats["measure"] and len(cats["tune"]) != len(cats["measure"])
    assert len(cats["tune"]) != len(COCO_CATEGORIES) != len(cats["measure"])
    names = {style: {c["name"] for c in raw["categories"]} for style, raw in raws.items()}
    assert not names["tune"] & names["measure"]
    suffixes = {style: {Path(i["file_name"]).suffix for i in raw["images"]} for style, raw in raws.items()}
    assert suffixes["tune"] != suffixes["measure"]


def test_det_object_sizes_and_image_sizes(det_sets):
    for style in STYLES:
        raw = _raw(det_sets[style]["train_ann"])
        sides = [max(a["bbox"][2:]) for a in raw["annotations"] if not a["iscrowd"]]
        assert min(sides) <= 16 and max(sides) >= 80, (style, sorted(sides))
        assert all(150 <= max(i["width"], i["height"]) <= 400 for i in raw["images"])


def test_det_set_deterministic_and_seeded(det_sets, tmp_path):
    """Same seed: the same files (a smaller set is a prefix of a larger one); another seed: other files."""
    big = det_sets["measure"]
    small = make_det_set(tmp_path / "same", "measure", num_train=4, num_val=2, seed=SEED)
    big_raw, small_raw = _raw(big["train_ann"]), _raw(small["train_ann"])
    assert small_raw["images"] == big_raw["images"][:4]
    kept = {i["id"] for i in small_raw["images"]}
    assert small_raw["annotations"] == [a for a in big_raw["annotations"] if a["image_id"] in kept]
    for img in small_raw["images"]:
        assert (small["train_images"] / img["file_name"]).read_bytes() == \
            (big["train_images"] / img["file_name"]).read_bytes()
    other = make_det_set(tmp_path / "other", "measure", num_train=4, num_val=2, seed=SEED + 1)
    assert _raw(other["train_ann"])["annotations"] != small_raw["annotations"]


def test_det_set_reused_refused_and_checked(tmp_path):
    paths = make_det_set(tmp_path / "set", "tune", num_train=2, num_val=1, image_size=(64, 96))
    stamp = paths["train_ann"].stat().st_mtime_ns
    assert make_det_set(tmp_path / "set", "tune", num_train=2, num_val=1, image_size=(64, 96)) == paths
    assert paths["train_ann"].stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="not empty"):
        make_det_set(tmp_path / "set", "tune", num_train=3, num_val=1, image_size=(64, 96))
    with pytest.raises(ValueError, match="tune"):
        make_det_set(tmp_path / "x", "shapes")
    with pytest.raises(ValueError, match="image_size"):
        make_det_set(tmp_path / "x", "tune", image_size=(100, 50))
    assert not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.parametrize("style", STYLES)
def test_cls_set_imagefolder(tmp_path, style):
    root = make_cls_set(tmp_path / style, style, num_train_per_class=3, num_val_per_class=2, image_size=40, seed=1)
    train, val = ImageFolder(root / "train"), ImageFolder(root / "val")
    assert train.classes == val.classes == sorted(cls_classes(style))
    assert len(train) == 3 * len(train.classes) and len(val) == 2 * len(val.classes)
    assert train[0][0].size == (40, 40)
    again = make_cls_set(tmp_path / "again", style, num_train_per_class=3, num_val_per_class=2, image_size=40, seed=1)
    for path, _ in train.samples:
        assert Path(path).read_bytes() == (again / Path(path).relative_to(root)).read_bytes()


def test_cls_styles_differ():
    assert len(cls_classes("tune")) != len(cls_classes("measure"))
    assert not set(cls_classes("tune")) & set(cls_classes("measure"))


def test_make_synthetic_cli(tmp_path):
    paths = make_synthetic.main(["det", "--style", "measure", "--out", str(tmp_path / "det"), "--num-train", "2",
                                 "--num-val", "1", "--image-size", "64", "96"])
    assert len(_raw(paths["train_ann"])["images"]) == 2
    paths = make_synthetic.main(["cls", "--style", "tune", "--out", str(tmp_path / "cls"), "--num-train", "1",
                                 "--num-val", "1", "--image-size", "32"])
    assert len(ImageFolder(paths["train"])) == 5


def test_reference_det_smoke(tmp_path, one_thread):
    paths = make_det_set(tmp_path / "tiny", "tune", num_train=4, num_val=2, image_size=(64, 128))
    out = tmp_path / "det.json"
    report = reference_loops.main([
        "det", "--train-images", str(paths["train_images"]), "--train-ann", str(paths["train_ann"]),
        "--val-images", str(paths["val_images"]), "--val-ann", str(paths["val_ann"]), "--iters", "2",
        "--min-size", "64", "--max-size", "128", "--box-batch-size-per-image", "8", "--threads", "1",
        # few proposals and detections: the untrained model's 100 masks per image would dominate the time
        "--detector-option", "rpn_pre_nms_top_n_test=100", "--detector-option", "rpn_post_nms_top_n_test=50",
        "--detector-option", "box_detections_per_img=10", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["diverged"] is False and report["iters_done"] == 2
    for key in ("bbox_AP", "bbox_AP50", "segm_AP"):
        assert 0.0 <= report[key] <= 1.0
    assert report["seconds_per_iter"] > 0 and np.isfinite(report["final_loss"]) and report["total_s"] > 0
    assert report["settings"]["detector_options"]["box_detections_per_img"] == 10


def test_reference_cls_smoke(tmp_path, one_thread):
    root = make_cls_set(tmp_path / "tiny", "measure", num_train_per_class=4, num_val_per_class=2, image_size=32)
    report = reference_loops.main(["cls", "--data", str(root), "--epochs", "1", "--batch-size", "8",
                                   "--threads", "1", "--json", str(tmp_path / "cls.json")])
    assert 0.0 <= report["top1"] <= 1.0 and len(report["top1_per_epoch"]) == 1
    assert report["settings"]["num_classes"] == 6 and report["settings"]["image_size"] == 32
    assert report["diverged"] is False and report["seconds_per_epoch"] > 0
