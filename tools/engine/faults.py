"""Fault injection for testing crash safety: kill this process at a named point of a run.

A test hook, off unless the environment asks for it. The training loops call
:func:`crash_point` at the places where a crash is hardest to survive (inside a training
step, between writing a checkpoint's temp file and renaming it, during evaluation). With

    RESDET_CRASH_AT="<name>:<n>"      e.g. RESDET_CRASH_AT="checkpoint_write:2"

the process sends itself SIGKILL at the ``n``-th time it reaches point ``name`` (counted from
1), exactly as an out-of-memory killer or a pre-empted cluster job would: no ``finally``
blocks, no atexit handlers, no flushing. Optional filters:

- ``RESDET_CRASH_RANK=<r>``: only the process whose ``RANK`` (torchrun) is ``r`` crashes.
- A worker group restarted by torchrun (``TORCHELASTIC_RESTART_COUNT`` > 0) never crashes, so
  a test can check that the restarted job recovers.

Points: ``train_step`` (forward and backward passes done, before the optimizer step),
``checkpoint_write`` (temp file of any atomic write written and synced, not yet renamed over
the real name), ``eval`` (after each evaluation batch).

When ``RESDET_CRASH_AT`` is unset, :func:`crash_point` is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "CRASH_RANK_ENV", "POINTS", "crash_point"]

CRASH_ENV = "RESDET_CRASH_AT"
CRASH_RANK_ENV = "RESDET_CRASH_RANK"
POINTS = ("train_step", "checkpoint_write", "eval")

_counts: dict[str, int] = {}


def _parse(spec: str) -> tuple[str, int]:
    name, sep, count = spec.rpartition(":")
    if not sep or name not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{CRASH_ENV} must be '<point>:<n>' with point one of {list(POINTS)} and n >= 1, "
                         f"got {spec!r}")
    return name, int(count)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``RESDET_CRASH_AT`` names ``name`` and this is its ``n``-th occurrence."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, count = _parse(spec)
    if name != target:
        return
    rank = os.environ.get(CRASH_RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)
