"""Distributed faults under torchrun (gloo, CPU): a dying rank fails the whole job quickly and by name, and an
elastic restart (``--max-restarts``) resumes from the last checkpoint to the same weights as an uninterrupted run.

The ranks are killed by the fault-injection hook (tools.engine.faults) with SIGKILL, only on rank 1.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from tools.engine import cls_train, det_train, distributed
from tools.engine.checkpoint import load_checkpoint
from tools.engine.config import load_config
from tools.reference_models import TINY_CLASSIFIER, TINY_DETECTOR

pytestmark = pytest.mark.slow  # torchrun jobs: processes, process groups, restarts

REPO = Path(__file__).resolve().parents[1]

DET_TINY = {
    **TINY_DETECTOR,
    "min_sizes": [48], "max_size": 64, "batch_size": 1, "lr": 0.02, "warmup_iters": 0, "steps": [100],
    "workers": 0, "log_every": 1, "vis_images": 0, "device": "cpu", "seed": 2,
    "iters": 6, "checkpoint_every": 2, "keep_last": 2, "dist_timeout_s": 60.0,
}


@pytest.fixture(scope="module")
def det_yaml(coco_shapes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "tiny.yaml"
    path.write_text(yaml.safe_dump({**DET_TINY, **coco_shapes}))
    return path


def _torchrun(config: Path, out: Path, max_restarts: int, crash_at: str,
              timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    """Run the tiny job under torchrun; past ``timeout`` the agent and its workers are killed and the test fails
    with the end of their output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESDET_CRASH_AT": crash_at, "RESDET_CRASH_RANK": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
               "tools/train_det.py", "--config", str(config), "--output-dir", str(out)]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own, out of reach of killpg; killing only the agent
        # would leave the workers holding the output pipes, and communicate() would wait for them too.
        workers = _descendants(process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s:\n{(stdout + stderr)[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    return result, time.monotonic() - start


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``: its children, theirs, and so on (read from /proc: the tests run on Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_dead_rank_fails_the_job_quickly_naming_the_rank(det_yaml, tmp_path):
    result, seconds = _torchrun(det_yaml, tmp_path, max_restarts=0, crash_at="train_step:2")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # Rank 0 is then blocked in a collective with the dead rank; the job must still end promptly
    # (process startup included: importing torch twice on a loaded 2-core machine is most of it).
    assert seconds < 90, f"the job took {seconds:.0f} s to fail"
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]
    assert re.search(r"exitcode\s*:\s*-9", output), output[-3000:]
    assert not (tmp_path / "model_final.pth").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(config: str, out: str, rank: int, port: int) -> None:
    """One rank of an uninterrupted 2-process run (forkserver child: the engine is imported already)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    det_train.train(load_config(det_train.DetTrainConfig, config, {"output_dir": out}))


def test_elastic_restart_resumes_from_last_checkpoint_exactly(det_yaml, tmp_path):
    # Reference: the same 2-process job without faults, as two forked ranks (skips two interpreter starts).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "tools.engine.det_train"])
    reference, port = tmp_path / "reference", _free_port()
    ranks = [ctx.Process(target=_ddp_rank, args=(str(det_yaml), str(reference), r, port)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=240)
    assert [p.exitcode for p in ranks] == [0, 0]

    # Rank 1 dies inside the 5th step, after the checkpoint of iteration 4; torchrun restarts both ranks, once:
    # the restarted group must connect at the first try (tools.engine.distributed scopes the process group's
    # keys in torchrun's store to the restart, so no worker can dial a dead one's address).
    out = tmp_path / "elastic"
    result, _ = _torchrun(det_yaml, out, max_restarts=1, crash_at="train_step:5")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "torchrun restarted the workers" in output and "resumed from" in output
    assert "model_0000004.pth (iteration 4)" in output

    expected = load_checkpoint(reference / "model_final.pth")["model"]
    resumed = load_checkpoint(out / "model_final.pth")["model"]
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs from the uninterrupted run"


def test_restarted_group_cannot_read_the_dead_groups_store_keys(monkeypatch):
    """torchrun's agent keeps one store for all restarts. A restarted group must not read what the dead group left
    there (gloo would dial a dead worker's address), while the ranks of one attempt see each other's keys."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)

    def worker_store(restart: int, rank: int) -> dist.Store | None:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        return distributed._restart_scoped_store(rank, 2, datetime.timedelta(seconds=10))

    worker_store(0, 1).set("address/1", "dead worker")
    rank0, rank1 = worker_store(1, 0), worker_store(1, 1)
    assert not rank0.check(["address/1"])
    rank1.set("address/1", "live worker")
    assert rank0.get("address/1") == b"live worker"
    # Across nodes each agent counts its own restarts, so the count cannot name an attempt: torch's default.
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert worker_store(1, 0) is None


def test_restarted_worker_resumes_without_the_flag(shapes_imagefolder, tmp_path, monkeypatch, caplog):
    """Both tools share the rule: a torchrun-restarted worker (TORCHELASTIC_RESTART_COUNT > 0) resumes."""
    cfg = load_config(cls_train.ClsTrainConfig, None, {
        **TINY_CLASSIFIER, "data": str(shapes_imagefolder), "image_size": 32, "epochs": 1, "batch_size": 4,
        "lr": 0.01, "device": "cpu", "workers": 0, "output_dir": str(tmp_path / "run"),
    })
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cls_train.train(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with caplog.at_level(logging.INFO, logger="tools.engine"):
        cls_train.train(cfg)  # no resume=True: the restart count alone makes it resume
    assert "torchrun restarted the workers" in caplog.text
    assert "resumed from" in caplog.text and "model_0000003.pth" in caplog.text  # 12 images, 4 a step
