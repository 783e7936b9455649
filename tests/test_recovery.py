"""Recovery from loss spikes (tools.engine.recovery) in both trainers, schedule scaling with a warmup floor,
and recipes chosen from the data (tools.engine.auto_recipe)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from tools.engine import cls_train, det_train
from tools.engine.auto_recipe import ClsDataStats, DetDataStats, cls_data_stats, cls_recipe, det_data_stats, det_recipe
from tools.engine.checkpoint import CheckpointManager, load_checkpoint
from tools.engine.config import ema_decay_for_run, load_config, rescale_schedule, scale_lr
from tools.engine.plots import read_metrics
from tools.engine.recovery import DivergenceGuard
from tools.engine.shapes import make_shapes_coco
from tools.reference_models import TINY_CLASSIFIER, TINY_DET_TRAINING

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the guard itself


def test_guard_judges_nonfinite_and_spikes_and_gives_up_after_max_recoveries():
    guard = DivergenceGuard(max_recoveries=2, spike_factor=10.0, min_window=3, snapshot_every=2)
    assert "non-finite" in guard.check({"a": torch.tensor(float("nan")), "loss": 1.0}, 0)  # judged from the start
    for i, v in enumerate([2.0, 1.5, 1.8]):
        assert guard.check({"loss": v}, i) is None
    assert guard.check({"loss": 17.0}, 3) is None  # 9.4x the median: not a spike
    problem = guard.check({"loss": 30.0}, 4)
    assert problem is not None and "exploded at iteration 4" in problem
    assert guard.losses == [2.0, 1.5, 1.8, 17.0]  # the spike is not added to the window
    assert not guard.healthy() and not guard.due(4)  # newest loss 17 > 2 x median: no snapshot now

    with pytest.raises(FloatingPointError, match="no snapshot|stopped"):
        guard.recover(problem, 4)  # nothing to go back to
    weights = {"w": torch.ones(2)}
    guard.take_snapshot(2, {"model": weights})
    weights["w"] += 5  # the snapshot is a copy
    good = guard.recover(problem, 4)
    assert torch.equal(good["model"]["w"], torch.ones(2)) and guard.lr_scale == 0.5
    good["model"]["w"] += 1  # so is what recover hands out
    assert torch.equal(guard.recover(problem, 5)["model"]["w"], torch.ones(2)) and guard.lr_scale == 0.25
    with pytest.raises(FloatingPointError, match=r"exploded at iteration 4.*after 2 recoveries \(lr x0.25\)"):
        guard.recover(problem, 6)

    restored = DivergenceGuard(max_recoveries=2)
    restored.load_state_dict(guard.state_dict())
    assert (restored.recoveries, restored.lr_scale, restored.losses) == (2, 0.25, guard.losses)


def test_guard_scales_the_scheduled_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 / (it + 1))
    guard = DivergenceGuard()
    guard.lr_scale = 0.5
    for it in range(1, 4):
        sched.step()
        guard.scale_lr(opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / (it + 1) * 0.5)  # not compounded


@pytest.mark.parametrize("kwargs", [{"max_recoveries": -1}, {"spike_factor": 1.0}, {"lr_factor": 1.0},
                                    {"snapshot_every": 0}])
def test_guard_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DivergenceGuard(**kwargs)


# ----------------------------------------------------------------------------- detection trainer


def _tiny_det(data: dict, out: Path, **overrides) -> det_train.DetTrainConfig:
    return load_config(det_train.DetTrainConfig, None, {**TINY_DET_TRAINING, **data, "output_dir": str(out),
                                                        "device": "cpu", **overrides})


def _spiking_build(monkeypatch, spike_at: set[int], factor: float) -> None:
    """Multiply the training loss of the given forward calls (1-based) by ``factor``."""
    real_build = det_train.build_from_spec

    def build(spec):
        model = real_build(spec)
        forward, calls = model.forward, {"n": 0}

        def spiking_forward(images, targets=None):
            out = forward(images, targets)
            if model.training:
                calls["n"] += 1
                if calls["n"] in spike_at or (0 in spike_at and calls["n"] > 4):
                    out = {k: v * factor for k, v in out.items()}
            return out

        model.forward = spiking_forward
        return model

    monkeypatch.setattr(det_train, "build_from_spec", build)


def test_det_spike_rolls_back_halves_lr_and_finishes(coco_shapes, tmp_path, monkeypatch, caplog):
    _spiking_build(monkeypatch, {15}, float("nan"))
    cfg = _tiny_det(coco_shapes, tmp_path, iters=20, checkpoint_every=10, eval_every=None, warmup_iters=0)
    with caplog.at_level(logging.WARNING, logger="tools.engine.recovery"):
        det_train.train(cfg)
    lines = [r.getMessage() for r in caplog.records if "recovery 1 of 3" in r.getMessage()]
    assert len(lines) == 1
    assert "non-finite at iteration 14" in lines[0] and "restored the state of iteration 10" in lines[0]
    final = load_checkpoint(tmp_path / "model_0000020.pth")
    assert final["divergence_guard"]["recoveries"] == 1 and final["divergence_guard"]["lr_scale"] == 0.5
    base_lr = 0.16 * 2 / 16
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(base_lr * 0.5)  # after the last step
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    assert (tmp_path / "model_final.pth").is_file()


def test_det_gives_up_after_three_recoveries_keeping_checkpoints(coco_shapes, tmp_path, monkeypatch):
    _spiking_build(monkeypatch, {0}, float("nan"))  # every training forward after the 4th is NaN
    cfg = _tiny_det(coco_shapes, tmp_path, iters=10, checkpoint_every=2, eval_every=None)
    with pytest.raises(FloatingPointError, match=r"non-finite at iteration 7: .*loss_box_reg=nan.*after 3 recoveries"):
        det_train.train(cfg)
    assert not (tmp_path / "model_final.pth").exists()
    newest = load_checkpoint(CheckpointManager(tmp_path).latest())
    assert newest["iteration"] == 6 and newest["divergence_guard"]["recoveries"] == 2  # recoveries at 4 and 5


def test_det_max_recoveries_zero_stops_at_the_first_divergence(coco_shapes, tmp_path, monkeypatch):
    _spiking_build(monkeypatch, {0}, float("nan"))
    cfg = _tiny_det(coco_shapes, tmp_path, iters=10, checkpoint_every=2, eval_every=None, max_recoveries=0)
    with pytest.raises(FloatingPointError, match=r"iteration 4: .*loss_box_reg=nan.*; stopped\. Lower"):
        det_train.train(cfg)
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000002.pth", "model_0000004.pth"]


# ----------------------------------------------------------------------------- classification trainer


class _Killed(Exception):
    pass


class _Criterion(nn.Module):
    """Cross-entropy, NaN at the ``spike``-th call; raises ``_Killed`` (a kill) at the ``kill``-th."""

    def __init__(self, spike: int = 0, kill: int = 0) -> None:
        super().__init__()
        self.spike, self.kill, self.calls = spike, kill, 0

    def forward(self, logits, targets):
        self.calls += 1
        if self.calls == self.kill:
            raise _Killed
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == self.spike else loss


def _cls_cfg(data: Path, out: Path) -> cls_train.ClsTrainConfig:
    return load_config(cls_train.ClsTrainConfig, None, {
        **TINY_CLASSIFIER, "data": str(data), "image_size": 16,
        "epochs": 3, "batch_size": 4, "lr": 0.01, "device": "cpu", "workers": 0, "output_dir": str(out),
        "crop_scale": [0.5, 1.0]})


def test_cls_recovery_composes_with_kill_and_resume(colour_imagefolder, tmp_path, caplog):
    """NaN at the 6th step (epoch 2 of 3, 4 steps an epoch) is rolled back; a run killed in epoch 3 and resumed
    goes on at the lowered lr and ends identical to one that was not killed."""
    with caplog.at_level(logging.WARNING, logger="tools.engine.recovery"):
        cls_train.train(_cls_cfg(colour_imagefolder, tmp_path / "a"), criterion=_Criterion(spike=6))
    assert "non-finite at iteration 5: loss=nan; restored the state of iteration 4" in caplog.text
    whole = load_checkpoint(tmp_path / "a" / "model_final.pth")

    with pytest.raises(_Killed):
        cls_train.train(_cls_cfg(colour_imagefolder, tmp_path / "b"), criterion=_Criterion(spike=6, kill=10))
    resume_point = load_checkpoint(CheckpointManager(tmp_path / "b").latest())
    assert resume_point["iteration"] == 8
    assert resume_point["divergence_guard"]["recoveries"] == 1 and resume_point["divergence_guard"]["lr_scale"] == 0.5
    cls_train.train(_cls_cfg(colour_imagefolder, tmp_path / "b"), resume=True, criterion=_Criterion())
    resumed = load_checkpoint(tmp_path / "b" / "model_final.pth")
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_resume_skips_a_checkpoint_that_does_not_fit_the_model(colour_imagefolder, tmp_path):
    cls_train.train(_cls_cfg(colour_imagefolder, tmp_path))  # checkpoints at iterations 4, 8, 12
    newest = tmp_path / "model_0000012.pth"
    state = load_checkpoint(newest)
    state["model"]["fc.weight"] = torch.zeros(3, state["model"]["fc.weight"].shape[1])  # another recipe's classifier
    torch.save(state, newest)
    with pytest.warns(RuntimeWarning, match=r"skipping checkpoint .*model_0000012.pth: it does not fit this run"):
        cls_train.train(_cls_cfg(colour_imagefolder, tmp_path), resume=True)  # goes on from iteration 8 instead
    assert load_checkpoint(tmp_path / "model_0000012.pth")["model"]["fc.weight"].shape[0] == 2  # rewritten by the run


# ----------------------------------------------------------------------------- schedules and recipes


def test_warmup_keeps_a_floor_when_the_run_is_shortened():
    assert rescale_schedule(90000, (60000, 80000), 1000, 300, warmup_floor=100) == ((200, 267), 75)  # not 3
    assert rescale_schedule(90000, (60000, 80000), 1000, 9000, warmup_floor=100) == ((6000, 8000), 100)
    assert rescale_schedule(90000, (60000, 80000), 1000, 180000, warmup_floor=100)[1] == 1000  # never longer
    assert rescale_schedule(90, (30, 60, 80), 0, 15, warmup_floor=1)[1] == 0  # no warmup stays none
    assert rescale_schedule(600, (), 5, 15, warmup_floor=1)[1] == 1


def test_det_build_config_logs_the_schedule_with_floored_warmup():
    cfg, messages = det_train.build_config(None, {"iters": 300})
    assert cfg.warmup_iters == 75 and cfg.steps == (200, 267)
    assert any("warmup 1000 -> 75 iterations" in m for m in messages)
    assert messages[-1] == "schedule: 300 iterations, linear warmup over 75 from lr x0.001, lr x0.1 at iterations [200, 267]"


def test_ema_decay_and_sqrt_lr_scaling():
    assert ema_decay_for_run(0.9999, 10**7) == 0.9999
    assert ema_decay_for_run(0.99998, 465) == pytest.approx(1 - 10 / 465)
    assert scale_lr(1e-3, 32, 128, rule="sqrt")[0] == pytest.approx(2e-3)
    with pytest.raises(ValueError):
        scale_lr(0.1, 256, 64, explicit_lr=float("nan"))


def test_det_recipe_from_the_data(tmp_path):
    small = DetDataStats(num_images=300, median_short_side=240, median_long_side=320, objects_per_image=4.0)
    values, reasons = det_recipe(small, batch_size=4)
    assert values["iters"] == 1000  # 12 epochs = 900 < 1000
    assert values["min_sizes"] == [192, 224, 256] and values["max_size"] == 416
    assert values["detector_options"] == {"box_batch_size_per_image": 128}
    assert set(reasons) == set(values) == {"iters", "min_sizes", "max_size", "detector_options", "workers"}
    coco = DetDataStats(num_images=117266, median_short_side=480, median_long_side=640, objects_per_image=7.3)
    values, _ = det_recipe(coco, batch_size=2, world_size=8)
    assert values["iters"] == 12 * (117266 // 16) and "detector_options" not in values

    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "width": 300, "height": 200}, {"id": 2, "width": 100,
                                                                                     "height": 400}],
                               "annotations": [{}, {}, {}], "categories": []}))
    assert det_data_stats(ann) == DetDataStats(2, 150.0, 350.0, 1.5)
    ann.write_text("{")
    with pytest.raises(ValueError, match="a.json"):
        det_data_stats(ann)


def test_det_run_from_args_applies_the_recipe_under_given_flags(coco_shapes, tmp_path, monkeypatch, caplog):
    seen = {}
    monkeypatch.setattr(det_train, "train", lambda cfg, **kwargs: seen.setdefault("cfg", cfg) and {})
    with caplog.at_level(logging.INFO, logger="tools.engine"):
        det_train.run_from_args(None, {**coco_shapes, "batch_size": 2, "min_sizes": [96], "output_dir": str(tmp_path)})
    cfg = seen["cfg"]
    assert cfg.iters == 1000 and cfg.warmup_iters == 100 and cfg.min_sizes == (96,)  # the flag wins
    assert cfg.detector_options == {"box_batch_size_per_image": 128}
    assert "recipe from the data" in caplog.text and "image sizes" not in caplog.text  # the flag's value is kept


def test_cls_recipe_from_the_data(colour_imagefolder):
    stats = cls_data_stats(colour_imagefolder / "train")
    assert stats == ClsDataStats(num_images=16, num_classes=2, median_short_side=16)
    path, values, reasons = cls_recipe(stats)
    assert path.name == "small_set.yaml" and values["image_size"] == 32 and set(reasons) >= set(values)
    cfg, messages = cls_train.build_config(path, {**values, "epochs": 15})
    assert (cfg.optimizer, cfg.sched, cfg.label_smoothing, cfg.warmup_epochs) == ("adamw", "cosine", 0.1, 1)
    path, values, _ = cls_recipe(ClsDataStats(num_images=1_281_167, num_classes=1000, median_short_side=375))
    assert path.name == "resnet50_v1.yaml" and set(values) == {"workers"}


# ----------------------------------------------------------------------------- margin of the embedded recipe


@pytest.mark.slow
def test_embedded_recipe_trains_at_one_and_a_half_times_its_lr_with_another_seed(tmp_path):
    """The README main job's recipe (configs/shapes.yaml, on the embedded data) through warmup and past the point where
    a recipe at the edge of stability diverged, at 1.5x its lr and another seed, with roll-backs off."""
    recipe = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"
    base, _ = det_train.build_config(recipe)
    data = make_shapes_coco(tmp_path / "data", num_train=120, num_val=8)  # the embedded generator, fewer images
    cfg, _ = det_train.build_config(recipe, {
        **{k: str(v) for k, v in data.items()}, "output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 17,
        "lr": 1.5 * base.base_lr * base.batch_size / base.base_batch_size, "max_recoveries": 0,
        # the recipe's first 150 iterations: its warmup and decay steps as they are
        "iters": 150, "steps": list(base.steps), "warmup_iters": base.warmup_iters,
        "checkpoint_every": None, "eval_every": None, "log_every": 10})
    det_train.train(cfg)  # raises FloatingPointError on a NaN/inf loss
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # No blow-up on the way: the recipe without warmup floor and clipping went from 1.9 to 5.1 (and then 26.8, NaN)
    # within 60 iterations at this lr; with them the logged losses of this run stayed within 1.2-2.1.
    assert len(losses) == 15 and max(losses) < 2 * losses[0]
