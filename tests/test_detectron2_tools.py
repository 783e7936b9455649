"""detectron2 model-zoo files through the library and the tools: ``heads.load_detector`` reads the model from the
weights, eval_coco/infer map COCO's 80 classes to a set's category ids, train_det fine-tunes a zoo model and starts
from MSRA's Caffe2 ImageNet weights, under ``style: detectron2`` recipes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import heads
from tools import eval_coco, infer, train_det
from tools.engine.shapes import make_shapes_coco
from tools.make_detectron_reference import (
    DETECTOR_CASES,
    Case,
    caffe2_resnet_blobs,
    detectron2_rcnn_state,
    write_detectron2_pkl,
    write_pickle,
)

# R50-FPN at an eighth of its widths, COCO's 80 classes; no background bias, so that small images have detections.
CASE = DETECTOR_CASES["mask_rcnn_R_50_FPN-narrow"]._replace(background_offset=0.0)
SMALL = ["--min-size", "96", "--max-size", "160"]
# shapes' categories renamed and renumbered as three of COCO's: a COCO model's labels must land on these ids.
COCO_IDS = {1: (1, "person"), 3: (3, "car"), 7: (90, "toothbrush")}


@pytest.fixture(scope="module")
def zoo_pkl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zoo") / "model_final_narrow.pkl"
    write_detectron2_pkl(detectron2_rcnn_state(CASE), path)
    return path


@pytest.fixture(scope="module")
def coco_subset(tmp_path_factory) -> dict[str, str]:
    paths = make_shapes_coco(tmp_path_factory.mktemp("subset"), num_train=4, num_val=3, image_size=(64, 96), seed=3)
    for split in ("train_ann", "val_ann"):
        data = json.loads(Path(paths[split]).read_text())
        data["categories"] = [{"id": COCO_IDS[c["id"]][0], "name": COCO_IDS[c["id"]][1]} for c in data["categories"]]
        for ann in data["annotations"]:
            ann["category_id"] = COCO_IDS[ann["category_id"]][0]
        Path(paths[split]).write_text(json.dumps(data))
    return {k: str(v) for k, v in paths.items()}


def test_load_detector_reads_the_model_from_a_zoo_file(zoo_pkl):
    model, info = heads.load_detector(zoo_pkl, {"min_size": 96, "max_size": 160})
    spec = info["model_spec"]
    assert (spec["style"], spec["kind"], spec["backbone"], spec["num_classes"]) == ("detectron2", "mask_rcnn",
                                                                                   "resnet50", 80)
    assert spec["backbone_options"] == {"base_channels": 8} and spec["fpn_options"] == {"out_channels": 32}
    assert spec["options"]["box_head_width"] == 128 and spec["options"]["mask_head_width"] == 32
    # COCO's names and category ids, in id order.
    assert info["coco_labels"] and len(info["class_names"]) == 80
    assert (info["class_names"][0], info["class_names"][-1]) == ("person", "toothbrush")
    assert (info["label_to_cat_id"][1], info["label_to_cat_id"][12], info["label_to_cat_id"][80]) == (1, 13, 90)

    reference = heads.build_detector("mask_rcnn", "resnet50", **{**CASE.build_options(), "min_size": 96,
                                                                 "max_size": 160})
    heads.load_weights(reference, zoo_pkl)
    image = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.eval()([image])[0], reference.eval()([image])[0]
    assert len(want["boxes"]) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_eval_coco_and_infer_map_coco_classes_to_the_sets_ids(zoo_pkl, coco_subset, tmp_path):
    assert eval_coco.main(["--weights", str(zoo_pkl), "--val-images", coco_subset["val_images"],
                           "--val-ann", coco_subset["val_ann"], "--output-dir", str(tmp_path / "eval"),
                           "--workers", "0", "--device", "cpu", *SMALL]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"bbox", "segm"} <= set(metrics)
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 90}  # the other 77 classes are left out

    image = next(Path(coco_subset["val_images"]).iterdir())
    assert infer.main([str(image), "--weights", str(zoo_pkl), "--output-dir", str(tmp_path / "infer"),
                       "--score-thresh", "0.05", "--device", "cpu", "--no-progress", *SMALL]) == 0
    detections = json.loads((tmp_path / "infer" / "detections.json").read_text())[0]["detections"]
    _, info = heads.load_detector(zoo_pkl)
    assert detections
    for d in detections:  # names and ids are COCO's, label k is detectron2's class k - 1
        assert d["category_name"] == info["class_names"][d["label"] - 1]
        assert d["category_id"] == info["label_to_cat_id"][d["label"]]


def _recipe(tmp_path: Path, data: dict[str, str]) -> Path:
    """A detectron2-style recipe at the zoo file's narrow widths, two iterations at small sizes."""
    recipe = {"style": "detectron2", "detector": "mask_rcnn", "backbone": "resnet50",
              "backbone_options": {"base_channels": 8}, "fpn_options": {"out_channels": 32},
              "detector_options": {"box_head_width": 128, "mask_head_width": 32, "box_batch_size_per_image": 32},
              "iters": 2, "batch_size": 2, "base_lr": 0.001, "base_batch_size": 2, "steps": [100],
              "warmup_iters": 0, "min_sizes": [64], "max_size": 96, "workers": 0, "device": "cpu",
              "checkpoint_every": None, "eval_every": None, "vis_images": 0, **data}
    path = tmp_path / "d2_narrow.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_det_fine_tunes_a_zoo_model_under_a_detectron2_recipe(zoo_pkl, coco_subset, tmp_path):
    out = tmp_path / "run"
    assert train_det.main(["--config", str(_recipe(tmp_path, coco_subset)), "--weights", str(zoo_pkl),
                           "--output-dir", str(out)]) == 0
    model, info = heads.load_detector(out / "model_final.pth")
    assert info["model_spec"]["style"] == "detectron2" and info["model_spec"]["num_classes"] == 3
    assert isinstance(model.roi_heads.box_predictor, heads.detectron2.Detectron2BoxPredictor)
    assert info["label_to_cat_id"] == {1: 1, 2: 3, 3: 90}
    # res2 is frozen in detectron2's recipes: it still holds the zoo file's weights.
    zoo = heads.build_detector("mask_rcnn", "resnet50", **CASE.build_options())
    heads.load_weights(zoo, zoo_pkl)
    for key in ("backbone.body.layer1.0.conv2.weight", "backbone.body.conv1.weight"):
        assert torch.equal(model.state_dict()[key], zoo.state_dict()[key])
    assert not torch.equal(model.state_dict()["backbone.fpn.inner_blocks.0.0.weight"],
                           zoo.state_dict()["backbone.fpn.inner_blocks.0.0.weight"])


