"""Reliability of the training tools: SIGKILL at precise points then exact resume, AMP overflow vs divergence,
unsafe checkpoints refused by every entry point, safetensors weights, dataset paths confined to their root.

The killed runs are children of a multiprocessing forkserver that imported the training engine once, so
each kill costs only its training, not a fresh interpreter importing torch. The child kills itself with
SIGKILL through the fault-injection hook (tools.engine.faults), so the kill lands at a precise point.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import backbones
from tools import eval_cls, eval_coco, infer, train_det
from tools.engine import cls_train, det_train
from tools.engine.checkpoint import CheckpointManager, export_weights, load_checkpoint
from tools.engine.config import load_config
from tools.engine.faults import CRASH_ENV, crash_point
from tools.reference_models import TINY_CLASSIFIER, TINY_DETECTOR, randomize_norm_stats

DET_TINY = {
    **TINY_DETECTOR,
    "min_sizes": [48], "max_size": 64, "batch_size": 2, "lr": 0.02, "warmup_iters": 2, "steps": [6],
    "workers": 0, "log_every": 1, "vis_images": 0, "device": "cpu", "seed": 1,
    # 8 iterations: checkpoints at 2, 4, 6, 8 (keep the newest 2), evaluation at 4 and at the end
    "iters": 8, "checkpoint_every": 2, "eval_every": 4, "keep_last": 2,
}

# Every consumer of random numbers on: RandAugment, random erasing, mixup/cutmix, drop path; and EMA, weight decay
# without norms and biases, gradient clipping.
CLS_TINY = {
    **TINY_CLASSIFIER, "model_options": {**TINY_CLASSIFIER["model_options"], "drop_path_rate": 0.1}, "image_size": 32,
    "crop_pct": 1.0, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "mixup": 0.2, "cutmix": 1.0,
    "label_smoothing": 0.1, "ema": True, "ema_decay": 0.9, "weight_decay": 2.0e-5, "no_weight_decay_norm_bias": True,
    "clip_grad_norm": 5.0, "epochs": 2, "batch_size": 4, "lr": 0.01, "sched": "cosine", "warmup_epochs": 1,
    "device": "cpu", "workers": 0, "seed": 3,
    # 3 iterations per epoch: checkpoints at 2 (mid-epoch), 3 (epoch end), 4 (mid-epoch), 6; evaluation ends
    # each epoch, before its checkpoint
    "checkpoint_period": 2, "keep_last": 2,
}

# Kill point -> the periodic checkpoints on disk right after the kill (the resumed run starts from the newest).
DET_KILLS = {
    "train_step:6": ["model_0000002.pth", "model_0000004.pth"],  # inside the 6th step
    "checkpoint_write:2": ["model_0000002.pth"],  # model_0000004.pth written to its temp file, not renamed
    "eval:1": ["model_0000002.pth", "model_0000004.pth"],  # the evaluation at iteration 4
}
CLS_KILLS = {
    "train_step:5": ["model_0000003.pth", "model_0000004.pth"],  # inside the 5th step (epoch 2)
    "checkpoint_write:2": ["model_0000002.pth"],  # the epoch-end checkpoint model_0000003.pth
    "eval:1": ["model_0000002.pth"],  # the evaluation ending epoch 1
}

# The same thread count in this process and in the killed children: CPU sums may depend on it.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tools.engine.det_train", "tools.engine.cls_train"])
    return ctx


def _train(kind: str, options: dict, resume: bool = False) -> None:
    if kind == "det":
        det_train.train(load_config(det_train.DetTrainConfig, None, options), resume=resume)
    else:
        cls_train.train(load_config(cls_train.ClsTrainConfig, None, options), resume=resume)


def _train_until_killed(kind: str, options: dict, crash_at: str) -> None:
    """Child process body: run with the crash hook armed (it never returns when the hook fires)."""
    os.environ[CRASH_ENV] = crash_at
    torch.set_num_threads(1)
    _train(kind, options)


def _assert_same_weights(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    first, second = load_checkpoint(a), load_checkpoint(b)
    for key in keys:
        assert first[key].keys() == second[key].keys()
        for name, tensor in first[key].items():
            assert torch.equal(tensor, second[key][name]), f"{key}.{name} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def det_reference(coco_shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det_ref")
    torch.set_num_threads(1)
    _train("det", {**DET_TINY, **coco_shapes, "output_dir": str(out)})
    return out


@pytest.fixture(scope="module")
def cls_reference(shapes_imagefolder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls_ref")
    torch.set_num_threads(1)
    _train("cls", {**CLS_TINY, "data": str(shapes_imagefolder), "output_dir": str(out)})
    return out


def _kill_and_resume(forkserver, kind: str, options: dict, crash_at: str, on_disk: list[str], out: Path,
                     caplog) -> None:
    child = forkserver.Process(target=_train_until_killed, args=(kind, options, crash_at))
    child.start()
    child.join(timeout=240)
    assert child.exitcode == -signal.SIGKILL, f"the run was not killed at {crash_at} (exit code {child.exitcode})"
    assert sorted(p.name for p in out.glob("model_*.pth")) == on_disk
    temp_files = list(out.glob(".model_*"))
    if crash_at.startswith("checkpoint_write"):
        assert len(temp_files) == 1  # the half-written checkpoint: only under its temp name

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        _train(kind, options, resume=True)
    assert f"resumed from {out / on_disk[-1]}" in caplog.text  # went on from the newest, did not start over
    # The atomic writes leave nothing half-written under a checkpoint's name to skip.
    assert not [w for w in caught if "unreadable checkpoint" in str(w.message)]
    assert not list(out.glob(".model_*")), "temp files of killed writes must be cleaned on resume"


@pytest.mark.parametrize("crash_at", list(DET_KILLS))
def test_det_sigkill_at_any_point_then_resume_is_exact(crash_at, forkserver, coco_shapes, det_reference, tmp_path,
                                                       caplog):
    options = {**DET_TINY, **coco_shapes, "output_dir": str(tmp_path)}
    _kill_and_resume(forkserver, "det", options, crash_at, DET_KILLS[crash_at], tmp_path, caplog)
    _assert_same_weights(det_reference / "model_final.pth", tmp_path / "model_final.pth", ("model",))
    assert (tmp_path / "metrics.json").read_text() == (det_reference / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000006.pth", "model_0000008.pth", "model_final.pth"]  # keep_last=2


@pytest.mark.parametrize("crash_at", list(CLS_KILLS))
def test_cls_sigkill_at_any_point_then_resume_is_exact(crash_at, forkserver, shapes_imagefolder, cls_reference,
                                                       tmp_path, caplog):
    options = {**CLS_TINY, "data": str(shapes_imagefolder), "output_dir": str(tmp_path)}
    _kill_and_resume(forkserver, "cls", options, crash_at, CLS_KILLS[crash_at], tmp_path, caplog)
    _assert_same_weights(cls_reference / "model_final.pth", tmp_path / "model_final.pth", ("model", "model_ema"))
    assert (tmp_path / "metrics.json").read_text() == (cls_reference / "metrics.json").read_text()
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000004.pth", "model_0000006.pth", "model_final.pth"]  # keep_last=2


def test_crash_hook_is_inert_unless_armed(monkeypatch):
    monkeypatch.delenv(CRASH_ENV, raising=False)
    crash_point("train_step")  # would kill pytest if it fired
    monkeypatch.setenv(CRASH_ENV, "train_step:1")
    monkeypatch.setenv("RESDET_CRASH_RANK", "1")  # we are rank 0: not us
    crash_point("train_step")
    monkeypatch.setenv(CRASH_ENV, "no_such_point:1")
    with pytest.raises(ValueError, match="train_step"):
        crash_point("train_step")


# ----------------------------------------------------------------------------- AMP overflow vs divergence


class _InfGradient(torch.autograd.Function):
    """Identity whose backward returns inf: an fp16 gradient overflow, with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _FaultAt(nn.Module):
    """Cross-entropy with a fault at its ``at``-th call: an overflowing gradient or a NaN loss."""

    def __init__(self, at: int, fault: str) -> None:
        super().__init__()
        self.at, self.fault, self.calls = at, fault, 0

    def forward(self, logits, targets):
        self.calls += 1
        if self.calls == self.at and self.fault == "inf_gradient":
            logits = _InfGradient.apply(logits)
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls == self.at and self.fault == "nan_loss" else loss


