"""COCO evaluation (pycocotools) of a detector checkpoint, or of an existing results file.

Examples:
    # a checkpoint (ours rebuilds itself from its metadata; flags override it)
    python tools/eval_coco.py --weights output/det/model_final.pth --val-images coco/val2017 \
        --val-ann coco/annotations/instances_val2017.json --output-dir output/eval
    # torchvision's COCO detector
    python tools/eval_coco.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --detector mask_rcnn ...
    # an existing results file (bbox, plus segm when the results carry segmentations)
    python tools/eval_coco.py --results coco_results.json --val-ann instances_val2017.json --output-dir output/eval

Both print the standard 12-number table per IoU type and write OUTPUT_DIR/metrics.json; the
checkpoint mode also writes OUTPUT_DIR/coco_results.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.det_eval import evaluate_checkpoint, score_results_file
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="detector checkpoint (.pth or .safetensors) to run on --val-images")
    what.add_argument("--results", help="COCO results JSON to score")
    p.add_argument("--val-ann", required=True, help="COCO instances JSON (ground truth)")
    p.add_argument("--val-images", help="image folder (with --weights)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--detector", choices=["faster_rcnn", "mask_rcnn"], help="override the checkpoint's")
    p.add_argument("--backbone", help="override the checkpoint's backbone")
    p.add_argument("--variant", choices=["v1", "v2"], help="override the checkpoint's")
    p.add_argument("--num-classes", type=int, help="override the checkpoint's (background included)")
    p.add_argument("--min-size", type=int, help="test-time shorter side (default: the checkpoint's)")
    p.add_argument("--max-size", type=int, help="test-time longer side cap (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--bf16", action="store_true",
                   help="run the backbone in bfloat16 where the device supports it (CPUs with AMX/AVX512-BF16, "
                        "Ampere+ GPUs); detections move slightly (backbones.BF16_TOLERANCE)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone + FPN (the first images pay the compilation)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept annotation file_names that are absolute or leave the images folder through '..'")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.results is not None:
            score_results_file(args.results, args.val_ann, args.output_dir, args.allow_outside_root)
        else:
            if args.val_images is None:
                raise ValueError("--weights needs --val-images")
            overrides = {"kind": args.detector, "backbone": args.backbone, "variant": args.variant,
                         "num_classes": args.num_classes, "min_size": args.min_size, "max_size": args.max_size}
            evaluate_checkpoint(args.weights, args.val_images, args.val_ann, args.output_dir, overrides,
                                device=args.device, batch_size=args.batch_size, workers=args.workers,
                                allow_outside_root=args.allow_outside_root, bf16=args.bf16,
                                compile=args.compile)
    except USER_ERRORS as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
