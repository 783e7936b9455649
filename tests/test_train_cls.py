"""Classification training (tools/train_cls.py, tools/eval_cls.py, tools.engine.cls_train) and the engine pieces
it uses: evaluation, divergence stop, data errors, logging, curves, distributed no-ops."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import backbones
from tools import eval_cls, train_cls
from tools.engine.checkpoint import CheckpointManager, export_weights, load_checkpoint
from tools.engine.cls_config import ClsTrainConfig
from tools.engine.cls_data import build_datasets, check_layout, collate_skipping_none
from tools.engine.cls_eval import evaluate
from tools.engine.cls_train import train
from tools.engine.config import load_config
from tools.engine.distributed import all_gather_object, barrier, init_distributed, is_main_process, reduce_dict
from tools.engine.logger import MetricLogger, progress
from tools.engine.plots import plot_curves, read_metrics
from tools.engine.train_utils import clip_gradients, resolve_amp

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def trained_run(colour_imagefolder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    before = torch.get_num_threads()
    rc = train_cls.main([
        "--model", "resnet18", "--config", str(REPO / "configs/cls/shapes.yaml"), "--data", str(colour_imagefolder),
        "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--image-size", "32", "--output-dir", str(out),
        "--device", "cpu", "--workers", "0", "--seed", "0",
    ])
    torch.set_num_threads(before)
    assert rc == 0
    return out


def test_short_run_learns_and_writes_outputs(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics) == {"top1", "top5"}
    assert metrics["top1"] >= 0.75  # chance is 0.5
    records = read_metrics(trained_run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert all({"train_loss", "lr", "top1", "top5"} <= set(r) for r in records)
    assert records[-1]["top1"] == metrics["top1"]
    assert (trained_run / "curves.png").stat().st_size > 1000
    assert list(trained_run.glob("events.out.tfevents.*"))
    assert load_config(ClsTrainConfig, trained_run / "config.yaml").epochs == 2


def test_new_run_into_a_used_folder_is_refused_or_overwrites(trained_run, colour_imagefolder, tmp_path, capsys):
    args = ["--model", "resnet18", "--config", str(REPO / "configs/cls/shapes.yaml"), "--data",
            str(colour_imagefolder), "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--device", "cpu",
            "--workers", "0"]
    assert train_cls.main([*args, "--output-dir", str(trained_run)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(trained_run / "metrics.jsonl")] == [1, 2]  # untouched

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    old_id = load_checkpoint(copy / "model_final.pth")["run_id"]
    assert train_cls.main([*args, "--output-dir", str(copy), "--overwrite"]) == 0
    assert [r["epoch"] for r in read_metrics(copy / "metrics.jsonl")] == [1]  # the old run's records are gone
    ids = {load_checkpoint(p)["run_id"] for p in [*copy.glob("model_*.pth")]}
    assert len(ids) == 1 and old_id not in ids


def test_final_weights_load_into_backbones(trained_run):
    final = load_checkpoint(trained_run / "model_final.pth")
    assert final["model_name"] == "resnet18" and final["class_names"] == ["blue", "red"]
    options = final["model_options"]  # the shapes recipe trains a half-width ResNet
    model = backbones.resnet18(num_classes=2, **options)
    backbones.load_weights(model, trained_run / "model_final.pth")
    for k, v in final["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    # Detection fine-tuning starts from the same file: a feature extractor drops the classifier.
    features = backbones.resnet18(out_features=("c4", "c5"), **options)
    backbones.load_weights(features, trained_run / "model_final.pth")


def test_eval_cls_matches_training_and_reads_safetensors(trained_run, colour_imagefolder, tmp_path, capsys):
    expected = json.loads((trained_run / "metrics.json").read_text())
    out_json = tmp_path / "eval.json"
    assert eval_cls.main(["--weights", str(trained_run / "model_final.pth"), "--data", str(colour_imagefolder),
                          "--workers", "0", "--device", "cpu", "--output", str(out_json)]) == 0
    assert json.loads(out_json.read_text()) == pytest.approx(expected)
    assert "top1" in capsys.readouterr().out
    # Exported weights with only the model's description: name the eval transform.
    final = load_checkpoint(trained_run / "model_final.pth")
    description = {"model_name": json.dumps("resnet18"), "model_options": json.dumps(final["model_options"])}
    st = export_weights(final["model"], tmp_path / "w.safetensors", metadata=description)
    assert eval_cls.main(["--weights", str(st), "--model", "resnet18", "--data", str(colour_imagefolder),
                          "--image-size", "32", "--crop-pct", "1.0", "--workers", "0", "--device", "cpu",
                          "--output", str(out_json)]) == 0
    assert json.loads(out_json.read_text()) == pytest.approx(expected)


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def test_evaluate_counts_top1_and_top5_hits():
    # 7 classes ranked 0 > 1 > ... > 6: targets 0 (top-1), 4 (5th: top-5) and 5 (6th: neither).
    ranked = _FixedLogits(torch.arange(7, 0, -1.0).repeat(3, 1))
    loader = [(torch.zeros(3, 3, 8, 8), torch.tensor([0, 4, 5]), 1)]  # (images, targets, images skipped)
    result = evaluate(ranked, loader, torch.device("cpu"))
    assert result == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(2 / 3), "num_images": 3, "skipped_images": 1}
    # Fewer classes than 5: top-k over all of them.
    two = _FixedLogits(torch.tensor([[2.0, 1.0], [2.0, 1.0]]))
    result = evaluate(two, [(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), 0)], torch.device("cpu"))
    assert (result["top1"], result["top5"]) == (0.5, 1.0)


class _NanAfter(nn.Module):
    """Cross-entropy that turns NaN from its ``n``-th call: a diverging run."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, logits, targets):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if self.calls >= self.n else loss


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(shapes_imagefolder, tmp_path):
    cfg = ClsTrainConfig(model="resnet18", data=str(shapes_imagefolder), image_size=32, epochs=3, batch_size=4, lr=0.01,
                         device="cpu", workers=0, output_dir=str(tmp_path))
    # NaN from the 4th iteration on (index 3, the first of epoch 2): rolled back 3 times, then stopped at index 6.
    with pytest.raises(FloatingPointError, match=r"iteration 6\b.*loss=nan.*after 3 recoveries"):
        train(cfg, criterion=_NanAfter(4))
    manager = CheckpointManager(tmp_path)
    assert [p.name for p in manager.checkpoints()] == ["model_0000003.pth", "model_0000006.pth"]
    assert load_checkpoint(manager.latest())["divergence_guard"]["recoveries"] == 3
    assert not (tmp_path / "model_final.pth").exists()