def _amp_config(data: Path, out: Path) -> cls_train.ClsTrainConfig:
    return load_config(cls_train.ClsTrainConfig, None, {
        "model": "resnet18", "model_options": {"base_channels": 8}, "data": str(data), "image_size": 32,
        "epochs": 1, "batch_size": 4, "lr": 0.01, "device": "cpu", "workers": 0, "output_dir": str(out),
        "amp": True, "amp_dtype": "float16",  # fp16 autocast + GradScaler, on CPU too
    })


def test_amp_overflow_is_skipped_by_the_scaler_not_reported_as_divergence(shapes_imagefolder, tmp_path):
    cls_train.train(_amp_config(shapes_imagefolder, tmp_path / "overflow"), criterion=_FaultAt(2, "inf_gradient"))
    final = load_checkpoint(tmp_path / "overflow" / "model_final.pth")  # training went on to the end
    # The inf-gradient step was skipped, not applied: an applied one would have left inf/NaN weights.
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    last = load_checkpoint(tmp_path / "overflow" / "model_0000003.pth")
    assert last["scaler"]["scale"] < 2.0**16  # the scaler saw the overflow(s) and lowered its scale from 2^16
    assert last["divergence_guard"]["recoveries"] == 0  # and no roll-back happened

    # A non-finite loss is still a divergence (rolled back, then stopped; max_recoveries 0 stops at once).
    nan_config = dataclasses.replace(_amp_config(shapes_imagefolder, tmp_path / "nan"), max_recoveries=0)
    with pytest.raises(FloatingPointError, match=r"iteration 1: loss=nan"):
        cls_train.train(nan_config, criterion=_FaultAt(2, "nan_loss"))


