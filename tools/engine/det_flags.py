"""The command-line flags with which a tool replaces what a checkpoint says about its detector.

Kept apart from :mod:`tools.engine.det_model` (which re-exports them) so that a tool builds its parser without
importing torch: ``tools/eval_coco.py --results`` never needs it.
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_detector_flags", "detector_overrides"]


def add_detector_flags(parser: argparse.ArgumentParser) -> None:
    """The flags with which a tool replaces what a checkpoint says about its detector (see
    :func:`detector_overrides`); unset ones keep the checkpoint's. Their values are checked with the spec."""
    parser.add_argument("--detector", help="faster_rcnn or mask_rcnn (default: the checkpoint's)")
    parser.add_argument("--backbone", help="the detector's backbone (default: the checkpoint's)")
    parser.add_argument("--variant", help="v1 or v2 heads (default: the checkpoint's)")
    parser.add_argument("--num-classes", type=int, help="classes including background (default: the checkpoint's)")
    parser.add_argument("--min-size", type=int, help="shorter side the detector resizes to (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, help="longer side cap (default: the checkpoint's)")


def detector_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``overrides`` of :func:`tools.engine.det_model.load_detector` from the flags of :func:`add_detector_flags` (None = not given)."""
    return {"kind": args.detector, "backbone": args.backbone, "variant": args.variant,
            "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size}
