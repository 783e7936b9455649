"""Checkpoints (tools.engine.checkpoint): atomic save, safe load, rotation, corrupt files, RNG state, export."""
from __future__ import annotations

import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch

import backbones
from tools.engine.checkpoint import (
    CheckpointManager,
    export_weights,
    get_rng_state,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from tools.reference_models import randomize_norm_stats


def test_save_load_round_trip_leaves_no_temp_files(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "iteration": 7, "names": ["a", "b"], "cfg": {"lr": 0.1, "x": None}}
    save_checkpoint(tmp_path / "c.pth", state)
    loaded = load_checkpoint(tmp_path / "c.pth")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["iteration"] == 7 and loaded["names"] == ["a", "b"] and loaded["cfg"] == {"lr": 0.1, "x": None}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "c.pth"
    save_checkpoint(path, {"v": torch.tensor(1)})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(path, {"v": Unpicklable()})
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # the temp file was removed


class _Payload:
    """Unpickling this would create ``marker``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model": {}, "x": _Payload(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_manager_naming_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for it in (10, 20, 30, 40):
        manager.save({"iteration": it}, it)
    manager.save_final({"iteration": 40})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000030.pth", "model_0000040.pth", "model_final.pth"]
    assert manager.latest() == tmp_path / "model_0000040.pth"


def test_keep_all_by_default_and_invalid_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path)
    for it in (1, 2, 3):
        manager.save({"iteration": it}, it)
    assert len(manager.checkpoints()) == 3
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_latest_skips_corrupt_newest_and_reports_path(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"iteration": 100, "w": torch.randn(50)}, 100)
    newest = manager.save({"iteration": 200, "w": torch.randn(50)}, 200)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a crash of a non-atomic writer
    # Leftover of a write killed before its rename: must be ignored and cleaned.
    stale = tmp_path / ".model_0000300.pth.tmp-abc123"
    stale.write_bytes(b"partial")
    with pytest.warns(RuntimeWarning, match="model_0000200.pth"):
        found = manager.load_latest()
    assert found is not None
    path, state = found
    assert path.name == "model_0000100.pth" and state["iteration"] == 100
    assert not stale.exists()
    assert newest.exists()  # kept for inspection, but never taken for good


def test_latest_none_when_nothing_usable(tmp_path):
    assert CheckpointManager(tmp_path / "missing").latest() is None
    (tmp_path / "model_0000005.pth").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning):
        assert CheckpointManager(tmp_path).latest() is None


def _draw() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.randn(), torch.rand(3)


def test_rng_state_round_trip_through_safe_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    np.random.randn()
    save_checkpoint(tmp_path / "rng.pth", {"rng": get_rng_state()})
    expected = _draw()
    _draw()  # move every generator on
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    got = _draw()
    assert got[:4] == expected[:4]
    assert torch.equal(got[4], expected[4])


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_weights_round_trip(tmp_path, suffix):
    model = randomize_norm_stats(backbones.resnet18(num_classes=3))  # loaded and fresh norms differ
    path = export_weights(model, tmp_path / f"w{suffix}")
    loaded = load_checkpoint(path)
    assert set(loaded) == set(model.state_dict())
    fresh = backbones.resnet18(num_classes=3)
    backbones.load_weights(fresh, path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_export_weights_handles_shared_storage_and_rejects_bad_input(tmp_path):
    w = torch.randn(4, 4)
    export_weights({"a": w, "b": w, "c": w[0]}, tmp_path / "tied.safetensors")
    loaded = load_checkpoint(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w[0])
    with pytest.raises(ValueError, match="non-tensor"):
        export_weights({"a": w, "step": 3}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        export_weights({"a": w}, tmp_path / "x.npz")


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth")
    assert not os.path.exists(tmp_path / "nope.pth")


def test_disk_full_keeps_the_old_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    save_checkpoint(path, {"v": torch.tensor(1)})

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="no space left on device") as info:
        save_checkpoint(path, {"v": torch.tensor(2)})
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is None
    monkeypatch.undo()
    assert load_checkpoint(path)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_seen_through_torchs_chained_writer_error(tmp_path):
    from tools.engine.checkpoint import _atomic_write

    def write(f):
        with open("/dev/full", "wb") as full:  # a real ENOSPC, which torch's zip writer wraps in a RuntimeError
            torch.save({"w": torch.zeros(1000)}, full)

    with pytest.raises(OSError, match=r"no space left on device while writing .*c\.pth"):
        _atomic_write(tmp_path / "c.pth", write)
    assert not list(tmp_path.iterdir())


def test_resume_says_when_no_checkpoint_is_readable(tmp_path, caplog):
    for it in (2, 4):
        (tmp_path / f"model_{it:07d}.pth").write_bytes(b"\x00" * 10)
    with pytest.warns(RuntimeWarning, match="model_0000004.pth"), caplog.at_level("WARNING"):
        assert CheckpointManager(tmp_path).load_latest() is None
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "none of the 2 checkpoints" in message and "model_0000002.pth" in message
    caplog.clear()
    assert CheckpointManager(tmp_path / "empty").load_latest() is None
    assert not caplog.records  # nothing there: nothing to warn about


def test_a_folder_holds_one_run(tmp_path):
    old = CheckpointManager(tmp_path, keep_last=2)
    assert old.begin(resume=False) is None
    old.save({"x": 1}, 600)
    new = CheckpointManager(tmp_path, keep_last=2)
    with pytest.raises(ValueError, match=r"another run \(model_0000600.pth\).*--resume.*--overwrite"):
        new.begin(resume=False)  # a new run would have had its own checkpoints rotated away by the old run's
    path, state = new.begin(resume=True)
    assert path.name == "model_0000600.pth" and state["run_id"] == old.run_id == new.run_id  # resume takes it over

    fresh = CheckpointManager(tmp_path, keep_last=2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 600}\n')
    assert fresh.begin(resume=False, overwrite=True) is None
    assert not list(tmp_path.iterdir())  # the old run's checkpoint and metrics are gone
    fresh.save({"x": 2}, 200)
    fresh.save_final({"x": 3})
    assert fresh.run_id != old.run_id
    assert {load_checkpoint(p)["run_id"] for p in tmp_path.glob("model_*.pth")} == {fresh.run_id}


def test_resume_refuses_when_every_checkpoint_is_unreadable(tmp_path):
    (tmp_path / "model_0000010.pth").write_bytes(b"junk")
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="none of its checkpoints can be read"):
        CheckpointManager(tmp_path).begin(resume=True)
    assert CheckpointManager(tmp_path / "empty").begin(resume=True) is None  # nothing there: a fresh start
