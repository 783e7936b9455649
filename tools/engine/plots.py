"""Training curves from ``metrics.jsonl`` (written by :class:`tools.engine.logger.MetricLogger`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from tools.engine.values import is_number  # noqa: E402

__all__ = ["read_metrics", "plot_curves"]

logger = logging.getLogger(__name__)


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """All records of a JSON-lines metrics file, in order.

    Lines that are not a JSON object (the half-written last line of a killed run) are skipped with a
    warning, so a finished run's plots never fail on them.
    """
    records, skipped = [], 0
    with open(metrics_jsonl, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                skipped += 1
    if skipped:
        logger.warning("%s: skipped %d unreadable line(s) (e.g. half-written by a killed run)", metrics_jsonl, skipped)
    return records


def plot_curves(
    metrics_jsonl: str | Path, out_png: str | Path, keys: Sequence[str], x_key: str = "step"
) -> Path:
    """Plot each of ``keys`` against ``x_key``, one subplot per key, into ``out_png``.

    Records lacking a key (or holding ``null`` or another non-number for it) are left out of that key's curve;
    a key found in no record gets an empty subplot titled "(no data)".
    """
    if not keys:
        raise ValueError("plot_curves needs at least one key to plot")
    records = read_metrics(metrics_jsonl)
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        points = [(r[x_key], r[key]) for r in records if is_number(r.get(key)) and is_number(r.get(x_key))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
            ax.set_title(key)
        else:
            ax.set_title(f"{key} (no data)")
        ax.set_xlabel(x_key)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
