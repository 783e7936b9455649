"""Speed and memory of resdet against torchvision (and timm for classifiers), with the distance to the hardware limit.

Every row builds each side (resdet, torchvision, timm) with the same weights where the architectures match, then,
in this one process with one thread count and the same input tensors, runs them alternately (resdet, reference,
resdet, reference, ...) and reports medians; ratio = reference time / resdet time (> 1: resdet is faster).
Peak memory: on CPU, the peak RSS of a fresh subprocess that builds only that side and runs two steps (the
kernel's high-water mark ``VmHWM``, reset just before the steps, so model construction does not count; glibc's
mmap threshold is fixed in that process so that freed blocks leave the RSS at once, see ``_memory_in_subprocess``);
on GPU, ``torch.cuda.max_memory_allocated`` over the timed steps. FLOPs are counted once per row with
``torch.utils.flop_counter.FlopCounterMode`` and set against the machine's measured matmul throughput.

    python tools/benchmark.py                       # default CPU rows (about 20 minutes on 2 cores)
    python tools/benchmark.py --quick               # smoke run, tiny sizes (under 2 minutes)
    python tools/benchmark.py --rows 'resnet50_*' --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fnmatch
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # a script in the clone: only backbones and heads are installed, tools is not
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbones
from backbones.optimize import optimize_for_inference
from tools.reference_models import max_rel_diff, torchvision_classifier, torchvision_detector

try:
    import heads
except ImportError as error:  # the detector rows are skipped with this message
    heads = None
    HEADS_ERROR = f"heads is not importable ({error})"


@dataclasses.dataclass(frozen=True)
class Settings:
    device: str = "cpu"
    batch_size: int = 16
    image_size: int = 224
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    threads: int = 0
    iters: Optional[int] = None
    quick: bool = False


@dataclasses.dataclass
class Runner:
    """One side of a row: a built model and a zero-argument step (one inference or one training iteration)."""

    model: nn.Module
    step: Callable[[], Any]


Builder = Callable[[Settings], Runner]


@dataclasses.dataclass
class Row:
    name: str
    description: str
    metric: str  # "img/s" (throughput) or "ms" (latency per step)
    images: Callable[[Settings], int]  # images per step
    sides: "OrderedDict[str, Builder]"  # first side is resdet, the others are references
    iters: int  # default timed iterations per side (``--iters`` overrides)
    bf16: bool = False  # resdet runs bf16 where the device has it natively: compare against the bf16 matmul peak
    amp: bool = False  # resdet runs under bf16 autocast on any device: compare against the bf16 matmul peak
    compiled: bool = False  # compiles at build time: no memory subprocess (it would compile again)
    check: Optional[Callable[[dict[str, Runner], Settings], str]] = None
    requires_heads: bool = False


# -- helpers ---------------------------------------------------------------------------------------------------
def _sync(settings: Settings) -> None:
    if settings.device == "cuda":
        torch.cuda.synchronize()


def _autocast(settings: Settings) -> contextlib.AbstractContextManager:
    if not settings.amp:
        return contextlib.nullcontext()
    return torch.autocast(settings.device, dtype=torch.bfloat16)


def _prepare_reference(model: nn.Module, settings: Settings) -> nn.Module:
    """Apply the user's flags to a reference model (resdet is channels_last already)."""
    model = model.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_compile(module: nn.Module, settings: Settings) -> None:
    if settings.compile:
        module.compile()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classifier_input(settings: Settings) -> tuple[Tensor, Tensor]:
    g = _generator(1)
    x = torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size, generator=g)
    y = torch.randint(0, 1000, (settings.batch_size,), generator=g)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(settings.device), y.to(settings.device)


def _classifier_step(model: nn.Module, train: bool, settings: Settings) -> Callable[[], Any]:
    x, y = _classifier_input(settings)
    if not train:
        model.eval()

        def infer() -> Any:
            with torch.inference_mode(), _autocast(settings):
                return model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step() -> Any:
        with _autocast(settings):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


def _torchvision_classifier(depth: int) -> nn.Module:
    return torchvision_classifier(f"resnet{depth}")


