"""Detection training options: gradient accumulation, AdamW + cosine, EMA, determinism, keeping the best weights."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backbones.weights import read_metadata
from tools.engine.checkpoint import CheckpointManager, load_checkpoint
from tools.engine.config import load_config
from tools.engine.det_config import DetTrainConfig, build_config
from tools.engine.det_train import train
from tools.reference_models import TINY_DET_TRAINING
from tools.train_det import main as train_det_main

TINY = {**TINY_DET_TRAINING, "max_size": 64, "lr": 0.01, "vis_images": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def shapes(coco_shapes) -> dict:
    return coco_shapes


@pytest.fixture(scope="module")
def one_object_shapes(shapes, tmp_path_factory) -> dict:
    """Every training image 64 x 64 with exactly one object: each image then gives the RPN and the box head the
    same number of samples, the condition under which a batch's mean loss is the mean of its halves' losses."""
    data = json.loads(Path(shapes["train_ann"]).read_text())
    first: dict[int, dict] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            first.setdefault(ann["image_id"], ann)
    data["images"] = [im for im in data["images"] if im["id"] in first]
    data["annotations"] = list(first.values())
    ann_file = tmp_path_factory.mktemp("one_object") / "train.json"
    ann_file.write_text(json.dumps(data))
    if len(data["images"]) < 4:
        raise RuntimeError("the generated set has too few annotated images")
    return {**shapes, "train_ann": str(ann_file)}


def _cfg(shapes: dict, out: Path, **overrides) -> DetTrainConfig:
    return load_config(DetTrainConfig, None, {**TINY, **shapes, "output_dir": str(out), **overrides})


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model_final.safetensors")


def test_gradient_accumulation_equals_the_large_batch(one_object_shapes, tmp_path):
    # Every anchor and every proposal is sampled (no random choice, no ignored band), FrozenBN: the only
    # difference left between 2 x 2 accumulated and one batch of 4 is float rounding.
    sample_all = {**TINY["detector_options"], "rpn_batch_size_per_image": 100_000, "box_batch_size_per_image": 100_000,
                  "rpn_fg_iou_thresh": 0.5, "rpn_bg_iou_thresh": 0.5, "rpn_post_nms_top_n_train": 16,
                  "rpn_pre_nms_top_n_train": 64}
    common = {"iters": 3, "hflip": 0.0, "detector_options": sample_all,
              "backbone_options": {**TINY["backbone_options"], "norm": "FrozenBN"}}
    train(_cfg(one_object_shapes, tmp_path / "big", batch_size=4, **common))
    train(_cfg(one_object_shapes, tmp_path / "accum", batch_size=2, grad_accum=2, **common))
    big, accum = _final_weights(tmp_path / "big"), _final_weights(tmp_path / "accum")
    for key in big:
        assert torch.allclose(accum[key], big[key], rtol=1e-4, atol=1e-6), key
    losses = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    big_losses = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in losses if "loss" in r] == pytest.approx(
        [r["loss"] for r in big_losses if "loss" in r], rel=1e-4)


def test_gradient_accumulation_is_not_a_smaller_batch(shapes, tmp_path):
    # Control for the test above: without accumulation, batch 2 gives other weights than batch 4.
    train(_cfg(shapes, tmp_path / "big", batch_size=4, iters=2, hflip=0.0))
    train(_cfg(shapes, tmp_path / "small", batch_size=2, iters=2, hflip=0.0))
    big, small = _final_weights(tmp_path / "big"), _final_weights(tmp_path / "small")
    assert any(not torch.allclose(small[k], big[k], rtol=1e-4, atol=1e-6) for k in big)


def test_accumulation_scales_lr_by_the_effective_batch(shapes, tmp_path):
    cfg = _cfg(shapes, tmp_path, lr=None, base_lr=0.08, base_batch_size=16, batch_size=2, grad_accum=4, iters=1,
               warmup_iters=0)
    train(cfg)
    state = load_checkpoint(tmp_path / "model_final.pth")
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.08 * 8 / 16)


class _Killed(Exception):
    pass


def _killed_and_resumed(cfg: DetTrainConfig, monkeypatch, at_step: int) -> None:
    """Run ``cfg``, killed in its ``at_step``-th optimizer step, then resumed from its newest checkpoint."""
    import tools.engine.runner as runner

    steps = []

    def crash(point: str) -> None:
        steps.append(point)
        if len(steps) == at_step:
            raise _Killed

    monkeypatch.setattr(runner, "crash_point", crash)
    with pytest.raises(_Killed):
        train(cfg)
    monkeypatch.undo()
    train(cfg, resume=True)


def test_adamw_cosine_ema_resume_exactly(shapes, tmp_path, monkeypatch):
    options = {"optimizer": "adamw", "sched": "cosine", "lr": 1e-3, "ema": 0.9, "no_weight_decay_norm_bias": True,
               "iters": 6, "checkpoint_every": 3, "grad_accum": 2, "batch_size": 1}
    train(_cfg(shapes, tmp_path / "whole", **options))
    # Killed in step 5, resumed from the iteration-3 checkpoint: same schedule position, Adam moments and EMA.
    _killed_and_resumed(_cfg(shapes, tmp_path / "split", **options), monkeypatch, at_step=5)
    whole, split = load_checkpoint(tmp_path / "whole" / "model_0000006.pth"), load_checkpoint(
        tmp_path / "split" / "model_0000006.pth")
    for part in ("model", "ema"):
        for key, value in whole[part].items():
            assert torch.equal(value, split[part][key]), (part, key)
    assert type(whole["optimizer"]) is dict and "exp_avg" in next(iter(whole["optimizer"]["state"].values()))
    # Cosine: the lr falls to min_lr (0) by the last iteration, after the 2-iteration warmup.
    lrs = [json.loads(line).get("lr") for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    lrs = [lr for lr in lrs if lr is not None]
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0
    # The final weights are the EMA's; the raw weights stay in the checkpoint.
    final = load_checkpoint(tmp_path / "whole" / "model_final.pth")
    exported = _final_weights(tmp_path / "whole")
    for key, value in whole["ema"].items():
        assert torch.equal(final["model"][key], value) and torch.equal(exported[key], value)
    assert any(not torch.equal(whole["model"][k], whole["ema"][k]) for k in whole["ema"] if k.endswith("weight"))
    # No weight decay on norms and biases: a second param group with weight_decay 0.
    assert [g["weight_decay"] for g in whole["optimizer"]["param_groups"]] == [TINY.get("weight_decay", 1e-4), 0.0]


def test_lsj_and_copy_paste_train_mask_rcnn_and_resume_exactly(shapes, tmp_path, monkeypatch):
    options = {"detector": "mask_rcnn", "lsj": True, "max_size": 64, "copy_paste": 1.0, "grad_accum": 2,
               "batch_size": 1, "iters": 3, "checkpoint_every": 2}
    train(_cfg(shapes, tmp_path / "whole", **options))
    _killed_and_resumed(_cfg(shapes, tmp_path / "split", **options), monkeypatch, at_step=3)
    whole, split = (load_checkpoint(tmp_path / name / "model_0000003.pth") for name in ("whole", "split"))
    assert all(torch.equal(value, split["model"][key]) for key, value in whole["model"].items())
    # The detector keeps the LSJ squares as they are: its resize goes to max_size both ways.
    assert whole["model_spec"]["options"]["min_size"] == (64,) and whole["model_spec"]["options"]["max_size"] == 64


def test_copy_paste_changes_training(shapes, tmp_path):
    options = {"detector": "mask_rcnn", "iters": 2, "hflip": 0.0}
    train(_cfg(shapes, tmp_path / "plain", **options))
    train(_cfg(shapes, tmp_path / "pasted", copy_paste=1.0, **options))
    plain, pasted = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "pasted")
    assert any(not torch.equal(plain[k], pasted[k]) for k in plain)


def test_deterministic_runs_are_bit_identical(shapes, tmp_path, monkeypatch):
    import tools.engine.runner as runner

    during = []
    real_seed = runner.seed_everything
    monkeypatch.setattr(runner, "seed_everything",
                        lambda seed: (during.append(torch.are_deterministic_algorithms_enabled()), real_seed(seed)))
    for name in ("a", "b"):
        train(_cfg(shapes, tmp_path / name, iters=3, deterministic=True, workers=1))
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert during == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_keep_best_keeps_the_highest_scoring_weights(shapes, tmp_path):
    train(_cfg(shapes, tmp_path, iters=4, eval_every=1, keep_best="bbox/AP50", checkpoint_every=2))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["bbox_AP50"] for r in records if "bbox_AP50" in r}
    best_step = max(scores, key=lambda s: (scores[s], -s))  # the first evaluation reaching the maximum
    best = load_checkpoint(tmp_path / "model_best.pth")
    assert best["best"] == {"metric": "bbox/AP50", "value": pytest.approx(scores[best_step]), "iteration": best_step}
    assert read_metadata(tmp_path / "model_best.safetensors")["best"]["iteration"] == best_step
    assert "model_spec" in best and "class_names" in best
    # Checkpoints carry it, so a resumed run compares against it.
    assert load_checkpoint(CheckpointManager(tmp_path).path_for(4))["best"] == best["best"]


@pytest.mark.parametrize("flags, message", [
    (["--grad-accum", "0"], "grad_accum"),
    (["--ema", "1.5"], "ema"),
    (["--keep-best", "bbox/mAP"], "keep_best"),
    (["--keep-best", "segm/AP"], "keep_best"),  # Faster R-CNN has no masks
    (["--copy-paste", "0.5"], "copy_paste"),  # nor does copy-paste have masks to paste
    (["--copy-paste", "2"], "copy_paste"),
])
def test_bad_values_exit_2(flags, message, tmp_path, capsys):
    assert train_det_main(["--output-dir", str(tmp_path), "--iters", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_recipe_keys_have_the_flags_names():
    cfg, messages = build_config(None, {"optimizer": "adamw", "sched": "cosine", "iters": 100, "warmup_iters": 10,
                                        "grad_accum": 4, "batch_size": 2})
    assert messages[-1] == ("schedule: 100 iterations of 4 accumulated batches of 2 per process, AdamW, linear "
                            "warmup over 10 from lr x0.001, cosine to lr 0")


def test_modern_recipe_is_adamw_cosine_lsj_ema_and_its_command_trains_at_its_lr():
    import re

    from tools.engine.det_config import model_spec
    from heads.spec import build_from_spec

    path = Path(__file__).resolve().parents[1] / "configs" / "faster_rcnn_R50_FPN_modern.yaml"
    cfg, _ = build_config(path)
    assert (cfg.optimizer, cfg.sched, cfg.lsj, cfg.iters) == ("adamw", "cosine", True, 90000)
    assert 0 < cfg.ema < 1 and cfg.no_weight_decay_norm_bias
    run = re.search(r"--nproc_per_node (\d+) tools/train_det.py --config (\S+)", path.read_text())
    assert run[2] == "configs/faster_rcnn_R50_FPN_modern.yaml" and int(run[1]) * cfg.batch_size == cfg.base_batch_size
    with torch.device("meta"):
        model = build_from_spec(model_spec(cfg, num_classes=81))
    assert model.transform.min_size == (1024,) and model.transform.max_size == 1024  # the LSJ squares as they are


@pytest.mark.slow
def test_options_compose_under_torchrun_with_an_elastic_restart(coco_shapes, tmp_path):
    """Two processes, every option at once, one worker killed in step 3: torchrun restarts the group, which
    resumes from the iteration-2 checkpoint and finishes."""
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "all.yaml"
    config.write_text(yaml.safe_dump({
        **TINY, **coco_shapes, "detector": "mask_rcnn", "lsj": True, "copy_paste": 0.5, "grad_accum": 2,
        "batch_size": 1, "optimizer": "adamw", "sched": "cosine", "lr": None, "base_lr": 4e-3, "base_batch_size": 8,
        "ema": 0.9, "keep_best": "segm/AP", "deterministic": True, "iters": 4, "checkpoint_every": 2,
        "eval_every": 2, "vis_images": 0}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESDET_CRASH_AT": "train_step:3", "RESDET_CRASH_RANK": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
         "tools/train_det.py", "--config", str(config), "--device", "cpu", "--output-dir", str(out)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 4 / 8" in result.stderr  # lr for 2 processes x 2 accumulated images
    assert "resumed from" in result.stderr and "model_0000002.pth" in result.stderr
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 4 and final["ema"] is not None
    assert load_checkpoint(out / "model_best.pth")["best"]["metric"] == "segm/AP"
