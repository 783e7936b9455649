"""tools/benchmark.py: rows run, sides agree, the fine-tuning row compares like with like, memory probe works."""
import json
import re

import pytest
import torch

from tools import benchmark


def _quick_settings() -> benchmark.Settings:
    return benchmark.Settings(batch_size=2, image_size=64, threads=torch.get_num_threads(), iters=1, quick=True)


def test_classifier_row_json_and_agreement(tmp_path) -> None:
    out = tmp_path / "bench.json"
    benchmark.main(["--quick", "--rows", "resnet18_infer", "--iters", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert set(row["sides"]) == {"resdet", "torchvision", "timm"}
    assert all(ratio > 0 for ratio in row["ratios"].values())
    assert row["gflop_per_step"] > 0 and report["matmul_peak_gflops"]["fp32"] > 0
    diff = float(re.search(r"rel diff ([0-9.e+-]+)", row["check"]).group(1))
    assert diff < 1e-4  # same weights in every side: the logits agree


def test_optimised_detector_reproduces_torchvision_detections() -> None:
    settings = _quick_settings()
    row = benchmark.ROWS["faster_rcnn_infer_opt"]
    runners = {side: build(settings) for side, build in row.sides.items()}
    check = row.check(runners, settings)
    assert "agree 100%" in check, check
    assert not check.endswith("(0/0 dets)")


def test_finetune_row_trains_the_same_parameters_on_both_sides() -> None:
    settings = _quick_settings()
    runners = {side: build(settings) for side, build in benchmark.ROWS["faster_rcnn_finetune"].sides.items()}
    trainable = {
        side: sorted(tuple(p.shape) for p in r.model.parameters() if p.requires_grad) for side, r in runners.items()
    }
    assert trainable["resdet"] == trainable["torchvision"]
    frozen = [m for m in runners["torchvision"].model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert frozen and all(float(m.running_var.std()) > 0 for m in frozen[:3])  # calibrated, not identity stats
    losses = {side: float(r.step().detach()) for side, r in runners.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_r18_batch_norm_row_trains_batch_norm_on_both_sides() -> None:
    settings = _quick_settings()
    runners = {side: build(settings) for side, build in benchmark.ROWS["faster_rcnn_r18_train_bn"].sides.items()}
    for side, runner in runners.items():
        norms = [m for m in runner.model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(norms) == 20 and all(m.training and m.weight.requires_grad for m in norms), side
    trainable = {
        side: sorted(tuple(p.shape) for p in r.model.parameters() if p.requires_grad) for side, r in runners.items()
    }
    assert trainable["resdet"] == trainable["torchvision"]


def test_amp_row_compares_autocast_with_float32() -> None:
    """resdet under bf16 autocast against resdet and torchvision in float32, whatever --amp says (the folded
    convolutions' autocast backward itself: tests/test_backbones.py)."""
    row = benchmark.ROWS["faster_rcnn_r18_train_amp"]
    assert list(row.sides) == ["resdet", "resdet_fp32", "torchvision"] and row.amp


def test_memory_probe_reports_a_peak() -> None:
    peak = benchmark._memory_in_subprocess("resnet18_infer", "resdet", _quick_settings())
    assert peak is not None and peak > 100  # MiB: torch alone is several hundred


def test_unknown_row_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no row matches"):
        benchmark.select_rows("no_such_row", quick=False)