def _classifier_sides(depth: int, train: bool, optimize: Optional[dict[str, bool]] = None) -> "OrderedDict[str, Builder]":
    """resdet / torchvision / timm ResNet-{depth}, all holding torchvision's (random) weights."""

    def ours(settings: Settings) -> Runner:
        model = backbones.ResNet(depth)
        backbones.load_weights(model, _torchvision_classifier(depth).state_dict())
        model = model.to(settings.device)
        if optimize is not None:
            model = optimize_for_inference(model.eval(), **optimize)
        else:
            _maybe_compile(model, settings)
        return Runner(model, _classifier_step(model, train, settings))

    def reference(settings: Settings) -> Runner:
        model = _prepare_reference(_torchvision_classifier(depth), settings)
        _maybe_compile(model, settings)
        return Runner(model, _classifier_step(model, train, settings))

    def timm_reference(settings: Settings) -> Runner:
        model = timm.create_model(f"resnet{depth}")
        model.load_state_dict(_torchvision_classifier(depth).state_dict())  # same module names as torchvision
        model = _prepare_reference(model, settings)
        _maybe_compile(model, settings)
        return Runner(model, _classifier_step(model, train, settings))

    sides: "OrderedDict[str, Builder]" = OrderedDict(resdet=ours, torchvision=reference)
    if optimize is None:
        sides["timm"] = timm_reference
    return sides


@torch.no_grad()
def _logits_agree(runners: dict[str, Runner], settings: Settings) -> str:
    """Max difference of each reference's logits from resdet's, relative to their scale."""
    outputs = {name: r.step().float() for name, r in runners.items()}
    ours = outputs.pop("resdet")
    diffs = [max_rel_diff(out, ours) for out in outputs.values()]
    return f"logits max rel diff {max(diffs):.1e}"


# -- detectors -------------------------------------------------------------------------------------------------
def _detector_sizes(kind: str, train: bool, r18: bool, settings: Settings) -> tuple[int, int, int]:
    """(images per step, height, width), the spec's sizes (smaller with --quick)."""
    if r18:
        return (4, 128, 128) if settings.quick else (4, 256, 256)
    if train:
        return (2, 256, 256) if settings.quick else (2, 512, 512)
    return (1, 240, 320) if settings.quick else (1, 480, 640)


def _torchvision_detector(
    kind: str, height: int, width: int, r18: bool, calibrate: bool, finetune: bool = False, batch_norm: bool = False
) -> nn.Module:
    """torchvision's R50-FPN (or R18-FPN) detector at the row's image size (``tools.reference_models``).

    ``calibrate``: the calibrated reference, whose detections pass the score threshold (inference rows).
    ``finetune``: the model torchvision builds for fine-tuning from an ImageNet backbone (``weights_backbone`` set):
    FrozenBatchNorm2d, stem and layer1 frozen, holding a calibrated model's statistics, so activations stay O(1) as
    with a pretrained backbone. ``batch_norm``: the R18-FPN with trainable BatchNorm (from scratch).
    """
    return torchvision_detector(
        kind, backbone="resnet18" if r18 else "resnet50", calibrated=calibrate or finetune, frozen_bn=finetune,
        batch_norm=batch_norm, min_size=min(height, width), max_size=max(height, width),
    )


