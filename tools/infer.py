"""Run a detector on images, folders, globs and videos: per image or frame a PNG with the detections drawn and a
JSON, then detections.json (all of them) and results.json (COCO results). Nothing that exists is written over.

The detector is a checkpoint (--weights) or an exported ONNX file run in onnxruntime (--onnx; --weights as well
gives the class names).

Examples:
    python tools/infer.py --weights output/det/model_final.pth street.jpg dogs.png --output-dir output/infer
    python tools/infer.py --onnx mask_rcnn.onnx --weights output/det/model_final.pth photos/ "clips/*.mp4" \
        --frame-stride 10 --output-dir output/infer
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.engine.det_infer import infer_images
from tools.engine.det_flags import add_detector_flags, detector_overrides
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image or video files, folders (searched recursively) or glob patterns")
    p.add_argument("--weights", help="detector checkpoint (ours, torchvision's COCO files, detectron2's zoo .pkl/.pth)")
    p.add_argument("--onnx", help="run this exported detector (tools/export.py) in onnxruntime instead")
    p.add_argument("--frame-stride", type=int, default=1, help="videos: detect on every n-th frame")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep detections scoring at least this")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--bf16", action="store_true",
                   help="backbone, RPN and RoI heads in bfloat16 where the device has it natively (CPUs with "
                        "AMX/AVX512-BF16, Ampere+ GPUs; float32 elsewhere); box decoding and NMS stay float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone + FPN (the first images pay the compilation)")
    add_detector_flags(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    overrides = detector_overrides(args)
    try:
        records = infer_images(args.weights, args.images, args.output_dir, args.score_thresh, overrides, args.device,
                               bf16=args.bf16, compile=args.compile, onnx=args.onnx, frame_stride=args.frame_stride,
                               progress=not args.no_progress)
    except USER_ERRORS as e:
        return report(e)
    for record in records:
        frame = f" frame {record['frame']}" if "frame" in record else ""
        print(f"{record['image']}{frame}: {len(record['detections'])} detections -> {record['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
