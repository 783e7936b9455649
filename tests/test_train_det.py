"""Detection training: schedule, configs and recipes, loss falls, outputs, eval-only, DDP, start weights."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import backbones
from tools.engine import det_train
from tools.engine.coco_eval import METRIC_NAMES
from tools.engine.config import load_config
from tools.engine.det_config import DetTrainConfig, build_config, model_spec
from heads.spec import build_from_spec
from tools.engine.det_train import WarmupMultiStep, train
from tools.reference_models import TINY_DET_TRAINING, randomize_norm_stats

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

def tiny_config(data: dict, output_dir: Path, **overrides) -> DetTrainConfig:
    return load_config(DetTrainConfig, None, {**TINY_DET_TRAINING, **data, "output_dir": str(output_dir), **overrides})


def write_tiny_yaml(path: Path, data: dict, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**TINY_DET_TRAINING, **data, **overrides}))
    return path


def losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# ----------------------------------------------------------------------------- schedule and configs


def test_warmup_multistep_factors():
    f = WarmupMultiStep(steps=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    assert f(0) == pytest.approx(0.001)
    assert f(5) == pytest.approx(0.001 * 0.5 + 0.5)  # halfway through the linear ramp
    assert f(10) == 1.0 and f(59) == 1.0
    assert f(60) == pytest.approx(0.1) and f(79) == pytest.approx(0.1)
    assert f(80) == pytest.approx(0.01)


def test_iters_rescales_steps_and_warmup():
    recipe = CONFIGS / "faster_rcnn_R50_FPN_1x.yaml"
    cfg, messages = build_config(recipe, {"iters": 9000})
    assert cfg.iters == 9000
    assert cfg.steps == (6000, 8000)  # 60k/80k of 90k keep their fractions
    assert cfg.warmup_iters == 100
    assert any("6000" in m for m in messages)
    # explicitly given steps are kept as given
    cfg, _ = build_config(recipe, {"iters": 9000, "steps": [5000]})
    assert cfg.steps == (5000,)


def test_unknown_config_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: resnet18\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate") as info:
        build_config(bad)
    assert "base_lr" in str(info.value)  # the valid keys are listed


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*_rcnn_R*_FPN_*x.yaml")))
def test_recipe_is_what_its_name_header_and_command_say(name):
    """The detector and backbone of the name, the schedule of the header (1x = 90k iterations), a documented command
    that trains at the recipe's lr, and a model that builds."""
    path = CONFIGS / name
    text = path.read_text()
    kind, depth, multiple = re.fullmatch(r"(faster_rcnn|mask_rcnn)_R(\d+)_FPN_(\d)x\.yaml", name).groups()
    cfg, _ = build_config(path)
    assert (cfg.detector, cfg.backbone, cfg.iters) == (kind, f"resnet{depth}", int(multiple) * 90000)
    stated = re.search(r"\((\d+)k iterations, decays at (\d+)k and (\d+)k\)", text).groups()
    assert (cfg.iters, *cfg.steps) == tuple(1000 * int(k) for k in stated)  # loaded as written, nothing rescaled
    run = re.search(r"--nproc_per_node (\d+) tools/train_det.py --config (\S+) --pretrained resnet(\d+)-", text)
    assert run[2] == f"configs/{name}" and run[3] == depth  # its own file, ImageNet weights of its backbone
    assert int(run[1]) * cfg.batch_size == cfg.base_batch_size  # so the command trains at base_lr, unscaled
    with torch.device("meta"):  # built without allocating: the spec holds only options the model takes
        model = build_from_spec(model_spec(cfg, num_classes=81))
    assert model.roi_heads.has_mask() == (kind == "mask_rcnn")


def test_shapes_recipe_loads():
    cfg, _ = build_config(CONFIGS / "shapes.yaml")
    assert cfg.train_images is None  # the built-in set


