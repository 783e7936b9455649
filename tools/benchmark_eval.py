"""COCO evaluation speed: ``tools/eval_coco.py --results`` against pycocotools' COCOeval on the same files.

Generates a COCO-like set (80 categories with COCO's id gaps, 640×480 and 480×640 images, polygon objects of
every size, some crowd regions and empty images) and a results file of N detections per image (jittered ground
truth, wrong classes, background boxes; random and tied scores). Then times, in this process and alternating
run after run:

* ``eval_coco``: ``tools/eval_coco.py --results RESULTS --val-ann GT --output-dir DIR`` end to end (reading and
  checking both files, evaluation, the printed table, ``metrics.json`` and ``pr_curves.png``);
* ``pycocotools``: ``COCO(GT)``, the results read and handed to ``loadRes`` (without the boxes for ``segm``, as
  detectron2 does), ``COCOeval`` evaluate, accumulate and summarize.

Both score ``bbox``, and ``segm`` too for the mask case (a smaller set whose results carry RLE masks). Prints the
median seconds of each side, the ratio and the largest difference between the two sides' 12 numbers per IoU type.

Examples:
    python tools/benchmark_eval.py                                  # 2,000 images x 100 boxes; 200 x 100 masks
    python tools/benchmark_eval.py --images 500 --segm-images 0 --runs 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tools import eval_coco
from tools.engine.coco_eval import METRIC_NAMES

# COCO's 80 category ids: 1..90 with gaps.
COCO_CAT_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images of the box case")
    p.add_argument("--segm-images", type=int, default=200, help="images of the mask case (0: skip it)")
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side and case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="folder for the generated files (default: a new temporary folder)")
    return p.parse_args(argv)


def _polygons(rng: np.random.Generator, cx: np.ndarray, cy: np.ndarray, rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Star-convex blobs of 12 vertices around (cx, cy) with radii (rx, ry): [len(cx), 12, 2]."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, (len(cx), 12)), axis=1)
    radius = rng.uniform(0.7, 1.0, (len(cx), 12))
    return np.stack([cx[:, None] + rx[:, None] * radius * np.cos(angles),
                     cy[:, None] + ry[:, None] * radius * np.sin(angles)], axis=2)


def _clip(points: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.minimum(np.maximum(points, 0), [width, height])


def _detections(rng: np.random.Generator, image_id: int, width: int, height: int,
                objects: list[tuple[dict, np.ndarray]], count: int, masks: bool) -> list[dict]:
    """``count`` detections on one image: up to 3 per object (moved and scaled, 15 % with a wrong class, scores
    leaning high), then background blobs (scores leaning low); a fifth of the scores rounded to 2 digits (ties)."""
    true = min(3 * len(objects), count)
    which = np.arange(true) % max(len(objects), 1)
    if true:
        points = np.stack([objects[k][1] for k in which])
        sizes = np.array([objects[k][0]["bbox"][2:] for k in which])
        centres = points.mean(axis=1, keepdims=True)
        shifts = rng.normal(0, 0.08, (true, 1, 2)) * sizes[:, None, :]
        points = (points - centres) * rng.uniform(0.85, 1.15, (true, 1, 1)) + centres + shifts
    else:
        points = np.zeros((0, 12, 2))
    extents = np.exp(rng.uniform(np.log(4), np.log(0.5 * min(width, height)), count - true))
    background = _polygons(rng, rng.uniform(0, width, count - true), rng.uniform(0, height, count - true),
                           extents, extents)
    polygons = _clip(np.concatenate([points, background]), width, height)
    categories = rng.choice(COCO_CAT_IDS, count)
    right = rng.random(true) < 0.85
    categories[:true][right] = [objects[k][0]["category_id"] for k in which[right]]
    scores = np.where(np.arange(count) < true, rng.uniform(0.2, 1.0, count), rng.uniform(0.0, 0.8, count))
    scores = np.where(rng.random(count) < 0.2, scores.round(2), scores)
    low, high = polygons.min(axis=1), polygons.max(axis=1)
    boxes = np.concatenate([low, high - low], axis=1)
    entries = [{"image_id": image_id, "category_id": category, "bbox": box, "score": score}
               for category, box, score in zip(categories.tolist(), boxes.tolist(), scores.tolist())]
    if masks and entries:
        # frPyObjects takes each polygon as its own object: one RLE per detection, in one call.
        rles = mask_utils.frPyObjects(polygons.reshape(count, -1).tolist(), height, width)
        for entry, rle in zip(entries, rles):
            entry["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return entries


def make_eval_set(folder: str | Path, num_images: int, dets_per_image: int, *, masks: bool,
                  seed: int = 0) -> tuple[Path, Path]:
    """Write ``instances.json`` (ground truth) and ``results.json`` (detections, with RLE masks when ``masks``)
    into ``folder``; returns both paths. Deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations, results = [], [], []
    for index in range(num_images):
        image_id = 3 * index + 1  # gaps between ids
        width, height = (640, 480) if rng.random() < 0.7 else (480, 640)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = 0 if rng.random() < 0.02 else int(rng.integers(1, 15))
        objects = []
        for _ in range(count):
            extent = float(np.exp(rng.uniform(np.log(6), np.log(0.45 * min(width, height)))))  # small to large
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            points = _clip(_polygons(rng, np.array([cx]), np.array([cy]), np.array([extent]),
                                     np.array([extent * rng.uniform(0.6, 1.4)]))[0], width, height)
            rle = mask_utils.frPyObjects([points.ravel().tolist()], height, width)[0]
            area = float(mask_utils.area(rle))
            if area < 4:
                continue
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            crowd = rng.random() < 0.01
            annotation = {"id": len(annotations) + 1, "image_id": image_id,
                          "category_id": int(rng.choice(COCO_CAT_IDS)), "bbox": [x, y, w, h], "area": area,
                          "iscrowd": int(crowd)}
            if crowd:
                counts = rle["counts"].decode("ascii")
                annotation["segmentation"] = {"size": [height, width], "counts": counts}
            else:
                annotation["segmentation"] = [np.round(points.ravel(), 2).tolist()]
                objects.append((annotation, points))
            annotations.append(annotation)
        results.extend(_detections(rng, image_id, width, height, objects, dets_per_image, masks))
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_CAT_IDS]
    gt_path, results_path = folder / "instances.json", folder / "results.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    results_path.write_text(json.dumps(results))
    return gt_path, results_path


