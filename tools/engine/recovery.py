"""Recovery from loss spikes: roll training back to the last good state and go on at a lower learning rate.

:class:`DivergenceGuard` watches the loss of every iteration. A loss that is NaN/inf, or more
than ``spike_factor`` times the median of the recent window, is a divergence. Instead of
stopping the run (what torchvision, detectron2 and MMDetection do: ``FloatingPointError``), the
training loop asks the guard for the last good snapshot, restores the weights, optimizer moments,
AMP scaler and EMA from it, multiplies the learning rate by ``lr_factor`` for the rest of the
run, skips the offending batch and continues. After ``max_recoveries`` roll-backs the next
divergence raises ``FloatingPointError`` naming the iteration and every loss term.

What moves forward and what goes back: the data stream, the lr schedule's position and the
iteration count keep going (the batches between the snapshot and the spike are not replayed);
the trainable state goes back. The lowered lr, the recovery count and the loss window are part
of every checkpoint, so a resumed run goes on at the lowered lr.

Snapshots are taken in memory, on the model's device, every ``snapshot_every`` iterations and at
each checkpoint, but only while the loss is not climbing (at most twice the window's median), so
that a roll-back does not land in the middle of a blow-up. A resumed run starts with the loaded
checkpoint as its snapshot.

Example::

    guard = DivergenceGuard(max_recoveries=3)
    guard.take_snapshot(0, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    for iteration in range(iters):
        losses = model(batch)
        problem = guard.check(losses, iteration)
        if problem is not None:
            good = guard.recover(problem, iteration)       # raises after max_recoveries
            model.load_state_dict(good["model"]); optimizer.load_state_dict(good["optimizer"])
        else:
            ...step...
        scheduler.step(); guard.scale_lr(optimizer)
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
from typing import Any, Mapping

import torch

__all__ = ["DivergenceGuard"]

logger = logging.getLogger(__name__)


class DivergenceGuard:
    """Spots non-finite or exploding losses and hands back the last good training state.

    Args:
        max_recoveries: roll-backs allowed in a run; the next divergence raises (0 = stop at the first).
        spike_factor: a finite loss above ``spike_factor`` x the window's median is an explosion;
            ``None`` checks for NaN/inf only.
        window: how many recent losses the median is taken over.
        min_window: losses needed before explosions are judged (NaN/inf are judged from the start).
        snapshot_every: iterations between in-memory snapshots.
        lr_factor: learning-rate multiplier applied at each recovery.
    """

    def __init__(self, max_recoveries: int = 3, spike_factor: float | None = 10.0, window: int = 50,
                 min_window: int = 10, snapshot_every: int = 20, lr_factor: float = 0.5) -> None:
        if max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {max_recoveries}")
        if spike_factor is not None and not spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1 or None (off), got {spike_factor}")
        if snapshot_every < 1 or window < 1 or min_window < 1:
            raise ValueError(f"snapshot_every, window and min_window must be >= 1, got {snapshot_every}, {window}, "
                             f"{min_window}")
        if not 0 < lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {lr_factor}")
        self.max_recoveries = max_recoveries
        self.spike_factor = spike_factor
        self.window = window
        self.min_window = min_window
        self.snapshot_every = snapshot_every
        self.lr_factor = lr_factor
        self.recoveries = 0
        self.lr_scale = 1.0
        self.losses: list[float] = []
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_iteration = -1

    # ------------------------------------------------------------------ judging losses

    def _median(self) -> float:
        return statistics.median(self.losses)

    def check(self, losses: Mapping[str, torch.Tensor | float], iteration: int, total_key: str = "loss") -> str | None:
        """``None`` when the iteration's losses are fine, else a one-line description of the problem.

        ``losses`` holds every term and the total under ``total_key`` (reduced over ranks, so that
        every rank decides alike). A fine total is added to the window.
        """
        values = {k: float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)
                  for k, v in losses.items()}
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        if not all(math.isfinite(v) for v in values.values()):
            return f"loss became non-finite at iteration {iteration}: {terms}"
        total = values[total_key]
        if self.spike_factor is not None and len(self.losses) >= self.min_window:
            median = self._median()
            if total > self.spike_factor * median:
                return (f"loss exploded at iteration {iteration}: {terms} ({total / median:.1f}x the median "
                        f"{median:.4g} of the last {len(self.losses)} iterations)")
        self.losses = (self.losses + [total])[-self.window:]
        return None

    def healthy(self) -> bool:
        """Whether the newest loss is low enough (at most twice the window's median) for a snapshot."""
        return not self.losses or self.losses[-1] <= 2 * self._median()

    # ------------------------------------------------------------------ snapshots and recovery

    def due(self, iteration: int) -> bool:
        """Whether a snapshot is due after ``iteration`` completed iterations."""
        return iteration % self.snapshot_every == 0 and self.healthy()

    def take_snapshot(self, iteration: int, state: Mapping[str, Any]) -> None:
        """Keep a deep copy of ``state`` (state dicts of the model, optimizer, ...) as the last good state."""
        if iteration == self._snapshot_iteration:
            return
        self._snapshot = copy.deepcopy(dict(state))
        self._snapshot_iteration = iteration

    def recover(self, problem: str, iteration: int) -> dict[str, Any]:
        """Account for one divergence and return the last good state to restore.

        Lowers ``lr_scale`` by ``lr_factor``; the caller restores the returned state dicts, then
        steps its scheduler and calls :meth:`scale_lr` as after any iteration.

        Raises:
            FloatingPointError: ``max_recoveries`` roll-backs were used up, or there is no snapshot.
        """
        if self.recoveries >= self.max_recoveries or self._snapshot is None:
            used = f" after {self.recoveries} recoveries (lr x{self.lr_scale:g})" if self.recoveries else ""
            raise FloatingPointError(
                f"{problem}; stopped{used}. Lower the learning rate, enable gradient clipping "
                "(clip_grad_norm / --clip-grad) or check the data.")
        self.recoveries += 1
        self.lr_scale *= self.lr_factor
        logger.warning("%s; restored the state of iteration %d, lr x%g from now on, skipped this batch "
                       "(recovery %d of %d)", problem, self._snapshot_iteration, self.lr_scale, self.recoveries,
                       self.max_recoveries)
        return copy.deepcopy(self._snapshot)

    def scale_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """After a scheduler step (which sets the unscaled lr): apply ``lr_scale``."""
        if self.lr_scale != 1.0:
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_scale

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the recovery count, the lr scale and the loss window."""
        return {"recoveries": self.recoveries, "lr_scale": self.lr_scale, "losses": list(self.losses)}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``None``, from checkpoints written before recovery existed: nothing)."""
        if not state:
            return
        self.recoveries = int(state["recoveries"])
        self.lr_scale = float(state["lr_scale"])
        self.losses = [float(v) for v in state["losses"]][-self.window:]
