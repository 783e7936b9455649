"""The detection recipe: :class:`DetTrainConfig` (YAML files in ``configs/``), read and checked by
:func:`build_config`, and the detector it describes (:func:`model_spec`).

Example::

    cfg, messages = build_config("configs/shapes.yaml", {"backbone": "resnet18", "output_dir": "out/s"})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tools.engine.coco_dataset import lsj_detector_options
from tools.engine.coco_eval import METRIC_NAMES
from tools.engine.config import bounds, load_config, rescale_schedule
from heads.spec import check_model_spec
from tools.engine.runner import on_main_first

__all__ = ["DetTrainConfig", "DET_WARMUP_FLOOR", "build_config", "check_config", "best_metric", "model_spec", "dataset_paths"]


# Shortest warmup (iterations) when --iters shortens a recipe: see tools.engine.config.rescale_schedule.
DET_WARMUP_FLOOR = 100


@dataclass
class DetTrainConfig:
    """A detection recipe. Every field can be set in YAML; the CLI overrides some.

    ``batch_size`` is per process; the learning rate follows the linear scaling rule
    ``base_lr * batch_size * world_size / base_batch_size`` unless ``lr`` is given. Schedule
    fields count iterations. Configures :func:`train`.
    """

    # Model (heads.build_detector): ``backbone`` is a backbones factory name or "timm:<name>";
    # ``backbone_options``/``fpn_options`` go to the ResNet/TimmBackbone and the FPN, and
    # ``detector_options`` to FasterRCNN/MaskRCNN (e.g. ``box_batch_size_per_image``).
    detector: Literal["faster_rcnn", "mask_rcnn"] = "faster_rcnn"
    backbone: str = "resnet50"
    variant: Literal["v1", "v2"] = "v1"
    # Whose detector semantics: torchvision's, or detectron2's (its model zoo; heads.build_detector(style=...)).
    style: Literal["torchvision", "detectron2"] = "torchvision"
    backbone_options: dict = field(default_factory=dict)
    fpn_options: dict = field(default_factory=dict)
    detector_options: dict = field(default_factory=dict)
    # Starting weights: an ImageNet/classification backbone checkpoint (switches the backbone to
    # FrozenBN with the stem and c2 frozen) and/or a full detector checkpoint.
    pretrained: str | None = None
    weights: str | None = None
    # Data: None everywhere = the built-in synthetic shapes set.
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    min_sizes: tuple[int, ...] = field(default=(640, 672, 704, 736, 768, 800),  # train: one at random per image;
                                       metadata=bounds(ge=1))  # test: the last
    max_size: int = field(default=1333, metadata=bounds(ge=1))
    hflip: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    # Large-scale jitter: training images are resized to 0.1-2.0 of max_size, then cropped or padded to
    # max_size x max_size squares, and the detector works at that size (min_sizes is not used).
    lsj: bool = False
    # Copy-paste (Mask R-CNN): with this probability an image gets instances of another image of its batch.
    copy_paste: float = field(default=0.0, metadata=bounds(ge=0, le=1))
    drop_empty: bool = False  # leave out training images without annotations
    # Annotation file_names are confined to their images folder: absolute ones or ones leaving it
    # through ".." are refused, unless this is set (the dataset paths themselves are taken as given).
    allow_outside_root: bool = False
    workers: int = field(default=4, metadata=bounds(ge=0))
    # Optimisation
    iters: int = field(default=90000, metadata=bounds(ge=1))
    batch_size: int = field(default=2, metadata=bounds(ge=1))  # per process and optimizer step, see grad_accum
    # Gradient accumulation: each optimizer step takes the gradient of grad_accum x batch_size images, the same
    # images that batch_size x grad_accum would load, in grad_accum forward/backward passes of batch_size.
    grad_accum: int = field(default=1, metadata=bounds(ge=1))
    lr: float | None = field(default=None, metadata=bounds(gt=0))  # explicit lr: used as is, no scaling
    base_lr: float = field(default=0.02, metadata=bounds(gt=0))
    base_batch_size: int = field(default=16, metadata=bounds(ge=1))
    optimizer: Literal["sgd", "adamw"] = "sgd"  # SGD with momentum, or AdamW (timm's factory)
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))  # sgd
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0))
    weight_decay_norm: float | None = field(default=None, metadata=bounds(ge=0))  # norm layers; None = weight_decay
    no_weight_decay_norm_bias: bool = False  # no weight decay on norm layers and biases (overrides weight_decay_norm)
    # lr schedule, after a linear warmup from base x warmup_factor: "multistep" multiplies by gamma at each of
    # steps; "cosine" decays to min_lr at the last iteration.
    sched: Literal["multistep", "cosine"] = "multistep"
    steps: tuple[int, ...] = field(default=(60000, 80000), metadata=bounds(ge=0))  # lr x gamma at each
    gamma: float = field(default=0.1, metadata=bounds(gt=0))
    warmup_iters: int = field(default=1000, metadata=bounds(ge=0))
    warmup_factor: float = field(default=0.001, metadata=bounds(gt=0, le=1))  # lr ramps from base x this to base
    min_lr: float = field(default=0.0, metadata=bounds(ge=0))  # cosine
    # EMA of the weights (timm's ModelEmaV3 with its decay warm-up): evaluation, model_best and model_final use
    # the averaged weights; checkpoints keep both. None = off.
    ema: float | None = field(default=None, metadata=bounds(gt=0, lt=1))
    clip_grad_norm: float | None = field(default=None, metadata=bounds(gt=0))
    # Divergence (tools.engine.recovery): a NaN/inf loss, or one above spike_factor x the recent median,
    # rolls back to the last good state at half the lr, up to max_recoveries times; then the run stops.
    max_recoveries: int = field(default=3, metadata=bounds(ge=0))
    spike_factor: float | None = field(default=10.0, metadata=bounds(gt=1))
    # Runtime
    device: Literal["cpu", "cuda"] | None = None  # None = cuda when available
    amp: bool = False
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    channels_last: bool = False
    sync_bn: bool = False
    # Bit-identical runs for the same seed, data and flags: torch's deterministic algorithms (on GPU, ops
    # without one are named in a warning), no cuDNN autotuning.
    deterministic: bool = False
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    output_dir: str = "output/det"
    keep_last: int | None = field(default=3, metadata=bounds(ge=1))
    checkpoint_every: int | None = field(default=5000, metadata=bounds(ge=1))  # the end always checkpoints
    eval_every: int | None = field(default=None, metadata=bounds(ge=1))  # the end of training always evaluates
    # Keep model_best.pth/.safetensors: the weights that scored highest on this metric ("bbox/AP", "segm/AP50",
    # ...: an IoU type and a name of tools.engine.coco_eval.METRIC_NAMES) at any evaluation.
    keep_best: str | None = None
    log_every: int = field(default=20, metadata=bounds(ge=1))
    vis_images: int = field(default=8, metadata=bounds(ge=0))  # validation images in val_predictions.png
    vis_score_thresh: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    dist_timeout_s: float = field(default=1800.0, metadata=bounds(gt=0, le=1e9))


def build_config(
    config_path: str | Path | None, overrides: dict[str, Any] | None = None
) -> tuple[DetTrainConfig, list[str]]:
    """Load a recipe and apply overrides; returns ``(config, messages)``.

    When ``overrides`` changes ``iters`` from the recipe's, the decay ``steps`` and the warmup
    keep their fraction of the run (:func:`rescale_schedule`) unless they are overridden too,
    and a message says so.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = load_config(DetTrainConfig, config_path)
    cfg = load_config(DetTrainConfig, config_path, overrides)
    messages = []
    if cfg.iters != recipe.iters:
        steps, warmup = rescale_schedule(recipe.iters, recipe.steps, recipe.warmup_iters, cfg.iters,
                                         warmup_floor=DET_WARMUP_FLOOR)
        if "steps" not in overrides and cfg.sched == "multistep":
            cfg = dataclasses.replace(cfg, steps=steps)
            messages.append(f"iters {recipe.iters} -> {cfg.iters}: lr decays moved to iterations {list(steps)}")
        if "warmup_iters" not in overrides and warmup != cfg.warmup_iters:
            cfg = dataclasses.replace(cfg, warmup_iters=warmup)
            messages.append(f"iters {recipe.iters} -> {cfg.iters}: warmup {recipe.warmup_iters} -> {warmup} iterations "
                            f"(at least {DET_WARMUP_FLOOR} or a quarter of the run, at most the recipe's)")
    check_config(cfg, config_path)
    decay = (f", cosine to lr {cfg.min_lr:g}" if cfg.sched == "cosine"
             else f", lr x{cfg.gamma:g} at iterations {list(cfg.steps)}" if cfg.steps else "")
    steps_of = (f" of {cfg.grad_accum} accumulated batches of {cfg.batch_size} per process" if cfg.grad_accum > 1
                else "")
    messages.append(f"schedule: {cfg.iters} iterations{steps_of}, "
                    f"{'AdamW, ' if cfg.optimizer == 'adamw' else ''}linear warmup over {cfg.warmup_iters} from lr "
                    f"x{cfg.warmup_factor:g}{decay}")
    return cfg, messages


