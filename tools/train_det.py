"""Fine-tune a Faster/Mask R-CNN with a ResNet-FPN backbone on a COCO-format dataset (single process or torchrun).

Examples:
    # built-in synthetic shapes set: train -> COCO evaluation -> pictures, a few minutes on a laptop CPU
    python tools/train_det.py --backbone resnet50
    # COCO, Mask R-CNN R50-FPN 1x from ImageNet weights, 8 GPUs
    torchrun --nproc_per_node 8 tools/train_det.py --config configs/mask_rcnn_R50_FPN_1x.yaml \
        --pretrained resnet50-0676ba61.pth --train-images coco/train2017 \
        --train-ann coco/annotations/instances_train2017.json --val-images coco/val2017 \
        --val-ann coco/annotations/instances_val2017.json --output-dir output/mask_r50_1x --amp
    # continue a killed run from its newest valid checkpoint
    python tools/train_det.py ... --output-dir output/mask_r50_1x --resume
    # evaluate the run's final model again
    python tools/train_det.py ... --output-dir output/mask_r50_1x --eval-only
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.det_train import run_from_args
from tools.engine.det_flags import add_tta_flags, tta_settings
from tools.engine.errors import USER_ERRORS, report

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (default: configs/shapes.yaml when no dataset is given)")
    p.add_argument("--backbone", help="backbones factory name (e.g. resnet50) or timm:<name>")
    p.add_argument("--detector", choices=["faster_rcnn", "mask_rcnn"])
    p.add_argument("--variant", choices=["v1", "v2"], help="torchvision's v1 or v2 heads")
    p.add_argument("--train-images", help="folder of training images (COCO file_name is relative to it)")
    p.add_argument("--train-ann", help="COCO instances JSON for training")
    p.add_argument("--val-images", help="folder of validation images")
    p.add_argument("--val-ann", help="COCO instances JSON for validation")
    p.add_argument("--pretrained", help="backbone checkpoint: .pth or .safetensors (torchvision/timm ImageNet or "
                                        "tools/train_cls.py model_final) or MSRA's Caffe2 .pkl (R-50.pkl); "
                                        "switches to FrozenBN with stem and c2 frozen")
    p.add_argument("--weights", help="full detector checkpoint (ours, torchvision's COCO files, detectron2's zoo "
                                     ".pkl/.pth) to start from, or to evaluate with --eval-only")
    p.add_argument("--output-dir", help="run folder for checkpoints, metrics and pictures")
    p.add_argument("--iters", type=int, help="iterations (lr steps and warmup keep their fraction of the run)")
    p.add_argument("--batch-size", type=int, help="images per process per iteration")
    p.add_argument("--grad-accum", type=int, help="accumulate the gradients of N batches of --batch-size per "
                   "optimizer step (the same images and weights as one batch N times as large)")
    p.add_argument("--lr", type=float, help="learning rate, used as given (default: linear scaling of base_lr)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="SGD with momentum, or AdamW")
    p.add_argument("--sched", choices=["multistep", "cosine"], help="lr decay after the warmup")
    p.add_argument("--no-weight-decay-norm-bias", action="store_true", default=None,
                   help="no weight decay on norm layers and biases")
    p.add_argument("--lsj", action="store_true", default=None,
                   help="large-scale jitter: train on --max-size squares of images resized by 0.1-2.0")
    p.add_argument("--copy-paste", type=float, metavar="P",
                   help="Mask R-CNN: paste instances between the images of a batch with probability P")
    p.add_argument("--ema", type=float, metavar="DECAY", help="evaluate and save an EMA of the weights (e.g. 0.9998)")
    p.add_argument("--min-size", type=int, help="shorter image side for training and testing (no multi-scale)")
    p.add_argument("--max-size", type=int, help="longer image side cap")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (bf16; fp16 + GradScaler on "
                                                                     "GPUs without bf16)")
    p.add_argument("--channels-last", action="store_true", default=None, help="NHWC memory format")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm across processes")
    p.add_argument("--workers", type=int, help="data loading worker processes per process")
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical runs for the same seed, data and flags (deterministic algorithms)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N iterations (and at the end)")
    p.add_argument("--eval-every", type=int, help="COCO-evaluate every N iterations (and at the end)")
    p.add_argument("--keep-last", type=int, help="keep only the newest K periodic checkpoints")
    p.add_argument("--keep-best", metavar="METRIC", help="keep model_best.* with the highest METRIC, e.g. bbox/AP")
    p.add_argument("--clip-grad", type=float, help="clip the global gradient norm to this value")
    p.add_argument("--max-recoveries", type=int, help="roll-backs to the last good state (at half the lr) on a "
                                                       "NaN/exploding loss before stopping (default 3; 0 stops at once)")
    p.add_argument("--drop-empty", action="store_true", default=None, help="skip training images without objects")
    p.add_argument("--allow-outside-root", action="store_true", default=None,
                   help="accept annotation file_names that are absolute or leave the images folder through '..'")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds another run's files, deleting them")
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights (default: the run's model_final.pth)")
    add_tta_flags(p)  # with --eval-only
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    has_data = any(v is not None for v in (args.train_images, args.train_ann, args.val_images, args.val_ann))
    config = args.config or (DEFAULT_CONFIG if not has_data else None)
    overrides = {
        "backbone": args.backbone,
        "detector": args.detector,
        "variant": args.variant,
        "train_images": args.train_images,
        "train_ann": args.train_ann,
        "val_images": args.val_images,
        "val_ann": args.val_ann,
        "pretrained": args.pretrained,
        "weights": args.weights,
        "output_dir": args.output_dir,
        "iters": args.iters,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "sched": args.sched,
        "no_weight_decay_norm_bias": args.no_weight_decay_norm_bias,
        "ema": args.ema,
        "lsj": args.lsj,
        "copy_paste": args.copy_paste,
        "min_sizes": [args.min_size] if args.min_size is not None else None,
        "max_size": args.max_size,
        "device": args.device,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "sync_bn": args.sync_bn,
        "workers": args.workers,
        "seed": args.seed,
        "deterministic": args.deterministic,
        "checkpoint_every": args.checkpoint_every,
        "eval_every": args.eval_every,
        "keep_last": args.keep_last,
        "keep_best": args.keep_best,
        "clip_grad_norm": args.clip_grad,
        "max_recoveries": args.max_recoveries,
        "drop_empty": args.drop_empty,
        "allow_outside_root": args.allow_outside_root,
    }
    try:
        tta = tta_settings(args)
        if tta is not None and not args.eval_only:
            raise ValueError("--tta needs --eval-only (training evaluates without test-time augmentation)")
        metrics = run_from_args(config, overrides, resume=args.resume, eval_only=args.eval_only,
                                overwrite=args.overwrite, tta=tta)
    except USER_ERRORS as e:
        return report(e)
    for iou_type, values in metrics.items():
        print(f"{iou_type}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
