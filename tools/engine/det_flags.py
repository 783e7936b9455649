"""The command-line flags of the tools that run a detector checkpoint: those that replace what the checkpoint says
about its detector, and test-time augmentation.

Kept apart from the modules that use them so that a tool builds its parser without importing torch:
``tools/eval_coco.py --results`` never needs it.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tools.engine.det_tta import TTASettings

__all__ = ["add_detector_flags", "detector_overrides", "add_tta_flags", "tta_settings"]


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
    """The ``overrides`` of ``heads.load_detector`` from the flags of :func:`add_detector_flags` (None = not
    given)."""
    return {"kind": args.detector, "backbone": args.backbone, "variant": args.variant,
            "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size}


def add_tta_flags(parser: argparse.ArgumentParser) -> None:
    """The ``--tta*`` flags of the evaluating tools; read them with :func:`tta_settings`."""
    tta = parser.add_argument_group("test-time augmentation")
    tta.add_argument("--tta", action="store_true",
                     help="run every test size with and without horizontal flip; merge boxes per class by NMS and "
                          "average the masks of the merged boxes")
    tta.add_argument("--tta-sizes", type=int, nargs="*", metavar="PIXELS",
                     help="shorter sides to test at (default: 0.75, 1 and 1.25 x the model's test size)")
    tta.add_argument("--tta-max-size", type=int, metavar="PIXELS",
                     help="longer side cap at every size (default: the model's cap scaled with each size)")
    tta.add_argument("--no-tta-flip", action="store_true", help="sizes only, no flipped views")


def tta_settings(args: argparse.Namespace) -> TTASettings | None:
    """The flags of :func:`add_tta_flags` as settings; None without ``--tta``. ValueError for TTA flags without it."""
    if not args.tta:
        given = [flag for flag, value in (("--tta-sizes", args.tta_sizes), ("--tta-max-size", args.tta_max_size),
                                          ("--no-tta-flip", args.no_tta_flip or None)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'need' if len(given) > 1 else 'needs'} --tta")
        return None
    from tools.engine.det_tta import TTASettings  # imported on use: det_tta imports torch

    sizes = tuple(args.tta_sizes) if args.tta_sizes is not None else None
    return TTASettings(sizes=sizes, flip=not args.no_tta_flip, max_size=args.tta_max_size)
