"""Plain torchvision training loops, written the way a torchvision user writes them, as quality references.

They use none of this project's models or engine on purpose: a recipe of ours is judged
against what torchvision gives with the same data and budget.

* ``det``: torchvision's MaskRCNN (or FasterRCNN) on a ResNet-18 FPN from scratch with
  trainable BatchNorm, plain SGD (momentum 0.9, weight decay 1e-4) at a constant learning
  rate without warmup, batch 4, random horizontal flip; the COCO set is read with
  pycocotools (polygons and RLE alike; crowd regions are left out of training, images
  without annotations are kept); then pycocotools COCOeval on the val set.
* ``cls``: torchvision's resnet18 from scratch with AdamW (lr 1e-3, weight decay 0.05),
  a cosine schedule over all iterations, RandomResizedCrop(scale=(0.35, 1)) and flip,
  batch 32, on an ImageFolder set; top-1 on ``val`` after every epoch.

Both write a JSON report (see :func:`run_det` and :func:`run_cls`).

Examples:
    python tools/reference_loops.py det --train-images data/det/train \\
        --train-ann data/det/annotations/instances_train.json --val-images data/det/val \\
        --val-ann data/det/annotations/instances_val.json --iters 300 --threads 1 --json ref_det.json
    python tools/reference_loops.py cls --data data/cls --epochs 8 --threads 1 --json ref_cls.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.transforms import functional as F

DETECTORS: tuple[str, ...] = ("mask_rcnn", "faster_rcnn")
_WARMUP_ITERS_NOT_TIMED = 5
_LOSS_WINDOW = 20


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

class CocoInstances(Dataset):
    """A COCO instances set as torchvision detection samples ``(image, {"boxes", "labels", "masks", "image_id"})``.

    Labels are contiguous ``1..K`` in sorted category-id order (``label_to_cat_id`` maps
    back). Crowd annotations and boxes under one pixel wide or high are left out.
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, train: bool, with_masks: bool = True) -> None:
        self.images_dir = Path(images_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.ids = sorted(self.coco.imgs)
        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat_id = {label: c for c, label in self.cat_id_to_label.items()}
        self.train = train
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = F.to_tensor(Image.open(self.images_dir / info["file_name"]).convert("RGB"))
        height, width = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns[image_id]
                if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.with_masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, height, width))
            target["masks"] = torch.as_tensor(masks, dtype=torch.uint8)
        if self.train and torch.rand(1).item() < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def collate_list(batch: list[tuple[torch.Tensor, dict]]) -> tuple[tuple, tuple]:
    """Images and targets as tuples (images differ in size)."""
    return tuple(zip(*batch))


