"""Write a synthetic shapes dataset (COCO detection or ImageNet-layout classification).

Examples:
    python tools/make_shapes.py --kind coco --output-dir data/shapes_coco
    python tools/make_shapes.py --kind imagefolder --output-dir data/shapes_cls --num-train 1000 --num-val 100
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.shapes import make_shapes_coco, make_shapes_imagefolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("coco", "imagefolder"), required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-train", type=int, default=None,
                        help="training images (coco, default 240) or images per class (imagefolder, default 1000)")
    parser.add_argument("--num-val", type=int, default=None,
                        help="validation images (coco, default 60) or images per class (imagefolder, default 100)")
    parser.add_argument("--num-classes", type=int, default=4, help="imagefolder only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.kind == "coco":
        sizes = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val)) if v is not None}
        paths = make_shapes_coco(args.output_dir, seed=args.seed, **sizes)
        for name, path in paths.items():
            print(f"{name}: {path}")
    else:
        sizes = {k: v for k, v in (("train_per_class", args.num_train), ("val_per_class", args.num_val))
                 if v is not None}
        root = make_shapes_imagefolder(args.output_dir, num_classes=args.num_classes, seed=args.seed, **sizes)
        print(f"imagefolder: {root}")


if __name__ == "__main__":
    main()
