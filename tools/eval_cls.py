"""Top-1/top-5 accuracy of a classifier checkpoint on an ImageFolder val set.

Works with our checkpoints (model_final.pth or any training checkpoint) and with
torchvision/timm ImageNet checkpoints (.pth/.safetensors; name the model with --model).

Examples:
    python tools/eval_cls.py --weights output/shapes/model_final.pth --data ~/.cache/resdet/shapes_imagefolder
    python tools/eval_cls.py --weights resnet50-0676ba61.pth --model resnet50 --data /datasets/imagenet --output r50.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.cls_eval import evaluate_checkpoint
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint: .pth/.pt/.bin or .safetensors")
    p.add_argument("--data", required=True, help="DIR with val/<class>/* (or DIR/<class>/* directly)")
    p.add_argument("--model", help="backbones factory name (default: the one stored in our checkpoints)")
    p.add_argument("--image-size", type=int, help="eval crop size (default: from the checkpoint, else 224)")
    p.add_argument("--crop-pct", type=float,
                   help="resize to image_size / crop_pct, then center crop (default: from the checkpoint, else 0.875)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], help="default: from the checkpoint, else bilinear")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in our checkpoint")
    p.add_argument("--output", help="also write the results as JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = evaluate_checkpoint(
            args.weights,
            args.data,
            model=args.model,
            image_size=args.image_size,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            use_ema=args.ema,
            crop_pct=args.crop_pct,
            interpolation=args.interpolation,
        )
        summary = {"top1": results["top1"], "top5": results["top5"]}
        print(f"top1 {summary['top1']:.4f} top5 {summary['top5']:.4f} ({results['num_images']} images)")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    except USER_ERRORS as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
