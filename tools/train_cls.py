"""Train a ResNet classifier on an ImageFolder dataset (ImageNet layout), single process or torchrun.

Examples:
    # built-in synthetic shapes set, about two minutes on a laptop CPU
    python tools/train_cls.py --model resnet18 --config configs/cls/shapes.yaml --device cpu
    # ImageNet, torchvision V1 recipe, 8 GPUs
    torchrun --nproc_per_node 8 tools/train_cls.py --model resnet50 --config configs/cls/resnet50_v1.yaml \
        --data /datasets/imagenet --output-dir output/r50_v1 --amp --channels-last
    # continue a killed run from its newest valid checkpoint
    python tools/train_cls.py ... --output-dir output/r50_v1 --resume
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.cls_train import run_from_args
from tools.engine.errors import USER_ERRORS, report

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cls" / "shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="backbones factory name, e.g. resnet50 (overrides the config)")
    p.add_argument("--config", help="recipe YAML (default: configs/cls/shapes.yaml when --data is not given)")
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: built-in shapes set)")
    p.add_argument("--epochs", type=int, help="epochs (lr milestones and warmup keep their fraction of the run)")
    p.add_argument("--batch-size", type=int, help="batch size per process")
    p.add_argument("--lr", type=float, help="learning rate, used as given (default: linear scaling of base_lr)")
    p.add_argument("--image-size", type=int, help="train and eval resolution")
    p.add_argument("--train-image-size", type=int, help="train resolution when it differs from --image-size")
    p.add_argument("--output-dir", help="run folder for checkpoints, metrics and curves")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16; fp16 + GradScaler on GPUs without bf16)")
    p.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    p.add_argument("--workers", type=int, help="data loading worker processes per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical runs for the same seed, data and flags (deterministic algorithms)")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds another run's files, deleting them")
    p.add_argument("--keep-last", type=int, help="keep only the newest K periodic checkpoints")
    p.add_argument("--checkpoint-period", type=int, help="also checkpoint every N iterations")
    p.add_argument("--clip-grad", type=float, help="clip the global gradient norm to this value")
    p.add_argument("--max-recoveries", type=int, help="roll-backs to the last good state (at half the lr) on a "
                                                       "NaN/exploding loss before stopping (default 3; 0 stops at once)")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes")
    p.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="skip unreadable images (counted in the log) instead of stopping at the first one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = args.config or (DEFAULT_CONFIG if args.data is None else None)
    overrides = {
        "model": args.model,
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "image_size": args.image_size,
        "train_image_size": args.train_image_size or args.image_size,
        "output_dir": args.output_dir,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "workers": args.workers,
        "seed": args.seed,
        "deterministic": args.deterministic,
        "keep_last": args.keep_last,
        "checkpoint_period": args.checkpoint_period,
        "clip_grad_norm": args.clip_grad,
        "max_recoveries": args.max_recoveries,
        "sync_bn": args.sync_bn,
        "skip_bad_images": args.skip_bad_images,
    }
    try:
        results = run_from_args(config, overrides, resume=args.resume, overwrite=args.overwrite)
    except USER_ERRORS as e:
        return report(e)
    print(" ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
