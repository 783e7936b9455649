"""Exported models against our eager and compiled paths: export time, parity and speed on this machine.

Runs one model four ways on the same inputs, alternating them run after run: eager (the eval-mode model),
compiled (``backbones.optimize_for_inference(compile=True)``; skipped with --no-compile), onnxruntime (CPU) and
the loaded torch.export program. Prints one markdown row per way (the BENCHMARKS.md rows) and the parity.
Weights are random unless --weights is given: speed does not depend on them, parity is checked on what runs.

Examples:
    python tools/benchmark_export.py --model resnet50 --batch 1 --size 224 --runs 10
    python tools/benchmark_export.py --detector faster_rcnn --size 480x640 --runs 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import backbones
import heads
from heads.export import export, trace
from tools.engine.deploy import match_detections
from tools.engine.errors import USER_ERRORS, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a ResNet classifier (resnet50, ...)")
    what.add_argument("--detector", help="faster_rcnn or mask_rcnn over ResNet-50-FPN")
    p.add_argument("--weights", help="detector checkpoint (default: random weights)")
    p.add_argument("--size", default="224", help="image size: S or HxW (detectors: the image before resizing)")
    p.add_argument("--batch", type=int, default=1, help="classifier batch")
    p.add_argument("--runs", type=int, default=5, help="timed runs per way (after one warm-up)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile way")
    return p.parse_args(argv)


def _size(text: str) -> tuple[int, int]:
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise ValueError(f"--size must be S or HxW, got {text!r}")
    return (parts[0], parts[-1])


def _build(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.model is not None:
        if args.model not in backbones.FACTORIES:
            raise ValueError(f"--model must be one of {list(backbones.FACTORIES)}, got {args.model!r}")
        return backbones.FACTORIES[args.model]().eval()
    if args.weights is not None:
        from heads.spec import load_detector

        return load_detector(args.weights, {"kind": args.detector})[0]
    # Random weights detect nothing at the default score threshold; 0.0 keeps the full post-processing load.
    return heads.build_detector(args.detector, "resnet50", 91, pretrained_backbone=True,
                                box_score_thresh=0.0).eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        height, width = _size(args.size)
        model = _build(args)
    except USER_ERRORS as e:
        return report(e)
    import onnxruntime

    detector = isinstance(model, heads.FasterRCNN)
    x = torch.rand(3, height, width) if detector else torch.rand(args.batch, 3, height, width)
    folder = Path(tempfile.mkdtemp(prefix="resdet_export_"))
    start = time.perf_counter()
    traced = trace(model)
    traced_s = time.perf_counter() - start
    start = time.perf_counter()
    onnx_path = export(traced, folder / "model.onnx")
    onnx_s = time.perf_counter() - start
    pt2_path = export(traced, folder / "model.pt2", "pt2")
    print(f"torch.export trace {traced_s:.1f} s; ONNX conversion and check {onnx_s:.1f} s; "
          f"threads: torch {torch.get_num_threads()}")

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    program = torch.export.load(str(pt2_path)).module()
    ways = {
        "eager": (lambda: model([x])[0]) if detector else (lambda: model(x)),
        "onnxruntime": lambda: dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}))),
        "torch.export": (lambda: program(x)),
    }
    if not args.no_compile:
        compiled = backbones.optimize_for_inference(model, compile=True)
        ways["compiled"] = (lambda: compiled([x])[0]) if detector else (lambda: compiled(x))
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs = {}
    with torch.inference_mode():
        for name, fn in ways.items():
            outputs[name] = fn()  # warm-up (compiles)
        for _ in range(args.runs):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    eager_ms = statistics.median(times["eager"]) * 1e3
    what = (f"{args.detector} R50-FPN, {height}×{width} image" if detector
            else f"{args.model}, {args.batch}×{height}×{width}")
    print("| model | way | median ms | vs eager | parity |")
    print("|---|---|---|---|---|")
    for name in ways:
        ms = statistics.median(times[name]) * 1e3
        parity = _parity(outputs["eager"], outputs[name], detector)
        print(f"| {what} | {name} | {ms:.0f} | {eager_ms / ms:.2f}× | {parity} |")
    return 0


def _parity(reference, other, detector: bool) -> str:
    if detector:
        matched, total = match_detections(reference, other)
        return f"{matched}/{total} detections"
    other = torch.as_tensor(other["logits"] if isinstance(other, dict) else other)
    return f"max rel {float((other - reference).abs().max() / reference.abs().max()):.1e}"


if __name__ == "__main__":
    sys.exit(main())