# ----------------------------------------------------------------------------- unsafe checkpoints


class _Payload:
    """Unpickling this would create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def det_yaml(coco_shapes, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**DET_TINY, **coco_shapes, "iters": 1, "checkpoint_every": None,
                                    "eval_every": None}))
    return path


@pytest.mark.parametrize("tool", ["eval_cls", "eval_coco", "infer", "train_det --weights", "train_det --pretrained"])
def test_every_tool_refuses_a_malicious_checkpoint_without_running_it(tool, coco_shapes, shapes_imagefolder, det_yaml,
                                                                      tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "x": _Payload(str(marker))}, evil)
    out = str(tmp_path / "out")
    argv = {
        "eval_cls": lambda: eval_cls.main(["--weights", str(evil), "--data", str(shapes_imagefolder),
                                           "--workers", "0"]),
        "eval_coco": lambda: eval_coco.main(["--weights", str(evil), "--val-images", coco_shapes["val_images"],
                                             "--val-ann", coco_shapes["val_ann"], "--output-dir", out]),
        "infer": lambda: infer.main([str(next(Path(coco_shapes["val_images"]).iterdir())), "--weights", str(evil),
                                     "--output-dir", out]),
        "train_det --weights": lambda: train_det.main(["--config", str(det_yaml), "--weights", str(evil),
                                                       "--output-dir", out]),
        "train_det --pretrained": lambda: train_det.main(["--config", str(det_yaml), "--pretrained", str(evil),
                                                          "--output-dir", out]),
    }[tool]
    assert argv() == 2
    err = capsys.readouterr().err
    assert "refused" in err and str(evil) in err
    assert not marker.exists()


def test_resume_skips_a_malicious_checkpoint_naming_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"iteration": 2}, 2)
    marker = tmp_path / "pwned"
    torch.save({"iteration": 4, "x": _Payload(str(marker))}, manager.path_for(4))
    with pytest.warns(RuntimeWarning, match="model_0000004.pth"):
        path, state = manager.load_latest()
    assert path.name == "model_0000002.pth" and state["iteration"] == 2
    assert not marker.exists()


# ----------------------------------------------------------------------------- safetensors weights


def _det_spec(**overrides) -> dict:
    cfg = load_config(det_train.DetTrainConfig, None, {**DET_TINY, **overrides})
    return det_train.model_spec(cfg, num_classes=4)


@pytest.mark.parametrize("flag", ["--weights", "--pretrained"])
def test_train_det_reads_and_writes_safetensors(flag, coco_shapes, det_yaml, tmp_path):
    start = tmp_path / "start.safetensors"
    if flag == "--weights":
        source = randomize_norm_stats(det_train.build_from_spec(_det_spec(weights="x")), seed=5)
        export_weights(source, start)
        expected = source.state_dict()
    else:
        source = randomize_norm_stats(backbones.resnet18(num_classes=3, base_channels=8), seed=5)
        export_weights(source, start)
        expected = {f"backbone.body.{k}": v for k, v in source.state_dict().items()
                    if not k.endswith("num_batches_tracked")}  # FrozenBN has no counter
    out = tmp_path / "run"
    assert train_det.main(["--config", str(det_yaml), flag, str(start), "--output-dir", str(out)]) == 0
    final = load_checkpoint(out / "model_final.pth")["model"]
    # Loaded weights that training leaves alone: FrozenBN statistics and the frozen stem and c2.
    frozen = [k for k in expected if k.endswith(("running_mean", "running_var"))
              or k.startswith(("backbone.body.conv1.", "backbone.body.layer1."))]
    assert len(frozen) > 20
    for key in frozen:
        assert torch.equal(final[key], expected[key]), key

    # The run wrote its weights as safetensors too; the tools rebuild the model from its header alone.
    written = out / "model_final.safetensors"
    assert load_checkpoint(written).keys() == final.keys()
    if flag == "--weights":
        assert eval_coco.main(["--weights", str(written), "--val-images", coco_shapes["val_images"], "--val-ann",
                               coco_shapes["val_ann"], "--output-dir", str(tmp_path / "eval"), "--workers", "0"]) == 0
        assert (tmp_path / "eval" / "metrics.json").read_text() == (out / "metrics.json").read_text()


def test_eval_cls_reads_the_safetensors_train_cls_wrote(cls_reference, shapes_imagefolder, tmp_path):
    out = tmp_path / "eval.json"
    assert eval_cls.main(["--weights", str(cls_reference / "model_final.safetensors"),
                          "--data", str(shapes_imagefolder), "--workers", "0", "--device", "cpu",
                          "--output", str(out)]) == 0  # no --model needed
    expected = json.loads((cls_reference / "metrics.json").read_text())
    assert json.loads(out.read_text()) == pytest.approx({k: expected[k] for k in ("top1", "top5")})


# ----------------------------------------------------------------------------- dataset paths


def test_annotation_file_names_cannot_leave_the_images_folder(coco_shapes, det_yaml, tmp_path, capsys):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    data = json.loads(Path(coco_shapes["val_ann"]).read_text())
    for img in data["images"]:  # real images, reached through ".."
        img["file_name"] = os.path.relpath(Path(coco_shapes["val_images"]) / img["file_name"], images_dir)
        assert img["file_name"].startswith("..")
    escaping = tmp_path / "escaping.json"
    escaping.write_text(json.dumps(data))
    weights = export_weights(det_train.build_from_spec(_det_spec()), tmp_path / "det.safetensors",
                             metadata={"model_spec": json.dumps(_det_spec())})
    data_args = ["--train-images", str(images_dir), "--train-ann", str(escaping),
                 "--val-images", str(images_dir), "--val-ann", str(escaping)]
    eval_args = ["--weights", str(weights), "--val-images", str(images_dir), "--val-ann", str(escaping),
                 "--output-dir", str(tmp_path / "eval"), "--workers", "0"]

    assert train_det.main(["--config", str(det_yaml), *data_args, "--output-dir", str(tmp_path / "t")]) == 2
    assert eval_coco.main(eval_args) == 2
    errors = capsys.readouterr().err.split("error: ")[1:]
    assert len(errors) == 2
    for err in errors:
        assert data["images"][0]["file_name"] in err and "allow_outside_root" in err

    # Allowed by option: the images outside the folder are read.
    assert eval_coco.main([*eval_args, "--allow-outside-root"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["bbox"]
    assert train_det.main(["--config", str(det_yaml), *data_args, "--weights", str(weights), "--eval-only",
                           "--output-dir", str(tmp_path / "t"), "--allow-outside-root"]) == 0