def _detector_data(kind: str, n: int, height: int, width: int, settings: Settings) -> tuple[list[Tensor], list[dict]]:
    g = _generator(2)
    images = [torch.rand(3, height, width, generator=g).to(settings.device) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
        wh = torch.rand(3, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        target = dict(boxes=boxes, labels=torch.randint(1, 91, (3,), generator=g))
        if kind == "mask_rcnn":
            masks = torch.zeros(3, height, width, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
                mask[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append({k: v.to(settings.device) for k, v in target.items()})
    return images, targets


def _detector_step(model: nn.Module, kind: str, train: bool, n: int, h: int, w: int, settings: Settings) -> Callable:
    images, targets = _detector_data(kind, n, h, w, settings)
    if not train:
        model.eval()

        def infer() -> Any:
            with torch.inference_mode(), _autocast(settings):
                return model(images)

        return infer
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9)

    def train_step() -> Any:
        with _autocast(settings):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


def _detector_sides(
    kind: str, train: bool, r18: bool = False, optimize: Optional[dict[str, bool]] = None, finetune: bool = False,
    batch_norm: bool = False, amp_variant: bool = False,
) -> "OrderedDict[str, Builder]":
    """resdet and torchvision holding the same weights. ``batch_norm``: R18-FPN with trainable BatchNorm on both
    sides. ``amp_variant``: resdet under bf16 autocast against resdet and torchvision in float32 (whatever ``--amp``
    says)."""

    def ours(settings: Settings) -> Runner:
        n, h, w = _detector_sizes(kind, train, r18, settings)
        # The R18 reference is ``resnet_fpn_backbone``'s default: FrozenBatchNorm2d, every layer trainable.
        backbone_options = dict(norm="BN" if batch_norm else "FrozenBN", frozen_stages=0) if r18 else None
        model = heads.build_detector(
            kind, "resnet18" if r18 else "resnet50", num_classes=91, pretrained_backbone=finetune,
            backbone_options=backbone_options, min_size=min(h, w), max_size=max(h, w),
        )
        reference = _torchvision_detector(kind, h, w, r18, calibrate=not train, finetune=finetune,
                                          batch_norm=batch_norm)
        heads.load_weights(model, reference.state_dict())
        del reference
        model = model.to(settings.device)
        if optimize is not None:
            model = optimize_for_inference(model.eval(), **optimize)
        else:
            _maybe_compile(model.backbone, settings)
        return Runner(model, _detector_step(model, kind, train, n, h, w, settings))

    def reference(settings: Settings) -> Runner:
        n, h, w = _detector_sizes(kind, train, r18, settings)
        model = _prepare_reference(
            _torchvision_detector(kind, h, w, r18, calibrate=not train, finetune=finetune, batch_norm=batch_norm),
            settings,
        )
        _maybe_compile(model.backbone, settings)
        return Runner(model, _detector_step(model, kind, train, n, h, w, settings))

    if amp_variant:
        return OrderedDict(
            resdet=lambda settings: ours(dataclasses.replace(settings, amp=True)),
            resdet_fp32=lambda settings: ours(dataclasses.replace(settings, amp=False)),
            torchvision=lambda settings: reference(dataclasses.replace(settings, amp=False)),
        )
    return OrderedDict(resdet=ours, torchvision=reference)


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    return torchvision.ops.box_iou(a, b)


@torch.no_grad()
def _detections_agree(runners: dict[str, Runner], settings: Settings, score_tol: Optional[float] = 1e-2) -> str:
    """Share of torchvision's detections that resdet reproduces (same label, IoU >= 0.9 and, unless ``score_tol``
    is None, score within it)."""
    ours, ref = runners["resdet"].step(), runners["torchvision"].step()
    matched = total = 0
    for a, b in zip(ours, ref):
        total += len(b["boxes"])
        if len(a["boxes"]) and len(b["boxes"]):
            iou = _box_iou(b["boxes"].float().cpu(), a["boxes"].float().cpu())
            same = b["labels"].cpu()[:, None] == a["labels"].cpu()[None, :]
            if score_tol is not None:
                same &= (b["scores"].float().cpu()[:, None] - a["scores"].float().cpu()[None, :]).abs() < score_tol
            matched += int(((iou >= 0.9) & same).any(1).sum())
    counts = f"{sum(len(a['boxes']) for a in ours)}/{total} dets"
    return f"detections agree {100.0 * matched / max(total, 1):.0f}% ({counts})"


def _bf16_detections_agree(runners: dict[str, Runner], settings: Settings) -> str:
    """bf16 rows: same label and IoU >= 0.9 (bfloat16 moves scores by more than 1e-2), and whether bf16 ran."""
    native = backbones.bf16_supported(torch.device(settings.device))
    ran = "bf16" if native else "no native bf16: ran float32"
    return f"{_detections_agree(runners, settings, score_tol=None)}; {ran}"


# -- the rows --------------------------------------------------------------------------------------------------
def _classifier_images(settings: Settings) -> int:
    return settings.batch_size


def _rows() -> list[Row]:
    rows: list[Row] = []
    for depth, iters in ((18, 8), (50, 5), (101, 3)):
        rows.append(
            Row(f"resnet{depth}_infer", f"ResNet-{depth} inference (eager defaults)", "img/s", _classifier_images,
                _classifier_sides(depth, False), iters, check=_logits_agree)
        )
    for name, options, what in (
        ("resnet50_infer_opt", dict(), "optimize_for_inference"),
        ("resnet50_infer_opt_bf16", dict(bf16=True), "optimize_for_inference(bf16=True)"),
        ("resnet50_infer_opt_compile", dict(compile=True), "optimize_for_inference(compile=True)"),
    ):
        rows.append(
            Row(name, f"ResNet-50 inference, resdet {what}", "img/s", _classifier_images,
                _classifier_sides(50, False, options), 5, bf16=options.get("bf16", False),
                compiled=options.get("compile", False), check=_logits_agree)
        )
    for depth, iters in ((18, 5), (50, 3), (101, 2)):
        rows.append(
            Row(f"resnet{depth}_train", f"ResNet-{depth} training step (SGD, BatchNorm)", "img/s",
                _classifier_images, _classifier_sides(depth, True), iters)
        )
    for kind, label in (("faster_rcnn", "Faster R-CNN"), ("mask_rcnn", "Mask R-CNN")):
        rows.append(
            Row(f"{kind}_infer", f"{label} R50-FPN inference, 1 image 480x640 (eager defaults)", "ms",
                lambda s: 1, _detector_sides(kind, False), 5, check=_detections_agree, requires_heads=True)
        )
        rows.append(
            Row(f"{kind}_infer_opt", f"{label} R50-FPN inference, 1 image 480x640, optimize_for_inference", "ms",
                lambda s: 1, _detector_sides(kind, False, optimize={}), 5, check=_detections_agree,
                requires_heads=True)
        )
        rows.append(
            Row(f"{kind}_infer_opt_compile",
                f"{label} R50-FPN inference, 1 image 480x640, optimize_for_inference(compile=True)", "ms",
                lambda s: 1, _detector_sides(kind, False, optimize=dict(compile=True)), 5, compiled=True,
                check=_detections_agree, requires_heads=True)
        )
    for kind, label in (("faster_rcnn", "Faster R-CNN"), ("mask_rcnn", "Mask R-CNN")):
        rows.append(
            Row(f"{kind}_infer_opt_bf16",
                f"{label} R50-FPN inference, 1 image 480x640, optimize_for_inference(bf16=True) vs torchvision fp32",
                "ms", lambda s: 1, _detector_sides(kind, False, optimize=dict(bf16=True)), 5, bf16=True,
                check=_bf16_detections_agree, requires_heads=True)
        )
    for kind, label in (("faster_rcnn", "Faster R-CNN"), ("mask_rcnn", "Mask R-CNN")):
        rows.append(
            Row(f"{kind}_train", f"{label} R50-FPN training step, 2 images 512x512 (from scratch: BN)", "ms",
                lambda s: 2, _detector_sides(kind, True), 5, requires_heads=True)
        )
    rows.append(
        Row("faster_rcnn_finetune", "Faster R-CNN R50-FPN fine-tuning step, 2 images 512x512 (FrozenBN, stem and "
            "c2 frozen, as from an ImageNet backbone)", "ms", lambda s: 2,
            _detector_sides("faster_rcnn", True, finetune=True), 5, requires_heads=True)
    )
    rows.append(
        Row("faster_rcnn_r18_train", "Faster R-CNN R18-FPN training step, 4 images 256x256 (FrozenBN, every "
            "layer trainable)", "ms", lambda s: 4,
            _detector_sides("faster_rcnn", True, r18=True), 5, requires_heads=True)
    )
    rows.append(
        Row("faster_rcnn_r18_train_bn", "Faster R-CNN R18-FPN training step, 4 images 256x256 (trainable BatchNorm, "
            "from scratch)", "ms", lambda s: 4,
            _detector_sides("faster_rcnn", True, r18=True, batch_norm=True), 5, requires_heads=True)
    )
    rows.append(
        Row("faster_rcnn_r18_train_amp", "Faster R-CNN R18-FPN training step, 4 images 256x256 (FrozenBN), resdet "
            "under bf16 autocast vs resdet and torchvision in fp32", "ms", lambda s: 4,
            _detector_sides("faster_rcnn", True, r18=True, amp_variant=True), 5, amp=True, requires_heads=True)
    )
    return rows


ROWS = OrderedDict((row.name, row) for row in _rows())
# --quick: tiny sizes and no compilation (a smoke run); rows still cover every code path but the compiler's.
_QUICK_EXCLUDE = ("resnet101_*", "*_compile")


# -- measurement -----------------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: str) -> float:
    """Measured GFLOP/s of a large square matmul (the practical ceiling for convolutions and linear layers)."""
    n = 4096 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _high_water_mark_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _release_free_heap() -> None:
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim``), so that the peak RSS counts live memory,
    not what building the model (loading weights, a deep copy) left freed but still mapped."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release, the probe is just less exact
        pass


def _probe_memory(row_name: str, side: str, settings: Settings) -> dict[str, float]:
    """In a fresh process (``--_probe``): build one side, reset the RSS high-water mark, run two steps."""
    runner = ROWS[row_name].sides[side](settings)
    gc.collect()
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _high_water_mark_mib()
    for _ in range(2):
        runner.step()
    return dict(peak_mib=_high_water_mark_mib(), before_mib=before)


def _memory_in_subprocess(row_name: str, side: str, settings: Settings) -> Optional[float]:
    command = [sys.executable, os.path.abspath(__file__), "--_probe", row_name, side, json.dumps(dataclasses.asdict(settings))]
    # glibc serves blocks below its mmap threshold from the heap and raises that threshold (up to 32 MiB) each time
    # a larger block is freed, so with its defaults the peak RSS depends on the order of earlier frees (heap
    # fragmentation) as much as on the memory in use (peaks of one step moved by tens of MiB). A fixed threshold
    # returns every freed block of 64 KiB or more at once, so the peak counts live memory. Same for every side.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"  memory probe of {row_name}/{side} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def _count_flops(step: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def run_row(row: Row, settings: Settings, peaks: dict[str, float], memory: bool) -> Optional[dict[str, Any]]:
    """Build, check, time (alternating) and measure one row; None (with a message) if it cannot run."""
    if row.requires_heads and heads is None:
        print(f"{row.name}: skipped, {HEADS_ERROR}", flush=True)
        return None
    runners: dict[str, Runner] = {}
    for side, build in row.sides.items():
        try:
            runners[side] = build(settings)
        except (ImportError, AttributeError, NotImplementedError) as error:
            print(f"{row.name}: side {side} skipped ({type(error).__name__}: {error})", flush=True)
    if "resdet" not in runners or len(runners) < 2:
        print(f"{row.name}: skipped, needs resdet and a reference", flush=True)
        return None

    # The check runs every side once and the FLOP count the reference once: both double as warm-up steps.
    warm = {side: 0 for side in runners}
    check = ""
    if row.check is not None:
        check = row.check(runners, settings)
        warm = {side: 1 for side in runners}
    # FLOPs of the architecture, counted on an uncompiled reference (the counter cannot see into compiled code).
    reference = next(side for side in runners if side != "resdet")
    if settings.compile:
        flops = _count_flops(row.sides[reference](dataclasses.replace(settings, compile=False)).step)
    else:
        flops = _count_flops(runners[reference].step)
        warm[reference] += 1
    warmup = 2 if (settings.compile or row.compiled) else 1  # compiling: first call compiles, second settles
    cuda_peak: dict[str, float] = {}
    for side, runner in runners.items():
        for _ in range(warmup - warm[side]):
            runner.step()
    _sync(settings)

    times: dict[str, list[float]] = {side: [] for side in runners}
    iters = settings.iters or (2 if settings.quick else row.iters)
    for i in range(iters):
        for side, runner in runners.items():
            if settings.device == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats()
            _sync(settings)
            start = time.perf_counter()
            runner.step()
            _sync(settings)
            times[side].append(time.perf_counter() - start)
            if settings.device == "cuda" and i == 0:
                cuda_peak[side] = torch.cuda.max_memory_allocated() / 2**20
    del runners
    gc.collect()

    peak_mem: dict[str, Optional[float]] = {}
    for side in times:
        if settings.device == "cuda":
            peak_mem[side] = cuda_peak.get(side)
        elif memory and not (row.compiled or settings.compile):
            peak_mem[side] = _memory_in_subprocess(row.name, side, settings)
        else:
            peak_mem[side] = None

    images = row.images(settings)
    medians = {side: statistics.median(t) for side, t in times.items()}
    # A bf16 row without native bf16 ran float32 (optimize_for_inference keeps it); autocast runs bf16 anyway.
    bf16_ran = settings.amp or row.amp or (row.bf16 and backbones.bf16_supported(torch.device(settings.device)))
    peak = peaks["bf16" if bf16_ran else "fp32"]
    result = dict(
        row=row.name,
        description=row.description,
        metric=row.metric,
        images_per_step=images,
        gflop_per_step=flops / 1e9,
        check=check,
        sides={
            side: dict(
                seconds=times[side],
                median_s=medians[side],
                value=images / medians[side] if row.metric == "img/s" else 1000 * medians[side],
                gflops=flops / 1e9 / medians[side],
                percent_of_peak=100 * flops / 1e9 / medians[side] / peak,
                peak_mib=peak_mem[side],
            )
            for side in times
        },
        ratios={side: medians[side] / medians["resdet"] for side in times if side != "resdet"},
    )
    _print_row(result)
    return result


# -- output ----------------------------------------------------------------------------------------------------
_HEADER = (
    f"{'row':<28}{'metric':>7}{'resdet':>9}  {'reference':<12}{'ref':>9}{'ratio':>7}"
    f"{'GFLOP/s':>9}{'%peak':>7}{'MiB ours':>10}{'MiB ref':>9}  check"
)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(result: dict[str, Any]) -> None:
    ours = result["sides"]["resdet"]
    for i, (side, ratio) in enumerate(result["ratios"].items()):
        ref = result["sides"][side]
        head = (
            f"{result['row']:<28}{result['metric']:>7}{ours['value']:>9.1f}" if i == 0 else " " * 44
        )
        print(
            f"{head}  {side:<12}{ref['value']:>9.1f}{ratio:>6.2f}x"
            f"{ours['gflops'] if i == 0 else ref['gflops']:>9.0f}"
            f"{ours['percent_of_peak'] if i == 0 else ref['percent_of_peak']:>6.0f}%"
            f"{_fmt(ours['peak_mib'] if i == 0 else None, '.0f'):>10}{_fmt(ref['peak_mib'], '.0f'):>9}"
            f"  {result['check'] if i == 0 else ''}",
            flush=True,
        )


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = [x for x in line.split(":", 1)[1].split() if x.startswith(("amx", "avx512_bf16"))]
                    break
    except OSError:
        pass
    return dict(
        cpu=cpu,
        cpu_count=os.cpu_count(),
        bf16_flags=flags,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=backbones.bf16_supported(torch.device("cpu")),
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        timm=timm.__version__,
    )


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="classifier rows (default 16; 2 with --quick)")
    parser.add_argument("--image-size", type=int, default=None, help="classifier rows (default 224; 112 with --quick)")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast on every side")
    parser.add_argument("--channels-last", action="store_true", help="channels_last references and inputs too")
    parser.add_argument("--compile", action="store_true", help="torch.compile every side (detectors: backbone)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per side (default: per row)")
    parser.add_argument("--rows", default=None, help="comma-separated row names or globs; 'list' lists them")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 2 steps, no compile, no memory")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses (CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1 or args.iters is not None and args.iters < 1:
        parser.error("--batch-size and --iters must be positive")
    return args


def select_rows(spec: Optional[str], quick: bool) -> list[Row]:
    """Rows matching the comma-separated names/globs (default: all, minus the slow ones with --quick)."""
    if spec is None:
        return [r for name, r in ROWS.items() if not (quick and any(fnmatch.fnmatch(name, p) for p in _QUICK_EXCLUDE))]
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    selected = [r for name, r in ROWS.items() if any(fnmatch.fnmatch(name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(name, p) for name in ROWS)]
    if unknown or not selected:
        raise SystemExit(f"--rows: no row matches {unknown or patterns}; rows are: {', '.join(ROWS)}")
    return selected


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args._probe:
        row_name, side, settings_json = args._probe
        settings = Settings(**json.loads(settings_json))
        if settings.threads:
            torch.set_num_threads(settings.threads)
        print(json.dumps(_probe_memory(row_name, side, settings)))
        return []
    if args.rows == "list":
        for row in ROWS.values():
            print(f"{row.name:<28}{row.description}")
        return []
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        device=args.device,
        batch_size=args.batch_size or (2 if args.quick else 16),
        image_size=args.image_size or (112 if args.quick else 224),
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        threads=torch.get_num_threads(),
        iters=args.iters,
        quick=args.quick,
    )
    rows = select_rows(args.rows, args.quick)
    memory = not (args.no_memory or args.quick)

    info = machine_info()
    start_load = os.getloadavg()
    peaks = {"fp32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    print(f"machine: {info['cpu']} ({info['cpu_count']} cpus, {info['threads']} threads), gpu: {info['gpu']}")
    print(f"cpu: torch capability {info['cpu_capability']}, bf16 flags {info['bf16_flags'] or 'none'}, "
          f"native bf16 {info['native_bf16']}")
    print(f"versions: torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}")
    print(f"settings: {dataclasses.asdict(settings)}")
    print(f"matmul peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; load average {start_load}")
    print("ratio = reference time / resdet time; GFLOP/s and %peak of resdet (first line) and the reference")
    print(_HEADER, flush=True)
    results = [r for r in (run_row(row, settings, peaks, memory) for row in rows) if r is not None]
    end_load = os.getloadavg()
    print(f"load average at the end: {end_load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(machine=info, settings=dataclasses.asdict(settings), matmul_peak_gflops=peaks,
                     load_average=dict(start=start_load, end=end_load), rows=results),
                f,
                indent=1,
            )
    return results


if __name__ == "__main__":
    main()