def check_config(cfg: DetTrainConfig, source: str | Path | None = None) -> None:
    """ValueError (naming ``source``, the recipe file, for model options) for settings that cannot run together."""
    for name in ("iters", "batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("checkpoint_every", "eval_every"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or null (off), got {value}")
    if not cfg.min_sizes or any(s < 1 for s in cfg.min_sizes):
        raise ValueError(f"min_sizes must be a non-empty list of positive sizes, got {list(cfg.min_sizes)}")
    if cfg.max_size < max(cfg.min_sizes):
        raise ValueError(f"max_size ({cfg.max_size}) must be >= the largest min_size ({max(cfg.min_sizes)})")
    if list(cfg.steps) != sorted(cfg.steps):
        raise ValueError(f"steps must be increasing, got {list(cfg.steps)}")
    if cfg.warmup_iters < 0 or not 0 < cfg.warmup_factor <= 1:
        raise ValueError(f"warmup_iters must be >= 0 and warmup_factor in (0, 1], got {cfg.warmup_iters}, "
                         f"{cfg.warmup_factor}")
    if cfg.keep_best is not None:
        best_metric(cfg.keep_best, cfg.detector)
    if cfg.lsj and cfg.style == "detectron2":
        raise ValueError("lsj pads its images with torchvision's pixel mean, not detectron2's: use it with style "
                         "torchvision")
    if cfg.copy_paste > 0 and cfg.detector != "mask_rcnn":
        raise ValueError(f"copy_paste needs instance masks: use it with detector mask_rcnn, got {cfg.detector}")
    given = [cfg.train_images, cfg.train_ann, cfg.val_images, cfg.val_ann]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("give all of train_images, train_ann, val_images and val_ann "
                         "(--train-images --train-ann --val-images --val-ann), or none for the built-in shapes set")
    try:
        check_model_spec(model_spec(cfg, num_classes=2))
    except ValueError as e:
        raise ValueError(f"{source}: {e}" if source else str(e)) from None