def test_train_det_starts_from_msra_caffe2_imagenet_weights(coco_subset, tmp_path):
    case = Case(50, 8, 1, 8, True, seed=11, layout="blobs", protocol=4)  # R-50.pkl's layout at 1/8 width
    blobs = caffe2_resnet_blobs(case)
    pretrained = tmp_path / "R-50.pkl"
    write_pickle(case, blobs, pretrained)
    out = tmp_path / "run"
    assert train_det.main(["--config", str(_recipe(tmp_path, coco_subset)), "--pretrained", str(pretrained),
                           "--output-dir", str(out)]) == 0
    state = heads.load_detector(out / "model_final.pth")[0].state_dict()
    # The frozen stem and res2 are MSRA's: the conv weights as stored, the affine-only BN as scale and bias.
    assert torch.equal(state["backbone.body.conv1.weight"], torch.from_numpy(blobs["conv1_w"]))
    assert torch.equal(state["backbone.body.layer1.0.conv1.weight"], torch.from_numpy(blobs["res2_0_branch2a_w"]))
    assert torch.equal(state["backbone.body.bn1.weight"], torch.from_numpy(blobs["res_conv1_bn_s"]))


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "detectron2").glob("*.yaml")))
def test_detectron2_recipes_are_what_their_names_and_commands_say(name):
    from tools.engine.det_config import build_config, model_spec

    kind, depth, multiple = re.fullmatch(r"(faster_rcnn|mask_rcnn)_R(\d+)_FPN_(\d)x\.yaml", name).groups()
    path = REPO / "configs" / "detectron2" / name
    cfg, _ = build_config(path)
    assert (cfg.style, cfg.detector, cfg.backbone, cfg.iters) == ("detectron2", kind, f"resnet{depth}",
                                                                 int(multiple) * 90000)
    text = path.read_text()
    zoo = re.search(r"train_det.py --config (\S+) --weights (model_final_\w+\.pkl) --eval-only", text)
    start = re.search(r"--nproc_per_node (\d+) tools/train_det.py --config (\S+) \\\s+#?\s*--pretrained R-(\d+)\.pkl",
                      text)
    assert zoo[1] == start[2] == f"configs/detectron2/{name}" and start[3] == depth
    assert int(start[1]) * cfg.batch_size == cfg.base_batch_size  # the documented run trains at base_lr
    spec = model_spec(cfg, num_classes=81)  # COCO: 80 classes and the background
    assert spec["style"] == "detectron2" and spec["num_classes"] == 80
    with torch.device("meta"):
        model = heads.build_from_spec(spec)
    assert isinstance(model.roi_heads.box_predictor, heads.detectron2.Detectron2BoxPredictor)
    assert model.roi_heads.has_mask() == (kind == "mask_rcnn")


def test_lsj_is_refused_for_detectron2_recipes():
    from tools.engine.det_config import build_config

    with pytest.raises(ValueError, match="lsj .* style torchvision"):
        build_config(REPO / "configs" / "detectron2" / "faster_rcnn_R50_FPN_1x.yaml", {"lsj": True})
