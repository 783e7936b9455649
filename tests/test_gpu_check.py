"""tools/gpu_check.sh in its CPU mode: the steps run, a failing step is recorded and the run goes on, one JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_mode_writes_one_json_of_every_step(tmp_path):
    # The interpreter the script is given refuses the classifier training benchmark: that step fails, the next run.
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncase \"$*\" in *resnet18_train*) echo broken >&2; exit 3;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    steps = "make_data bench_cls_infer bench_cls_train train_det train_cls"
    env = {**os.environ, "GPU_CHECK_CPU": "1", "GPU_CHECK_STEPS": steps, "PYTHON": str(python),
           "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed: bench_cls_train" in done.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())  # $OUT is the default folder
    assert report["mode"] == "cpu" and report["machine"]["torch"] and "cuda" in report["machine"]
    assert report["machine"]["gpu_count"] == 0 and report["total_wall_s"] > 0
    run = report["steps"]
    assert set(run) == {"make_data", "bench_cls_infer", "bench_cls_train", "bench_detectors", "train_det",
                        "train_cls", "torchrun_det"}
    for name in ("make_data", "bench_cls_infer", "train_det", "train_cls"):
        assert run[name]["exit_code"] == 0, run[name].get("log_tail")
        assert run[name]["wall_s"] > 0 and run[name]["command"]
    assert run["bench_cls_train"]["exit_code"] == 3 and run["bench_cls_train"]["log_tail"] == ["broken"]
    assert run["bench_cls_train"]["numbers"]["rows"] == {}
    assert run["bench_detectors"] == {"skipped": "skipped: not in GPU_CHECK_STEPS"}
    assert "2" in run["torchrun_det"]["skipped"]  # needs 2 GPUs
    row = run["bench_cls_infer"]["numbers"]["rows"]["resnet18_infer"]
    assert row["img_per_s"] > 0 and set(row["ratios"]) == {"torchvision", "timm"}
    assert "--amp" in run["bench_cls_infer"]["command"] and "--channels-last" in run["bench_cls_infer"]["command"]
    det = run["train_det"]["numbers"]
    assert 0.0 <= det["final"]["bbox"]["AP"] <= 1.0 and det["median_time_per_iter_s"] > 0
    assert "--amp" in run["train_det"]["command"]
    cls = run["train_cls"]["numbers"]
    assert 0.0 <= cls["final"]["top1"] <= 1.0 and len(cls["epoch_time_s"]) == 1
