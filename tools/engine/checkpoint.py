"""Checkpoints: atomic saves, safe loads, rotation, RNG state and weight export.

Everything here is task-agnostic; a training loop decides what goes into the ``state`` dict.
Loading always goes through ``torch.load(weights_only=True)`` (or safetensors), so a
checkpoint can only hold tensors and plain Python values (dict, list, tuple, str, int,
float, bool, None) and a malicious pickle is refused without running its code.

Example::

    manager = CheckpointManager("output/run1", keep_last=3)
    manager.save({"model": model.state_dict(), "rng": get_rng_state()}, iteration=1000)
    found = manager.load_latest()          # newest checkpoint that loads, or None
    if found is not None:
        path, state = found
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

from backbones.weights import UnsafeCheckpointError, read_file
from tools.engine.faults import crash_point

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointManager",
    "get_rng_state",
    "set_rng_state",
    "restore_training_state",
    "export_weights",
    "UnsafeCheckpointError",
]

_TMP_MARK = ".tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

logger = logging.getLogger(__name__)


def _is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is "no space left on device" (or over quota).

    torch.save reports a full disk as a RuntimeError from its zip writer, raised while handling the OSError.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, fsync it, then rename it over ``path``.

    A reader (or a resumed run) therefore sees either the old file or the complete new one,
    never a half-written one, even if the process is killed mid-write. A full disk raises a
    one-line ``OSError(ENOSPC)`` naming ``path`` instead of torch's chained writer errors.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("checkpoint_write")  # test hook: a kill here leaves only the temp file
        os.replace(tmp_name, path)
    except BaseException as e:
        Path(tmp_name).unlink(missing_ok=True)
        if _is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} "
                                        f"({'the previous file is unchanged' if path.exists() else 'nothing written'})"
                          ) from None
        raise
    # Make the rename itself durable; not every filesystem allows opening a directory.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Save ``state`` with ``torch.save`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    _atomic_write(Path(path), lambda f: torch.save(dict(state), f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely.

    ``.safetensors`` files go through safetensors (a flat name -> tensor dict); anything else
    through ``torch.load(weights_only=True)``, which refuses pickles holding arbitrary objects.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file holds objects a safe load refuses (nothing of it ran).
        ValueError: naming ``path``: the file is empty, truncated, corrupt, not a checkpoint, or not a dict
            (:func:`backbones.weights.read_file`).
    """
    state = read_file(path, map_location)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state



