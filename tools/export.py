"""Export a checkpoint to ONNX or a torch.export program (.pt2): a detector, a classifier, or backbone features.

A detector's file takes one image (float32 3xHxW, RGB in [0, 1], any H and W) and returns boxes, labels, scores
(and masks for Mask R-CNN), as the eager model does for one image. A classifier's takes an Nx3xHxW batch and returns
logits; with --features the outputs are the feature maps by name (p2..p6 of a detector's FPN, or c2..c5 of a
classifier's ResNet). Loading a .pt2 needs `import heads` first (it registers the NMS op).

Examples:
    python tools/export.py --weights output/det/model_final.pth --format onnx --output mask_rcnn.onnx
    python tools/export.py --weights maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --format pt2 --output mask_rcnn.pt2
    python tools/export.py --model resnet50 --weights resnet50-0676ba61.pth --format onnx --output resnet50.onnx
    python tools/export.py --weights output/det/model_final.pth --features --format onnx --output fpn.onnx
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.deploy import export_checkpoint
from tools.engine.det_flags import add_detector_flags, detector_overrides
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint: ours, torchvision's COCO detectors or ImageNet "
                                                     "classifiers (.pth/.pt/.bin/.safetensors)")
    p.add_argument("--format", required=True, help="onnx or pt2")
    p.add_argument("--output", required=True, help="file to write (must not exist)")
    p.add_argument("--model", help="a ResNet name (resnet50, ...): export a classifier instead of a detector")
    p.add_argument("--features", action="store_true",
                   help="export the feature maps: a detector's backbone + FPN, or with --model the ResNet's c2..c5")
    add_detector_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = detector_overrides(args)
    try:
        if args.model is not None:
            if any(v is not None for k, v in overrides.items() if k != "num_classes"):
                raise ValueError("--detector, --variant, --backbone, --min-size and --max-size are for detectors; "
                                 "drop them with --model")
            overrides = {"num_classes": args.num_classes}
        result = export_checkpoint(args.weights, args.output, args.format, model=args.model, features=args.features,
                                   overrides=overrides)
    except USER_ERRORS as e:
        return report(e)
    print(f"{result['kind']} -> {result['output']} ({args.format}, {result['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
