"""Metric logging (JSON lines + TensorBoard) and a tqdm progress bar.

Only the main process should write: pass ``enabled=is_main_process()``; a disabled logger
accepts the same calls and does nothing.

Example::

    log = MetricLogger("output/run1", enabled=is_main_process())
    bar = progress(total=num_iters, enabled=is_main_process(), desc="epoch 1")
    for ...:
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
        bar.update()
    log.log(step=epoch, train_loss=0.7, top1=0.61)
    log.close()
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

__all__ = ["MetricLogger", "progress"]


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric values must be numbers or scalar tensors, got {type(value).__name__}")


class MetricLogger:
    """Appends one JSON object per :meth:`log` call to ``OUTPUT_DIR/metrics.jsonl`` and mirrors it to TensorBoard.

    Args:
        output_dir: run folder; ``metrics.jsonl`` and the TensorBoard event files go here.
        enabled: when False nothing is written (use on non-main ranks).
        filename: JSON-lines file name inside ``output_dir``.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, filename: str = "metrics.jsonl") -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.output_dir / filename
        self._writer = None  # created on first log: constructing a logger writes nothing
        self._checked_end = False

    def log(self, step: int, **scalars: Any) -> None:
        """Record ``scalars`` (numbers or scalar tensors) at ``step``; the JSON line also holds ``"step"``.

        Non-finite values are written as JSON ``null`` so the file stays valid JSON.
        """
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"step": int(step), **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        with open(self.path, "a+b") as f:
            if not self._checked_end:
                # A run killed mid-write leaves a half line; start on a fresh one so this record stays readable.
                self._checked_end = True
                if f.tell() > 0:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode())
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._writer = SummaryWriter(log_dir=str(self.output_dir))
        for key, value in values.items():
            self._writer.add_scalar(key, value, int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, initial: int = 0, enabled: bool = True, desc: str | None = None) -> tqdm:
    """A tqdm bar over ``total`` steps starting at ``initial`` (for resumed runs).

    tqdm shows it/s and the ETA; add loss and lr with ``bar.set_postfix(loss=..., lr=...)``.
    Disabled bars (non-main ranks) accept the same calls and print nothing.
    """
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=True)