def run_eval_coco(gt_path: Path, results_path: Path, out: Path) -> dict[str, list[float]]:
    """``tools/eval_coco.py --results`` in this process, its printed table swallowed; the 12 numbers per IoU type
    from its ``metrics.json``."""
    with contextlib.redirect_stdout(io.StringIO()):
        rc = eval_coco.main(["--results", str(results_path), "--val-ann", str(gt_path), "--output-dir", str(out)])
    if rc != 0:
        raise RuntimeError(f"eval_coco.py failed with exit code {rc}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {t: [metrics[t][name] for name in METRIC_NAMES] for t in ("bbox", "segm") if t in metrics}


def run_pycocotools(gt_path: Path, results_path: Path, iou_types: tuple[str, ...]) -> dict[str, list[float]]:
    """pycocotools as detectron2's COCOEvaluator runs it: the 12 numbers per IoU type. For masks the boxes are
    dropped, so that the mask area decides small/medium/large (as in ``tools.engine.coco_eval``)."""
    stats = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        results = json.loads(results_path.read_text())
        for iou_type in iou_types:
            drop = "bbox" if iou_type == "segm" else "segmentation"
            detections = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            evaluator = COCOeval(gt, detections, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats[iou_type] = [float(v) for v in evaluator.stats]
    return stats


def _max_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    if set(a) != set(b):
        raise RuntimeError(f"the two sides scored different IoU types: {sorted(a)} and {sorted(b)}")
    return max(float(np.abs(np.subtract(a[t], b[t])).max()) for t in a)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="resdet_eval_bench_"))
    cases = [("bbox", args.images, False)] + ([("bbox+segm", args.segm_images, True)] if args.segm_images else [])
    rows = []
    for name, num_images, masks in cases:
        start = time.perf_counter()
        gt_path, results_path = make_eval_set(root / name, num_images, args.dets, masks=masks, seed=args.seed)
        print(f"{name}: {num_images} images x {args.dets} detections generated in {time.perf_counter() - start:.1f} s "
              f"({results_path.stat().st_size / 1e6:.0f} MB of results)", flush=True)
        iou_types = ("bbox", "segm") if masks else ("bbox",)
        times: dict[str, list[float]] = {"eval_coco": [], "pycocotools": []}
        numbers = {}
        for _ in range(args.runs):
            for side in times:
                start = time.perf_counter()
                if side == "eval_coco":
                    numbers[side] = run_eval_coco(gt_path, results_path, root / name / "out")
                else:
                    numbers[side] = run_pycocotools(gt_path, results_path, iou_types)
                times[side].append(time.perf_counter() - start)
                print(f"  {side}: {times[side][-1]:.2f} s", flush=True)
        ours, theirs = statistics.median(times["eval_coco"]), statistics.median(times["pycocotools"])
        rows.append((name, num_images, ours, theirs, _max_difference(numbers["eval_coco"], numbers["pycocotools"])))
    print("| case | images × detections | eval_coco.py --results s | pycocotools s | speed-up | max \\|Δ\\| of the "
          "12 numbers |")
    print("|---|---|---|---|---|---|")
    for name, num_images, ours, theirs, difference in rows:
        print(f"| {name} | {num_images:,} × {args.dets} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}× | "
              f"{difference:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