def best_metric(name: str, detector: str) -> tuple[str, str]:
    """``(iou_type, metric)`` of a ``keep_best`` name such as "bbox/AP"; ValueError listing the valid names."""
    iou_types = ("bbox", "segm") if detector == "mask_rcnn" else ("bbox",)
    iou_type, _, metric = str(name).partition("/")
    if iou_type not in iou_types or metric not in METRIC_NAMES:
        valid = ", ".join(f"{t}/{m}" for t in iou_types for m in METRIC_NAMES[:3]) + ", ..."
        raise ValueError(f"keep_best must be an IoU type of {detector} and a COCO metric name ({valid}; metrics: "
                         f"{', '.join(METRIC_NAMES)}), got {name!r}")
    return iou_type, metric


def model_spec(cfg: DetTrainConfig, num_classes: int) -> dict[str, Any]:
    """The keyword arguments of ``heads.build_detector`` for ``cfg``: what a checkpoint stores to rebuild its model.

    ``num_classes`` counts the background, whatever the style; the spec counts as its style does (detectron2's:
    foreground classes only).
    """
    options = dict(cfg.detector_options)
    if cfg.lsj:  # the data is already at the training size: the detector's resize keeps it
        options.update(lsj_detector_options(cfg.max_size))
    options.setdefault("min_size", tuple(cfg.min_sizes))
    options.setdefault("max_size", cfg.max_size)
    spec = {"kind": cfg.detector, "backbone": cfg.backbone, "num_classes": num_classes}
    if cfg.style == "detectron2":  # its backbone is always FrozenBN; stages are frozen through backbone_options
        spec.update(style="detectron2", num_classes=num_classes - 1)
    else:
        spec.update(variant=cfg.variant, pretrained_backbone=cfg.pretrained is not None or cfg.weights is not None)
    return {**spec, "backbone_options": dict(cfg.backbone_options), "fpn_options": dict(cfg.fpn_options),
            "options": options}



def dataset_paths(cfg: DetTrainConfig) -> dict[str, Path]:
    """``train_images``, ``train_ann``, ``val_images``, ``val_ann`` of the recipe, or of the built-in shapes set."""
    if cfg.train_images is not None:
        return {k: Path(getattr(cfg, k)) for k in ("train_images", "train_ann", "val_images", "val_ann")}
    from tools.engine.shapes import default_shapes_coco

    return on_main_first(default_shapes_coco)  # the main process generates the built-in set once