class CheckpointManager:
    """Rotating checkpoints ``OUTPUT_DIR/model_{iteration:07d}.pth`` plus ``model_final.pth``, of one run.

    A folder holds one run: :meth:`begin` continues the run found there (``resume``) or starts a new
    one, which refuses a folder holding another run's files unless told to delete them. Every state
    written carries the run's identity (``"run_id"``), so resume and rotation only ever see that
    run's files.

    Args:
        output_dir: folder for the checkpoints (created on first save).
        keep_last: keep only this many periodic checkpoints (oldest deleted first);
            ``None`` keeps all. ``model_final.pth`` is never deleted.
        prefix: file name prefix, ``"model"`` by default.
    """

    def __init__(self, output_dir: str | Path, keep_last: int | None = None, prefix: str = "model") -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be None (keep all) or >= 1, got {keep_last}")
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.prefix = prefix
        self.run_id = uuid.uuid4().hex[:12]
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pth$")

    def run_files(self) -> list[Path]:
        """What a run leaves here that another run must not mix with: checkpoints, final and best weights, metrics."""
        best = self.output_dir / f"{self.prefix}_best.pth"
        others = [self.final_path, self.final_path.with_suffix(".safetensors"), best, best.with_suffix(".safetensors"),
                  self.output_dir / "metrics.jsonl"]
        return self.checkpoints() + [p for p in others if p.is_file()]

    def begin(self, resume: bool, overwrite: bool = False, delete: bool = True,
              accept: Callable[[dict[str, Any]], object] | None = None) -> tuple[Path, dict[str, Any]] | None:
        """Continue the run in the folder, or start a new one; returns ``(path, state)`` resumed from, or ``None``.

        Args:
            resume: continue from the newest readable checkpoint, taking over its ``run_id``. With no
                checkpoint at all the run starts from scratch (a run killed before its first checkpoint).
            overwrite: a new run deletes another run's files (:meth:`run_files`) instead of refusing.
            delete: whether this process deletes them (only one process of a distributed job should).
            accept: see :meth:`load_latest`.

        Raises:
            ValueError: a new run (or a resume whose checkpoints are all unreadable) would mix with the
                files of another run; the message names them and the ways out.
        """
        if resume:
            found = self.load_latest(accept=accept)
            if found is not None:
                self.run_id = str(found[1].get("run_id") or self.run_id)  # checkpoints from before run ids: adopt
                return found
            if not self.checkpoints():
                return None
        existing = self.run_files()
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
            why = "none of its checkpoints can be read or fits this run" if resume else "another run's files are there"
            raise ValueError(f"{self.output_dir} holds the files of another run ({names}) and {why}: pass --resume to "
                             "continue it, --overwrite to delete them, or choose another --output-dir")
        if existing and delete:
            logger.warning("--overwrite: deleting the previous run's files in %s: %s", self.output_dir,
                           ", ".join(p.name for p in existing))
            for path in existing:
                path.unlink(missing_ok=True)
        return None

    def path_for(self, iteration: int) -> Path:
        """Path of the checkpoint for ``iteration``."""
        return self.output_dir / f"{self.prefix}_{iteration:07d}.pth"

    @property
    def final_path(self) -> Path:
        return self.output_dir / f"{self.prefix}_final.pth"

    def checkpoints(self) -> list[Path]:
        """Periodic checkpoints on disk, oldest first (by iteration number)."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for p in self.output_dir.iterdir():
            m = self._pattern.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def clean_temp_files(self) -> list[Path]:
        """Delete temp files left by writes that were killed; returns what was deleted."""
        if not self.output_dir.is_dir():
            return []
        removed = []
        for p in self.output_dir.glob(f".{self.prefix}_*{_TMP_MARK}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def save(self, state: Mapping[str, Any], iteration: int) -> Path:
        """Atomically write ``state`` as the checkpoint for ``iteration``; then apply ``keep_last``."""
        path = self.path_for(iteration)
        self.clean_temp_files()
        save_checkpoint(path, {**state, "run_id": self.run_id})
        if self.keep_last is not None:
            for old in self.checkpoints()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def save_final(self, state: Mapping[str, Any]) -> Path:
        """Atomically write ``model_final.pth``."""
        save_checkpoint(self.final_path, {**state, "run_id": self.run_id})
        return self.final_path

    def load_latest(self, map_location: str | torch.device = "cpu",
                    accept: Callable[[dict[str, Any]], object] | None = None) -> tuple[Path, dict[str, Any]] | None:
        """``(path, state)`` of the newest periodic checkpoint that loads, or ``None``.

        Newer files that fail to load (truncated, corrupt, unsafe), or whose state ``accept`` rejects
        by raising (e.g. ``model.load_state_dict`` on weights of another model), are skipped with a
        ``RuntimeWarning`` naming their path; they are left on disk for inspection. When checkpoints
        exist but none loads, a warning is logged saying so.
        """
        self.clean_temp_files()
        found = self.checkpoints()
        for path in reversed(found):
            try:
                state = load_checkpoint(path, map_location)
            except Exception as e:  # any failure means "not a usable checkpoint"
                reason = str(e) if str(path) in str(e) else f"{type(e).__name__}: {e}"
                warnings.warn(f"skipping unreadable checkpoint {path}: {reason}", RuntimeWarning, stacklevel=2)
                continue
            try:
                if accept is not None:
                    accept(state)
            except (KeyError, RuntimeError, TypeError, ValueError) as e:
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                warnings.warn(f"skipping checkpoint {path}: it does not fit this run ({first_line})", RuntimeWarning,
                              stacklevel=2)
                continue
            return path, state
        if found:
            logger.warning("none of the %d checkpoints in %s could be read%s (%s); the files are left in place",
                           len(found), self.output_dir, " or fits this run" if accept is not None else "",
                           ", ".join(p.name for p in found))
        return None

    def latest(self) -> Path | None:
        """Path of the newest periodic checkpoint that loads correctly, or ``None``."""
        found = self.load_latest()
        return None if found is None else found[0]


def restore_training_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                           scaler: Any, guard: Any, rank: int, world_size: int) -> None:
    """Restore what a resumed run goes on from besides the weights (loaded while the checkpoint was chosen): the
    optimizer, scheduler, AMP scaler (when both exist), divergence guard and this rank's RNG states."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    guard.load_state_dict(state.get("divergence_guard"))
    rng = state["rng"]
    set_rng_state(rng[rank] if len(rng) == world_size else rng[0])  # one saved stream per rank, else the first


def get_rng_state() -> dict[str, Any]:
    """RNG states of python ``random``, numpy, torch CPU and (when available) CUDA.

    Stored as tensors, ints and floats only, so it survives ``torch.load(weights_only=True)``.
    """
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version),
        "python_state": torch.tensor(mt_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved by :func:`get_rng_state`.

    The CUDA part is restored only when CUDA is available and the device count matches.
    """
    random.setstate(
        (state["python_version"], tuple(int(x) for x in state["python_state"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def export_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write model weights (a flat name -> tensor dict) to ``.safetensors`` or ``.pth``/``.pt``.

    A module wrapped in ``DistributedDataParallel``/``DataParallel`` is unwrapped first.
    ``metadata`` (strings only) goes into the safetensors header; it is ignored for ``.pth``.
    """
    path = Path(path)
    if isinstance(model_or_state_dict, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model_or_state_dict = model_or_state_dict.module
    if isinstance(model_or_state_dict, nn.Module):
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = dict(model_or_state_dict)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"export_weights needs a flat name -> tensor dict; non-tensor entries: {bad[:5]}")
    # Clone: safetensors refuses tensors that share storage (tied or viewed weights).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        _atomic_write(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=meta or None)))
    elif path.suffix in (".pth", ".pt", ".bin"):
        save_checkpoint(path, tensors)
    else:
        raise ValueError(f"unknown weights file type {path.suffix!r} for {path}; use .safetensors, .pth, .pt or .bin")
    return path