# ----------------------------------------------------------------------------- data errors


def test_bad_layouts_give_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="Expected layout"):
        check_layout(tmp_path / "missing")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no val folder.*Expected layout"):
        check_layout(tmp_path)
    (tmp_path / "val").mkdir()
    cfg = ClsTrainConfig(image_size=32)
    with pytest.raises(ValueError, match="Expected layout"):  # class folder "a" holds no image
        build_datasets(tmp_path, cfg)
    # The command line turns these into a message and exit status 2, not a traceback.
    assert train_cls.main(["--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "Expected layout" in capsys.readouterr().err


def test_train_val_class_mismatch(tmp_path):
    for split, cls in (("train", "a"), ("val", "b")):
        (tmp_path / split / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "x.png")
    with pytest.raises(ValueError, match="class folders differ"):
        build_datasets(tmp_path, ClsTrainConfig(image_size=8))


def test_unreadable_image_named_or_skipped(shapes_imagefolder, tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for cls_dir in (shapes_imagefolder / split).iterdir():
            (root / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:2]:
                (root / split / cls_dir.name / f.name).write_bytes(f.read_bytes())
    bad = root / "train" / "circle" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    train_set, _, _ = build_datasets(root, ClsTrainConfig(image_size=32))
    index = [p for p, _ in train_set.samples].index(str(bad))
    with pytest.raises(ValueError, match="broken.JPEG"):
        train_set[index]
    skip_set, _, _ = build_datasets(root, ClsTrainConfig(image_size=32, skip_bad_images=True))
    batches = list(DataLoader(skip_set, batch_size=len(skip_set), collate_fn=collate_skipping_none))
    images, targets, skipped = batches[0]
    assert skipped == 1 and len(images) == len(targets) == len(skip_set) - 1


# ----------------------------------------------------------------------------- engine pieces


def test_clip_gradients():
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert clip_gradients([p], None) is None
    norm = clip_gradients([p], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError):
        clip_gradients([p], 0.0)


def test_amp_policy():
    cpu = torch.device("cpu")
    assert resolve_amp(cpu, False) == (None, False)
    assert resolve_amp(cpu, True) == (torch.bfloat16, False)
    assert resolve_amp(cpu, True, "float16") == (torch.float16, True)
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_amp(cpu, True, "int8")


def test_metric_logger_and_curves(tmp_path, capsys):
    log = MetricLogger(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # constructing writes nothing
    for step in (1, 2, 3):
        log.log(step, loss=torch.tensor(1.0 / step), top1=0.1 * step)
    log.log(4, loss=float("nan"))
    log.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0] == {"step": 1, "loss": 1.0, "top1": pytest.approx(0.1)}
    assert records[3] == {"step": 4, "loss": None}
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    png = plot_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "c.png", ["loss", "top1", "absent"])
    assert png.stat().st_size > 1000
    MetricLogger(tmp_path / "off", enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "off").exists()
    bar = progress(10, initial=4, enabled=True, desc="train")
    bar.set_postfix(loss="0.123", lr="1e-3")
    bar.update()
    bar.close()
    shown = capsys.readouterr().err
    assert bar.n == 5 and "5/10" in shown and "loss=0.123" in shown and "it/s" in shown
    quiet = progress(10, enabled=False)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().err == ""


def test_distributed_helpers_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled, info.device) == (0, 1, False, torch.device("cpu"))
    assert is_main_process()
    barrier()
    assert all_gather_object({"a": 1}) == [{"a": 1}]
    assert reduce_dict({"loss": torch.tensor(2.5)})["loss"].item() == 2.5
    with pytest.raises(ValueError, match="cpu"):
        init_distributed("tpu")