def build_detector(detector: str, num_classes: int, min_size: int = 224, max_size: int = 320,
                   box_batch_size_per_image: int = 128, options: dict[str, Any] | None = None) -> nn.Module:
    """torchvision's Mask/Faster R-CNN on a from-scratch ResNet-18 FPN with trainable BatchNorm.

    Args:
        num_classes: object classes, without background.
        options: further keyword arguments of torchvision's MaskRCNN/FasterRCNN
            (e.g. ``rpn_post_nms_top_n_test``, ``box_detections_per_img``).
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {list(DETECTORS)}, got {detector!r}")
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d)
    cls = MaskRCNN if detector == "mask_rcnn" else FasterRCNN
    return cls(backbone, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
               box_batch_size_per_image=box_batch_size_per_image, **(options or {}))


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: CocoInstances, batch_size: int = 4) -> dict[str, float | None]:
    """pycocotools COCOeval on ``dataset``: ``{"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"}`` (segm None
    without masks; 0.0 when nothing is detected)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_list)
    box_results, segm_results = [], []
    has_masks = isinstance(model, MaskRCNN)
    for images, targets in loader:
        for out, target in zip(model(list(images)), targets):
            cat_ids = [dataset.label_to_cat_id[int(label)] for label in out["labels"]]
            scores = out["scores"].tolist()
            for (x1, y1, x2, y2), cat_id, score in zip(out["boxes"].tolist(), cat_ids, scores):
                box_results.append({"image_id": target["image_id"], "category_id": cat_id,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
            if has_masks and len(scores):
                binary = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                for rle, cat_id, score in zip(rles, cat_ids, scores):
                    rle["counts"] = rle["counts"].decode("ascii")
                    segm_results.append({"image_id": target["image_id"], "category_id": cat_id,
                                         "segmentation": rle, "score": score})
    metrics: dict[str, float | None] = {}
    for iou_type, results in (("bbox", box_results), ("segm", segm_results)):
        if iou_type == "segm" and not has_masks:
            metrics["segm_AP"] = metrics["segm_AP50"] = None
            continue
        if not results:
            metrics[f"{iou_type}_AP"] = metrics[f"{iou_type}_AP50"] = 0.0
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval = COCOeval(dataset.coco, dataset.coco.loadRes(results), iou_type)
            coco_eval.evaluate()
            coco_eval.accumulate()
        print(f"COCO {iou_type}:", flush=True)
        coco_eval.summarize()
        metrics[f"{iou_type}_AP"] = float(coco_eval.stats[0])
        metrics[f"{iou_type}_AP50"] = float(coco_eval.stats[1])
    return metrics


def _batches(loader: DataLoader):
    while True:
        yield from loader


def run_det(train_images: str | Path, train_ann: str | Path, val_images: str | Path, val_ann: str | Path, *,
            detector: str = "mask_rcnn", iters: int = 300, lr: float = 0.01, batch_size: int = 4,
            min_size: int = 224, max_size: int = 320, box_batch_size_per_image: int = 128,
            detector_options: dict[str, Any] | None = None, workers: int = 0, seed: int = 0,
            warmup_iters: int = 0, log_every: int = 20) -> dict[str, Any]:
    """Train torchvision's detector for ``iters`` iterations, then evaluate on the val set.

    ``warmup_iters``: linear warmup from lr/1000, as torchvision's detection reference script does in its
    first epoch (there ``min(1000, iterations per epoch - 1)``); 0 = constant lr from the first iteration.

    ``detector_options`` are handed to torchvision's constructor (see :func:`build_detector`).

    Returns:
        ``{"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "seconds_per_iter"`` (median over the
        iterations after the first 5), ``"train_s", "eval_s", "total_s", "final_loss"`` (mean over
        the last 20 iterations), ``"diverged"`` (a non-finite loss stopped training; the APs are
        then 0), and the settings.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    with_masks = detector == "mask_rcnn"
    train_set = CocoInstances(train_images, train_ann, train=True, with_masks=with_masks)
    val_set = CocoInstances(val_images, val_ann, train=False, with_masks=with_masks)
    model = build_detector(detector, len(train_set.cat_id_to_label), min_size, max_size, box_batch_size_per_image,
                           detector_options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_iters) \
        if warmup_iters > 0 else None
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_list, drop_last=len(train_set) >= batch_size,
                        generator=torch.Generator().manual_seed(seed))

    model.train()
    losses, times, diverged = [], [], False
    batches = _batches(loader)
    for iteration in range(iters):
        tick = time.perf_counter()
        images, targets = next(batches)
        loss_dict = model(list(images), list(targets))
        loss = sum(loss_dict.values())
        if not math.isfinite(loss.item()):
            diverged = True
            print(f"iter {iteration}: non-finite loss "
                  f"{ {k: round(v.item(), 4) for k, v in loss_dict.items()} }; stopping", flush=True)
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if warmup is not None:
            warmup.step()
        times.append(time.perf_counter() - tick)
        losses.append(loss.item())
        if iteration % log_every == 0 or iteration == iters - 1:
            print(f"iter {iteration}/{iters} loss {loss.item():.4f} "
                  f"({', '.join(f'{k} {v.item():.3f}' for k, v in loss_dict.items())}) {times[-1]:.2f}s", flush=True)
    train_s = time.perf_counter() - start

    metrics: dict[str, float | None]
    if diverged:
        metrics = {"bbox_AP": 0.0, "bbox_AP50": 0.0, "segm_AP": 0.0 if with_masks else None,
                   "segm_AP50": 0.0 if with_masks else None}
    else:
        metrics = evaluate_detector(model, val_set, batch_size)
    timed = times[_WARMUP_ITERS_NOT_TIMED:] or times
    total_s = time.perf_counter() - start
    return {
        **metrics,
        "seconds_per_iter": statistics.median(timed) if timed else None,
        "train_s": train_s, "eval_s": total_s - train_s, "total_s": total_s,
        "final_loss": statistics.fmean(losses[-_LOSS_WINDOW:]) if losses else None,
        "diverged": diverged, "iters_done": len(losses),
        "settings": {"detector": detector, "iters": iters, "lr": lr, "warmup_iters": warmup_iters,
                     "batch_size": batch_size,
                     "min_size": min_size, "max_size": max_size,
                     "box_batch_size_per_image": box_batch_size_per_image,
                     "detector_options": detector_options or {}, "seed": seed,
                     "threads": torch.get_num_threads(), "workers": workers,
                     "train_images": len(train_set), "val_images": len(val_set),
                     "torch": torch.__version__},
    }


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@torch.no_grad()
def _top1(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def run_cls(data: str | Path, *, epochs: int = 8, lr: float = 1e-3, weight_decay: float = 0.05,
            batch_size: int = 32, image_size: int | None = None, workers: int = 0, seed: int = 0) -> dict[str, Any]:
    """Train torchvision's resnet18 from scratch on ``data/train`` and measure top-1 on ``data/val``.

    Args:
        image_size: training crop and evaluation size; default the first training image's width.

    Returns:
        ``{"top1"`` (fraction, after the last epoch), ``"top1_per_epoch", "seconds_per_epoch"`` (median
        training time of an epoch), ``"total_s", "final_loss"`` (mean over the last epoch),
        ``"diverged"``, and the settings.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    data = Path(data)
    if image_size is None:
        first = datasets.ImageFolder(data / "train").samples[0][0]
        image_size = Image.open(first).width
    normalize = transforms.Normalize(_MEAN, _STD)
    train_set = datasets.ImageFolder(data / "train", transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalize]))
    val_set = datasets.ImageFolder(data / "val", transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(), normalize]))
    if val_set.classes != train_set.classes:
        raise ValueError(f"{data}: val classes {val_set.classes} differ from train classes {train_set.classes}")
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=2 * batch_size, num_workers=workers)

    model = resnet18(num_classes=len(train_set.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    criterion = nn.CrossEntropyLoss()
    epoch_times, top1s, diverged, epoch_losses = [], [], False, []
    for epoch in range(epochs):
        model.train()
        tick = time.perf_counter()
        epoch_losses = []
        for images, labels in train_loader:
            loss = criterion(model(images), labels)
            if not math.isfinite(loss.item()):
                diverged = True
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch_losses.append(loss.item())
        epoch_times.append(time.perf_counter() - tick)
        if diverged:
            print(f"epoch {epoch}: non-finite loss; stopping", flush=True)
            break
        top1s.append(_top1(model, val_loader))
        print(f"epoch {epoch + 1}/{epochs} loss {statistics.fmean(epoch_losses):.4f} top1 {top1s[-1]:.4f} "
              f"{epoch_times[-1]:.1f}s", flush=True)
    return {
        "top1": top1s[-1] if top1s and not diverged else 0.0,
        "top1_per_epoch": top1s,
        "seconds_per_epoch": statistics.median(epoch_times),
        "total_s": time.perf_counter() - start,
        "final_loss": statistics.fmean(epoch_losses) if epoch_losses else None,
        "diverged": diverged,
        "settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "image_size": image_size, "seed": seed, "threads": torch.get_num_threads(),
                     "workers": workers, "num_classes": len(train_set.classes),
                     "train_images": len(train_set), "val_images": len(val_set), "torch": torch.__version__},
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    det = sub.add_parser("det", help="torchvision Mask/Faster R-CNN R18-FPN from scratch on a COCO-format set")
    det.add_argument("--train-images", required=True)
    det.add_argument("--train-ann", required=True)
    det.add_argument("--val-images", required=True)
    det.add_argument("--val-ann", required=True)
    det.add_argument("--detector", choices=DETECTORS, default="mask_rcnn")
    det.add_argument("--iters", type=int, default=300)
    det.add_argument("--lr", type=float, default=0.01)
    det.add_argument("--batch-size", type=int, default=4)
    det.add_argument("--min-size", type=int, default=224)
    det.add_argument("--max-size", type=int, default=320)
    det.add_argument("--box-batch-size-per-image", type=int, default=128)
    det.add_argument("--warmup-iters", type=int, default=0,
                     help="linear warmup from lr/1000 (torchvision's reference script: min(1000, iterations per "
                          "epoch - 1)); default 0: constant lr")
    det.add_argument("--detector-option", action="append", default=[], metavar="KEY=VALUE",
                     help="another keyword of torchvision's MaskRCNN/FasterRCNN, value as JSON "
                          "(e.g. box_detections_per_img=50); repeatable")
    cls = sub.add_parser("cls", help="torchvision resnet18 from scratch on an ImageFolder set (train/, val/)")
    cls.add_argument("--data", required=True, help="folder with train/<class>/ and val/<class>/")
    cls.add_argument("--epochs", type=int, default=8)
    cls.add_argument("--lr", type=float, default=1e-3)
    cls.add_argument("--weight-decay", type=float, default=0.05)
    cls.add_argument("--batch-size", type=int, default=32)
    cls.add_argument("--image-size", type=int, default=None, help="default: the first training image's width")
    for parser in (det, cls):
        parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
        parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--json", help="write the report here (it is printed either way)")
    return p.parse_args(argv)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--detector-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.task == "det":
        report = run_det(args.train_images, args.train_ann, args.val_images, args.val_ann,
                         detector=args.detector, iters=args.iters, lr=args.lr, batch_size=args.batch_size,
                         min_size=args.min_size, max_size=args.max_size,
                         box_batch_size_per_image=args.box_batch_size_per_image,
                         detector_options=_parse_options(args.detector_option), workers=args.workers,
                         seed=args.seed, warmup_iters=args.warmup_iters)
    else:
        report = run_cls(args.data, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, image_size=args.image_size, workers=args.workers,
                         seed=args.seed)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