def test_partial_dataset_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="val_ann"):
        build_config(None, {"train_images": str(tmp_path), "train_ann": str(tmp_path / "a.json")})


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def faster_run(coco_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("faster")
    cfg = tiny_config(coco_shapes, out, iters=30, eval_every=15)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tools.engine").addHandler(handler)
    logging.getLogger("tools.engine").setLevel(logging.INFO)
    try:
        metrics = train(cfg)
    finally:
        logging.getLogger("tools.engine").removeHandler(handler)
    return out, metrics, [r.getMessage() for r in records]


def test_faster_rcnn_trains_and_writes_outputs(faster_run):
    out, metrics, messages = faster_run
    loss = losses(out)
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5
    assert any("linear scaling rule: lr = 0.16 x 2 / 16 = 0.02" in m for m in messages)

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"bbox", "per_category"} and set(saved["bbox"]) == set(METRIC_NAMES)
    assert saved["bbox"] == metrics["bbox"]
    assert set(saved["per_category"]["bbox"]) == {"circle", "rectangle", "triangle"}
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 7}  # the dataset's own (sparse) ids
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "bbox_AP" in r] == [15, 30]  # periodic and final evaluation
    for name in ("loss_curve.png", "val_predictions.png", "config.yaml", "model_final.pth"):
        assert (out / name).stat().st_size > 0
    assert list(out.glob("events.out.tfevents.*"))

    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 30
    assert final["model_spec"]["kind"] == "faster_rcnn" and final["model_spec"]["num_classes"] == 4
    assert final["label_to_cat_id"] == {1: 1, 2: 3, 3: 7}
    assert final["class_names"] == ["circle", "rectangle", "triangle"]
    assert {"optimizer", "scheduler", "rng", "config"} <= set(final)


def test_mask_rcnn_trains(coco_shapes, tmp_path):
    cfg = tiny_config(coco_shapes, tmp_path, detector="mask_rcnn", iters=20, vis_images=1)
    metrics = train(cfg)
    loss = losses(tmp_path)
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5
    assert set(metrics) == {"bbox", "segm"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["segm"]) == set(METRIC_NAMES)
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert all("segmentation" in r for r in results)


def test_eval_only_reproduces_final_metrics(faster_run, coco_shapes, tmp_path):
    out, metrics, _ = faster_run
    weights = out / "model_final.pth"
    again = det_train.run_from_args(
        None, {**TINY_DET_TRAINING, **coco_shapes, "weights": str(weights), "output_dir": str(tmp_path)},
        eval_only=True,
    )
    assert again == metrics
    assert set(json.loads((tmp_path / "metrics.json").read_text())["bbox"]) == set(METRIC_NAMES)


def test_pretrained_classification_checkpoint_loads_into_backbone(tmp_path):
    classifier = randomize_norm_stats(backbones.resnet18(num_classes=4))
    state = classifier.state_dict()
    torch.save({"model": state}, tmp_path / "model_final.pth")

    cfg = load_config(DetTrainConfig, None, {**TINY_DET_TRAINING, "backbone_options": {},
                                             "pretrained": str(tmp_path / "model_final.pth")})
    model = build_from_spec(model_spec(cfg, 4))
    det_train.load_start_weights(model, cfg.pretrained, cfg.weights)
    body = model.backbone.body.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body[key], value), key
        compared += 1
    assert compared > 50
    # pretrained defaults: FrozenBN, stem and c2 frozen, the rest trainable
    assert isinstance(model.backbone.body.bn1, backbones.FrozenBatchNorm2d)
    assert not model.backbone.body.conv1.weight.requires_grad
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


def test_detector_weights_with_other_class_count_skip_the_predictor(caplog):
    cfg = load_config(DetTrainConfig, None, TINY_DET_TRAINING)
    source = build_from_spec(model_spec(cfg, 6))
    target = build_from_spec(model_spec(cfg, 4))
    with caplog.at_level(logging.WARNING):
        det_train.load_start_weights(target, None, source.state_dict())
    assert "another number of classes" in caplog.text
    assert torch.equal(target.rpn.head.cls_logits.weight, source.rpn.head.cls_logits.weight)
    assert target.roi_heads.box_predictor.cls_score.weight.shape[0] == 4


# ----------------------------------------------------------------------------- processes


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_torchrun_two_process_gloo(coco_shapes, tmp_path):
    config = write_tiny_yaml(tmp_path / "tiny.yaml", coco_shapes, iters=4, vis_images=1)
    out = tmp_path / "ddp"
    result = _run(
        ["-m", "torch.distributed.run", "--nproc_per_node", "2", "tools/train_det.py", "--config", str(config),
         "--device", "cpu", "--output-dir", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 4 / 16" in result.stderr  # lr scaled for 2 processes x 2 images
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["bbox"]) == set(METRIC_NAMES)
    results = json.loads((out / "coco_results.json").read_text())
    val_ids = {img["id"] for img in json.loads(Path(coco_shapes["val_ann"]).read_text())["images"]}
    # detections of both ranks' images were gathered (each rank evaluates every other image)
    assert {r["image_id"] for r in results} <= val_ids
    assert len({r["image_id"] for r in results}) > len(val_ids) // 2
    assert (out / "model_final.pth").is_file()
