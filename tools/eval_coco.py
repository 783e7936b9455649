"""COCO evaluation (pycocotools) of a detector checkpoint, or of an existing results file.

Examples:
    # a checkpoint (ours rebuilds itself from its metadata; flags override it)
    python tools/eval_coco.py --weights output/det/model_final.pth --val-images coco/val2017 \
        --val-ann coco/annotations/instances_val2017.json --output-dir output/eval
    # torchvision's COCO detector
    python tools/eval_coco.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --detector mask_rcnn ...
    # test-time augmentation: flip x three sizes (0.75, 1, 1.25 x the model's), merged as detectron2 does
    python tools/eval_coco.py --weights output/det/model_final.pth ... --tta [--tta-sizes 600 800 1000]
    # an existing results file (bbox, plus segm when the results carry segmentations)
    python tools/eval_coco.py --results coco_results.json --val-ann instances_val2017.json --output-dir output/eval

Both print the standard 12-number table per IoU type and write OUTPUT_DIR/metrics.json (the 12 numbers and
the AP of each category) and OUTPUT_DIR/pr_curves.png; the checkpoint mode also writes
OUTPUT_DIR/coco_results.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.det_eval import evaluate_checkpoint, score_results_file
from tools.engine.det_model import add_detector_flags, detector_overrides
from tools.engine.det_tta import TTASettings
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="detector checkpoint (.pth or .safetensors) to run on --val-images")
    what.add_argument("--results", help="COCO results JSON to score")
    p.add_argument("--val-ann", required=True, help="COCO instances JSON (ground truth)")
    p.add_argument("--val-images", help="image folder (with --weights)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--bf16", action="store_true",
                   help="backbone, RPN and RoI heads in bfloat16 where the device has it natively (CPUs with "
                        "AMX/AVX512-BF16, Ampere+ GPUs; float32 elsewhere); box decoding and NMS stay float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone + FPN (the first images pay the compilation)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept annotation file_names that are absolute or leave the images folder through '..'")
    tta = p.add_argument_group("test-time augmentation (with --weights)")
    tta.add_argument("--tta", action="store_true",
                     help="run every test size with and without horizontal flip; merge boxes per class by NMS and "
                          "average the masks of the merged boxes")
    tta.add_argument("--tta-sizes", type=int, nargs="*", metavar="PIXELS",
                     help="shorter sides to test at (default: 0.75, 1 and 1.25 x the model's test size)")
    tta.add_argument("--tta-max-size", type=int, metavar="PIXELS",
                     help="longer side cap at every size (default: the model's cap scaled with each size)")
    tta.add_argument("--no-tta-flip", action="store_true", help="sizes only, no flipped views")
    add_detector_flags(p)
    return p.parse_args(argv)


def tta_settings(args: argparse.Namespace) -> TTASettings | None:
    """The ``--tta*`` flags as settings; None without ``--tta``. Raises ValueError for TTA flags without it."""
    if not args.tta:
        given = [flag for flag, value in (("--tta-sizes", args.tta_sizes), ("--tta-max-size", args.tta_max_size),
                                          ("--no-tta-flip", args.no_tta_flip or None)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'need' if len(given) > 1 else 'needs'} --tta")
        return None
    if args.results is not None:
        raise ValueError("--tta needs --weights (a results file is scored as it is)")
    sizes = tuple(args.tta_sizes) if args.tta_sizes is not None else None
    return TTASettings(sizes=sizes, flip=not args.no_tta_flip, max_size=args.tta_max_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        tta = tta_settings(args)
        if args.results is not None:
            score_results_file(args.results, args.val_ann, args.output_dir, args.allow_outside_root)
        else:
            if args.val_images is None:
                raise ValueError("--weights needs --val-images")
            evaluate_checkpoint(args.weights, args.val_images, args.val_ann, args.output_dir, detector_overrides(args),
                                device=args.device, batch_size=args.batch_size, workers=args.workers,
                                allow_outside_root=args.allow_outside_root, bf16=args.bf16,
                                compile=args.compile, tta=tta)
    except USER_ERRORS as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
