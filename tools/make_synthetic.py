"""Write a synthetic tune or measure set (COCO detection or ImageFolder classification).

The "tune" sets are for tuning training defaults, the "measure" sets for measuring them on
data nobody tuned on; both differ from the embedded shapes set (tools/engine/synthetic_sets.py).

Examples:
    python tools/make_synthetic.py det --style measure --out data/det_measure
    python tools/make_synthetic.py det --style tune --out data/det_tune --num-train 300 --num-val 100 --seed 1
    python tools/make_synthetic.py cls --style measure --out data/cls_measure --num-train 200 --num-val 50
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.synthetic_sets import STYLES, make_cls_set, make_det_set


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("det", "cls"))
    parser.add_argument("--style", choices=STYLES, required=True, help="tune: to tune on; measure: held out")
    parser.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    parser.add_argument("--num-train", type=int, default=None,
                        help="training images (det, default 300) or images per class (cls, default 200)")
    parser.add_argument("--num-val", type=int, default=None,
                        help="validation images (det, default 100) or images per class (cls, default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs="+", default=None,
                        help="det: MIN MAX image side (default 224 400); cls: the square side (default 64)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    if args.kind == "det":
        kwargs = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val)) if v is not None}
        if args.image_size is not None:
            if len(args.image_size) != 2:
                raise SystemExit(f"det --image-size takes MIN MAX, got {args.image_size}")
            kwargs["image_size"] = tuple(args.image_size)
        paths = make_det_set(args.out, args.style, seed=args.seed, **kwargs)
    else:
        kwargs = {k: v for k, v in (("num_train_per_class", args.num_train), ("num_val_per_class", args.num_val))
                  if v is not None}
        if args.image_size is not None:
            if len(args.image_size) != 1:
                raise SystemExit(f"cls --image-size takes one side, got {args.image_size}")
            kwargs["image_size"] = args.image_size[0]
        root = make_cls_set(args.out, args.style, seed=args.seed, **kwargs)
        paths = {"train": root / "train", "val": root / "val"}
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
