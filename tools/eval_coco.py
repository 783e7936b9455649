"""COCO evaluation (pycocotools' metrics, computed by faster-coco-eval) of a detector checkpoint, or of a results file.

Examples:
    # a checkpoint (ours rebuilds itself from its metadata; flags override it)
    python tools/eval_coco.py --weights output/det/model_final.pth --val-images coco/val2017 \
        --val-ann coco/annotations/instances_val2017.json --output-dir output/eval
    # torchvision's COCO detector
    python tools/eval_coco.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --detector mask_rcnn ...
    # test-time augmentation: flip x three sizes (0.75, 1, 1.25 x the model's), merged as detectron2 does
    python tools/eval_coco.py --weights output/det/model_final.pth ... --tta [--tta-sizes 600 800 1000]
    # an existing results file (bbox when the results carry boxes, segm when they carry segmentations)
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

# --results imports no torch (seconds of a short run): the checkpoint path's modules are imported where used.
from tools.engine.coco_eval import score_results_file
from tools.engine.det_flags import add_detector_flags, add_tta_flags, detector_overrides, tta_settings
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="detector checkpoint to run on --val-images (ours, torchvision's COCO files, "
                                        "detectron2's zoo .pkl/.pth)")
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
    add_tta_flags(p)
    add_detector_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.tta and args.results is not None:
            raise ValueError("--tta needs --weights (a results file is scored as it is)")
        tta = tta_settings(args)
        if args.results is not None:
            score_results_file(args.results, args.val_ann, args.output_dir, args.allow_outside_root)
        else:
            if args.val_images is None:
                raise ValueError("--weights needs --val-images")
            from tools.engine.det_eval import evaluate_checkpoint

            evaluate_checkpoint(args.weights, args.val_images, args.val_ann, args.output_dir, detector_overrides(args),
                                device=args.device, batch_size=args.batch_size, workers=args.workers,
                                allow_outside_root=args.allow_outside_root, bf16=args.bf16,
                                compile=args.compile, tta=tta)
    except USER_ERRORS as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
