"""Curves as pictures: training curves from ``metrics.jsonl`` (written by :class:`tools.engine.logger.MetricLogger`)
and COCO precision-recall curves from an evaluation (:class:`tools.engine.coco_eval.CocoEvaluation`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tools.engine.values import is_number  # noqa: E402

if TYPE_CHECKING:
    from tools.engine.coco_eval import CocoEvaluation

__all__ = ["read_metrics", "plot_curves", "plot_pr_curves"]

# Per-class curves beyond this many classes are drawn without a legend (it would hide the plot).
_MAX_LEGEND_CLASSES = 20

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


def _mean_precision(precision: np.ndarray) -> np.ndarray | None:
    """Mean over the leading axes of [..., R] precision, ignoring -1 (no ground truth); None if all are -1."""
    values = np.where(precision > -1, precision, np.nan).reshape(-1, precision.shape[-1])
    keep = ~np.isnan(values).all(axis=1)
    return values[keep].mean(axis=0) if keep.any() else None


def plot_pr_curves(evaluation: CocoEvaluation, out_png: str | Path) -> Path:
    """Draw COCO precision-recall curves, one row per IoU type of ``evaluation``, into ``out_png``.

    Left: all classes averaged, at IoU 0.50, at 0.75 and averaged over 0.50:0.95. Right: one curve per class,
    averaged over IoU 0.50:0.95, so that the area under each is the class's AP (given in the legend). All at
    area "all" and 100 detections per image; classes without ground truth are left out.
    """
    iou_types = list(evaluation.precision)
    if not iou_types:
        raise ValueError("plot_pr_curves needs an evaluation of at least one IoU type")
    recall = np.asarray(evaluation.recall_thresholds)
    ious = np.asarray(evaluation.iou_thresholds)
    fig, axes = plt.subplots(len(iou_types), 2, figsize=(11, 4.2 * len(iou_types)), squeeze=False)
    for (ax_all, ax_cls), iou_type in zip(axes, iou_types):
        precision = evaluation.precision[iou_type][:, :, :, 0, -1]  # [T, R, K]
        average = evaluation.metrics.get(iou_type, {}).get("AP")
        for label, rows in (("IoU 0.50", np.isclose(ious, 0.5)), ("IoU 0.75", np.isclose(ious, 0.75)),
                            ("IoU 0.50:0.95", np.ones(len(ious), dtype=bool))):
            curve = _mean_precision(precision[rows].transpose(0, 2, 1))
            if curve is not None:
                ax_all.plot(recall, curve, label=f"{label} (AP {np.mean(curve):.3f})")
        ax_all.set_title(f"{iou_type}: all classes" + (f", AP {average:.3f}" if average is not None else ""))
        per_class = evaluation.per_category.get(iou_type, {})
        drawn = 0
        for k, name in enumerate(evaluation.category_names):
            curve = _mean_precision(precision[:, :, k])
            if curve is not None:
                ap = per_class.get(name)
                ax_cls.plot(recall, curve, linewidth=1, label=f"{name} ({ap:.3f})" if ap is not None else name)
                drawn += 1
        ax_cls.set_title(f"{iou_type}: per class, IoU 0.50:0.95 ({drawn} classes)")
        for ax in (ax_all, ax_cls):
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.grid(True, alpha=0.3)
        if ax_all.lines:
            ax_all.legend(loc="lower left", fontsize=8)
        if 0 < drawn <= _MAX_LEGEND_CLASSES:
            ax_cls.legend(loc="lower left", fontsize=7)
    # Fixed margins: tight_layout measures every text and takes longer than the drawing.
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / fig.get_figheight(), top=1 - 0.35 / fig.get_figheight(),
                        wspace=0.2, hspace=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
