"""Detection fine-tuning and evaluation: Faster/Mask R-CNN over ResNet-FPN on COCO-format data.

:class:`DetTrainConfig` is the recipe (YAML files in ``configs/``); :func:`train` runs it:
COCO data with multi-scale training, SGD with linear warmup and step decay, DDP via torchrun,
AMP, channels_last, atomic resumable checkpoints, periodic and final COCO evaluation,
metrics, curves and a picture of the validation predictions.

Resume is exact: a run killed at any point and restarted with ``resume=True`` ends with
bit-identical weights to an uninterrupted one (CPU, same seed). The training batches are a
function of (seed, iteration) (:class:`tools.engine.coco_data.InfiniteBatches`), and every
checkpoint holds the python/numpy/torch RNG states of every rank, which drive the random
train-time resize and the RPN/RoI sampling.

A checkpoint also records how to rebuild its model (``"model_spec"``: detector kind, backbone,
variant, classes, options) and the dataset's labels (``"label_to_cat_id"``, ``"class_names"``),
so :func:`load_detector` (used by ``tools/eval_coco.py`` and ``tools/infer.py``) needs no flags.

Example::

    cfg, messages = build_config("configs/shapes.yaml", {"backbone": "resnet18", "output_dir": "out/s"})
    metrics = train(cfg)            # {"bbox": {"AP": 0.41, ...}}
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

import backbones
import heads
from tools.engine.auto_recipe import det_data_stats, det_recipe
from tools.engine.checkpoint import (
    CheckpointManager,
    export_weights,
    get_rng_state,
    load_checkpoint,
    load_metadata,
    restore_training_state,
)
from tools.engine.coco_data import (
    CocoDetection,
    InfiniteBatches,
    build_det_loader,
    build_det_transforms,
    detections_to_coco_results,
    load_rgb_image,
)
from tools.engine.coco_eval import check_result_masks, evaluate_coco, load_results, results_have_segm, write_metrics
from tools.engine.config import (
    bounds,
    check_options,
    config_to_dict,
    keyword_hints,
    load_config,
    rescale_schedule,
    save_config,
    scale_lr,
)
from tools.engine.distributed import (
    all_gather_object,
    barrier,
    cleanup,
    convert_sync_batchnorm,
    init_distributed,
    is_elastic_restart,
    is_main_process,
    reduce_dict,
)
from tools.engine.faults import crash_point
from tools.engine.logger import MetricLogger, progress
from tools.engine.plots import plot_curves
from tools.engine.recovery import DivergenceGuard
from tools.engine.train_utils import (
    AmpSettings,
    autocast,
    backward_and_step,
    resolve_amp,
    seed_everything,
)
from tools.engine.visualize import draw_detections, save_grid

__all__ = [
    "DetTrainConfig",
    "WarmupMultiStep",
    "build_config",
    "model_spec",
    "check_model_spec",
    "build_model",
    "build_optimizer",
    "load_start_weights",
    "evaluate",
    "train",
    "run_from_args",
    "load_detector",
    "evaluate_checkpoint",
    "score_results_file",
    "infer_images",
]

logger = logging.getLogger(__name__)

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
    drop_empty: bool = False  # leave out training images without annotations
    # Annotation file_names are confined to their images folder: absolute ones or ones leaving it
    # through ".." are refused, unless this is set (the dataset paths themselves are taken as given).
    allow_outside_root: bool = False
    workers: int = field(default=4, metadata=bounds(ge=0))
    # Optimisation
    iters: int = field(default=90000, metadata=bounds(ge=1))
    batch_size: int = field(default=2, metadata=bounds(ge=1))  # per process
    lr: float | None = field(default=None, metadata=bounds(gt=0))  # explicit lr: used as is, no scaling
    base_lr: float = field(default=0.02, metadata=bounds(gt=0))
    base_batch_size: int = field(default=16, metadata=bounds(ge=1))
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0))
    weight_decay_norm: float | None = field(default=None, metadata=bounds(ge=0))  # norm layers; None = weight_decay
    steps: tuple[int, ...] = field(default=(60000, 80000), metadata=bounds(ge=0))  # lr x gamma at each
    gamma: float = field(default=0.1, metadata=bounds(gt=0))
    warmup_iters: int = field(default=1000, metadata=bounds(ge=0))
    warmup_factor: float = field(default=0.001, metadata=bounds(gt=0, le=1))  # lr ramps from base x this to base
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
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    output_dir: str = "output/det"
    keep_last: int | None = field(default=3, metadata=bounds(ge=1))
    checkpoint_every: int | None = field(default=5000, metadata=bounds(ge=1))  # the end always checkpoints
    eval_every: int | None = field(default=None, metadata=bounds(ge=1))  # the end of training always evaluates
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
        if "steps" not in overrides:
            cfg = dataclasses.replace(cfg, steps=steps)
            messages.append(f"iters {recipe.iters} -> {cfg.iters}: lr decays moved to iterations {list(steps)}")
        if "warmup_iters" not in overrides and warmup != cfg.warmup_iters:
            cfg = dataclasses.replace(cfg, warmup_iters=warmup)
            messages.append(f"iters {recipe.iters} -> {cfg.iters}: warmup {recipe.warmup_iters} -> {warmup} iterations "
                            f"(at least {DET_WARMUP_FLOOR} or a quarter of the run, at most the recipe's)")
    _check_config(cfg, config_path)
    messages.append(f"schedule: {cfg.iters} iterations, linear warmup over {cfg.warmup_iters} from lr x{cfg.warmup_factor:g}"
                    + (f", lr x{cfg.gamma:g} at iterations {list(cfg.steps)}" if cfg.steps else ""))
    return cfg, messages


def _check_config(cfg: DetTrainConfig, source: str | Path | None = None) -> None:
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
    given = [cfg.train_images, cfg.train_ann, cfg.val_images, cfg.val_ann]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("give all of train_images, train_ann, val_images and val_ann "
                         "(--train-images --train-ann --val-images --val-ann), or none for the built-in shapes set")
    try:
        check_model_spec(model_spec(cfg, num_classes=2))
    except ValueError as e:
        raise ValueError(f"{source}: {e}" if source else str(e)) from None


class WarmupMultiStep:
    """LR factor at an iteration: linear warmup from ``warmup_factor`` to 1, then x ``gamma`` at each step.

    Detectron2's ``WarmupMultiStepLR`` schedule, as a picklable callable for ``torch.optim.lr_scheduler.LambdaLR``.

    Example::

        >>> f = WarmupMultiStep(steps=(60, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
        >>> f(0), f(10), f(60), f(80)
        (0.001, 1.0, 0.1, 0.010000000000000002)
    """

    def __init__(self, steps: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float) -> None:
        self.steps = list(steps)
        self.gamma = gamma
        self.warmup_iters = warmup_iters
        self.warmup_factor = warmup_factor

    def __call__(self, iteration: int) -> float:
        factor = self.gamma ** bisect.bisect_right(self.steps, iteration)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor


# ----------------------------------------------------------------------------- model


def model_spec(cfg: DetTrainConfig, num_classes: int) -> dict[str, Any]:
    """The keyword arguments of ``heads.build_detector`` for ``cfg``: what a checkpoint stores to rebuild its model."""
    options = dict(cfg.detector_options)
    options.setdefault("min_size", tuple(cfg.min_sizes))
    options.setdefault("max_size", cfg.max_size)
    return {
        "kind": cfg.detector,
        "backbone": cfg.backbone,
        "num_classes": num_classes,
        "variant": cfg.variant,
        "pretrained_backbone": cfg.pretrained is not None or cfg.weights is not None,
        "backbone_options": dict(cfg.backbone_options),
        "fpn_options": dict(cfg.fpn_options),
        "options": options,
    }


# The keys of a model_spec(): heads.build_detector's parameters, with its **options under "options".
_SPEC_KEYS = ("kind", "backbone", "num_classes", "variant", "pretrained_backbone", "backbone_options", "fpn_options",
              "options")


def _takes_module(hint: Any) -> bool:
    """Whether a parameter's type hint is a module (a part passed as an object): no config or checkpoint sets it."""
    return any(isinstance(arg, type) and issubclass(arg, nn.Module) for arg in typing.get_args(hint) or (hint,))


def check_model_spec(spec: Any) -> dict[str, Any]:
    """A :func:`model_spec` dict (from a config or a checkpoint) checked before anything is built from it; returns
    a copy with the option values read as their types.

    Each options dict may hold only keyword parameters of what receives it, read from the signatures:
    ``backbone_options`` of ``backbones.ResNet`` (for ``timm:<name>``: ``backbones.TimmBackbone`` and timm's model
    keywords, but none of ``timm.create_model``'s own, such as ``pretrained_cfg_overlay`` or ``checkpoint_path``,
    which load files), ``fpn_options`` of ``backbones.FPN`` and ``options`` (``detector_options``) of the detector
    class, without its module-valued parameters. ValueError naming the key and listing the valid ones otherwise.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"the model spec must be a mapping, got {type(spec).__name__}")
    unknown = sorted((k for k in spec if k not in _SPEC_KEYS), key=str)
    if unknown:
        raise ValueError(f"the model spec has unknown key(s) {unknown}; valid keys: {list(_SPEC_KEYS)}")
    spec = dict(spec)
    kind, backbone = spec.get("kind", "faster_rcnn"), spec.get("backbone", "resnet50")
    if kind not in heads.DETECTORS:
        raise ValueError(f"detector must be one of {sorted(heads.DETECTORS)}, got {kind!r}")
    if spec.get("variant", "v1") not in heads.VARIANTS:
        raise ValueError(f"variant must be one of {list(heads.VARIANTS)}, got {spec['variant']!r}")
    if not isinstance(backbone, str):
        raise ValueError(f"backbone must be a name, got {backbone!r}")
    num_classes = spec.get("num_classes", 91)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
    if not isinstance(spec.get("pretrained_backbone", False), bool):
        raise ValueError(f"pretrained_backbone must be true or false, got {spec['pretrained_backbone']!r}")
    if backbone.startswith("timm:"):
        import timm

        spec["backbone_options"] = check_options(
            spec.get("backbone_options", {}), keyword_hints(backbones.TimmBackbone, exclude=("model_name",)),
            "backbone_options", open_ended=True, refused=keyword_hints(timm.create_model, exclude=("model_name",)),
            refused_reason="timm.create_model's own options choose and load weight files; give weights with "
                           "backbone_options.checkpoint or --weights")
    else:
        spec["backbone_options"] = check_options(
            spec.get("backbone_options", {}), keyword_hints(backbones.ResNet, exclude=("depth",)), "backbone_options")
    spec["fpn_options"] = check_options(
        spec.get("fpn_options", {}), keyword_hints(backbones.FPN, exclude=("bottom_up",)), "fpn_options")
    detector = heads.DETECTORS[kind]  # MaskRCNN passes its **options on to FasterRCNN
    hints = keyword_hints(*(c for c in detector.__mro__ if isinstance(c, type) and issubclass(c, heads.FasterRCNN)),
                          exclude=("backbone", "num_classes", "variant"))
    spec["options"] = check_options(spec.get("options", {}), {k: h for k, h in hints.items() if not _takes_module(h)},
                                    "detector_options")
    return spec


def build_model(spec: dict[str, Any]) -> heads.FasterRCNN:
    """``heads.build_detector`` from a :func:`model_spec` dict (as saved in our checkpoints), checked first by
    :func:`check_model_spec`."""
    spec = check_model_spec(spec)
    options = spec.pop("options")
    if isinstance(options.get("min_size"), list):
        options["min_size"] = tuple(options["min_size"])
    try:
        return heads.build_detector(**spec, **options)
    except TypeError as e:  # e.g. a timm keyword the model does not take, or one a ResNeXt factory sets itself
        raise ValueError(f"cannot build the detector from its spec: {e}") from None


def build_optimizer(model: nn.Module, cfg: DetTrainConfig, lr: float) -> torch.optim.SGD:
    """SGD with momentum over the trainable parameters; norm layers get ``weight_decay_norm`` when set."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, norm_types) else decay).append(p)
    norm_wd = cfg.weight_decay if cfg.weight_decay_norm is None else cfg.weight_decay_norm
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": norm_wd})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


# ----------------------------------------------------------------------------- data


def _dataset_paths(cfg: DetTrainConfig) -> dict[str, Path]:
    if cfg.train_images is not None:
        return {k: Path(getattr(cfg, k)) for k in ("train_images", "train_ann", "val_images", "val_ann")}
    from tools.engine.shapes import default_shapes_coco

    paths = default_shapes_coco() if is_main_process() else None
    barrier()  # the main process generates the set once; the others wait, then read it
    return paths or default_shapes_coco()


def _to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    dataset: CocoDetection,
    device: torch.device,
    label_to_cat_id: dict[int, int] | None = None,
    amp: AmpSettings | None = None,
    iou_types: Sequence[str] | None = None,
) -> tuple[dict[str, dict[str, float]] | None, list[dict] | None]:
    """COCO-evaluate ``model`` on ``loader`` (this rank's share of ``dataset``); returns ``(metrics, results)``.

    Every rank runs its images; rank 0 gathers all detections (``all_gather_object``), scores
    them with pycocotools against ``dataset.coco`` (``bbox``, plus ``segm`` for Mask R-CNN)
    and returns them; other ranks get ``(None, None)``. The model is left in eval mode.
    """
    model.eval()
    amp = amp or AmpSettings(None, False)
    mapping = label_to_cat_id or dataset.label_to_cat_id
    has_masks = model.roi_heads.has_mask()
    results: list[dict] = []
    for images, targets in loader:
        images = [img.to(device, non_blocking=True) for img in images]
        with autocast(device, amp):
            outputs = model(images)
        results += detections_to_coco_results(outputs, [t["image_id"] for t in targets], mapping)
        crash_point("eval")  # test hook (tools.engine.faults)
    gathered = all_gather_object(results)
    if not is_main_process():
        return None, None
    results = [r for part in gathered for r in part]
    iou_types = iou_types or (("bbox", "segm") if has_masks else ("bbox",))
    return evaluate_coco(dataset.coco, results, iou_types), results


def _write_eval(out: Path, metrics: dict[str, dict[str, float]], results: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "coco_results.json").write_text(json.dumps(results))
    write_metrics(out / "metrics.json", metrics)


def _prediction_grid(model: nn.Module, dataset: CocoDetection, count: int, device: torch.device,
                     class_names: Sequence[str], score_thresh: float, out_png: Path) -> Path | None:
    """Draw the predictions on the first ``count`` images of ``dataset`` into one PNG grid."""
    if count <= 0 or len(dataset) == 0:
        return None
    model.eval()
    drawn = []
    with torch.no_grad():
        for index in range(min(count, len(dataset))):
            image, _ = dataset[index]
            image = image.as_subclass(Tensor)
            detections = model([image.to(device)])[0]
            drawn.append(draw_detections(image, detections, class_names, score_thresh))
    return save_grid(drawn, out_png)


# ----------------------------------------------------------------------------- training


def train(cfg: DetTrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Run the recipe ``cfg``; returns the final COCO metrics ``{"bbox": {...}, "segm"?: {...}}``.

    Writes to ``cfg.output_dir``: ``config.yaml``, ``model_{iter:07d}.pth`` checkpoints (every
    ``checkpoint_every`` iterations and at the end), ``model_final.pth`` (its weights alone also as
    ``model_final.safetensors``), ``metrics.jsonl`` and TensorBoard events (losses and lr every
    ``log_every`` iterations, APs at each evaluation), ``coco_results.json``, ``metrics.json``, ``loss_curve.png`` and ``val_predictions.png``.
    Checkpoints hold ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``divergence_guard``, ``iteration``,
    ``rng`` (every rank's), ``config``, ``model_spec``, ``label_to_cat_id`` and ``class_names``.

    Args:
        cfg: the recipe.
        resume: continue from the newest checkpoint in ``cfg.output_dir`` that loads (from
            scratch when there is none). A finished run is evaluated again. Always on in a
            worker group restarted by ``torchrun --max-restarts``.

    Raises:
        FloatingPointError: a loss became NaN/inf or exploded after ``max_recoveries`` roll-backs
            (:mod:`tools.engine.recovery`; the message names the iteration and every loss term);
            the checkpoints written before stay as they are.
        ValueError: bad data, unknown backbone, impossible settings.
    """
    info = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"), cfg.dist_timeout_s)
    if is_elastic_restart() and not resume:
        logger.info("torchrun restarted the workers: resuming from the newest checkpoint in %s", cfg.output_dir)
        resume = True
    try:
        return _train(cfg, info, resume, overwrite)
    finally:
        cleanup()


def _train(cfg: DetTrainConfig, info: Any, resume: bool, overwrite: bool) -> dict[str, dict[str, float]]:
    _check_config(cfg)
    main = is_main_process()
    device = info.device
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed + info.rank)
    masks = cfg.detector == "mask_rcnn"

    # Data: multi-scale resizing happens in the model (GeneralizedRCNNTransform picks one of
    # min_sizes per image), so the dataset only flips.
    paths = _dataset_paths(cfg)
    train_set = CocoDetection(paths["train_images"], paths["train_ann"],
                              build_det_transforms(train=True, hflip_prob=cfg.hflip),
                              with_masks=masks, drop_empty=cfg.drop_empty,
                              allow_outside_root=cfg.allow_outside_root)
    val_set = CocoDetection(paths["val_images"], paths["val_ann"], None, with_masks=masks,
                            allow_outside_root=cfg.allow_outside_root)
    if val_set.cat_ids != train_set.cat_ids:
        raise ValueError(f"train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    class_names = train_set.class_names
    label_to_cat_id = dict(train_set.label_to_cat_id)
    spec = model_spec(cfg, len(class_names) + 1)

    model = build_model(spec)
    manager = CheckpointManager(out, keep_last=cfg.keep_last)
    # Resume loads the weights here: a checkpoint they do not fit (another recipe's) is skipped for an older one.
    found = manager.begin(resume, overwrite, delete=main, accept=lambda state: model.load_state_dict(state["model"]))
    if resume and found is None and main:
        logger.info("resume: no checkpoint in %s, starting from scratch", out)
    if found is None:
        load_start_weights(model, cfg.pretrained, cfg.weights, verbose=main)
    if cfg.sync_bn and info.enabled:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU implementation")
        model = convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    lr, lr_message = scale_lr(cfg.base_lr, cfg.base_batch_size, cfg.batch_size * info.world_size, cfg.lr)
    if lr_message and main:
        logger.info(lr_message)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupMultiStep(cfg.steps, cfg.gamma, cfg.warmup_iters, cfg.warmup_factor))
    amp = resolve_amp(device, cfg.amp, cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp.use_scaler else None
    guard = DivergenceGuard(cfg.max_recoveries, cfg.spike_factor)

    train_loader = build_det_loader(train_set, cfg.batch_size, train=True, workers=cfg.workers,
                                    distributed=info.enabled, seed=cfg.seed)
    val_loader = build_det_loader(val_set, cfg.batch_size, train=False, workers=cfg.workers,
                                  distributed=info.enabled)

    start_iter = 0
    if found is not None:
        path, state = found
        restore_training_state(state, optimizer, scheduler, scaler, guard, info.rank, info.world_size)
        start_iter = int(state["iteration"])
        if main:
            logger.info("resumed from %s (iteration %d)", path, start_iter)
    if main:
        save_config(cfg, out / "config.yaml")

    metrics_log = MetricLogger(out, enabled=main)

    def trainable_state() -> dict[str, Any]:  # what a divergence rolls back
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def checkpoint_state(iteration: int) -> dict[str, Any]:
        return {
            **trainable_state(),
            "scheduler": scheduler.state_dict(),
            "divergence_guard": guard.state_dict(),
            "iteration": iteration,
            "rng": all_gather_object(get_rng_state()),  # every rank's, so each resumes its own stream
            "config": config_to_dict(cfg),
            "model_spec": spec,
            "label_to_cat_id": label_to_cat_id,
            "class_names": list(class_names),
        }

    def save(iteration: int) -> dict[str, Any]:
        state = checkpoint_state(iteration)  # collective: all ranks take part
        if main:
            manager.save(state, iteration)
        if guard.healthy():
            guard.take_snapshot(iteration, trainable_state())
        barrier()
        return state

    def run_eval(iteration: int) -> dict[str, dict[str, float]] | None:
        metrics, results = evaluate(model, val_loader, val_set, device, label_to_cat_id, amp)
        net.train()
        if main:
            _write_eval(out, metrics, results)
            metrics_log.log(step=iteration, **{f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()})
        return metrics

    batches = InfiniteBatches(train_loader, start_iter)
    bar = progress(cfg.iters, initial=start_iter, enabled=main, desc="train")
    net.train()
    guard.take_snapshot(start_iter, trainable_state())
    sums: dict[str, float] = {}
    window_start, window_iters, window_steps = time.perf_counter(), 0, 0
    for iteration in range(start_iter, cfg.iters):
        images, targets = next(batches)
        # (channels_last needs no input conversion: the model batches the images itself, and
        # convolutions with channels_last weights produce channels_last outputs.)
        images, targets = _to_device(images, targets, device)
        with autocast(device, amp):
            loss_dict = net(images, targets)
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        loss = sum(loss_dict.values())
        # Mean over ranks: every rank sees the same values, so all ranks recover or stop together.
        reduced = reduce_dict({**loss_dict, "loss": loss.detach()})
        lr_now = optimizer.param_groups[0]["lr"]
        problem = guard.check(reduced, iteration)
        if problem is None:
            crash_point("train_step")  # test hook (tools.engine.faults); no-op unless RESDET_CRASH_AT is set
            backward_and_step(loss, model, optimizer, scaler, cfg.clip_grad_norm)
            for k, v in reduced.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            window_steps += 1
        else:  # roll back to the last good state at a lower lr; this batch is skipped
            _restore_trainable(guard.recover(problem, iteration), model, optimizer, scaler)
        scheduler.step()
        guard.scale_lr(optimizer)
        done = iteration + 1

        window_iters += 1
        bar.update()
        bar.set_postfix(loss=f"{float(reduced['loss']):.3f}", lr=f"{lr_now:.2e}")
        if done % cfg.log_every == 0 or done == cfg.iters:
            elapsed = time.perf_counter() - window_start
            metrics_log.log(step=done, lr=lr_now, time_per_iter=elapsed / window_iters,
                            **{k: v / max(window_steps, 1) for k, v in sums.items()})
            sums, window_start, window_iters, window_steps = {}, time.perf_counter(), 0, 0
        if guard.due(done):
            guard.take_snapshot(done, trainable_state())
        if done < cfg.iters and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save(done)
        if done < cfg.iters and cfg.eval_every and done % cfg.eval_every == 0:
            metrics = run_eval(done)
            if main:
                bar.write(f"iteration {done}: " + "  ".join(f"{t} AP {m['AP']:.4f}" for t, m in metrics.items()))
    bar.close()

    final_state = save(cfg.iters) if start_iter < cfg.iters else None
    metrics = run_eval(cfg.iters)
    if main:
        if final_state is None:  # resumed a finished run: its newest checkpoint is the final state
            final_state = found[1]
        manager.save_final({**final_state, "metrics": metrics})
        # The weights alone, loadable without pickle by any tool; the header says how to rebuild the model.
        export_weights(model, out / "model_final.safetensors", metadata={
            "model_spec": json.dumps(spec), "label_to_cat_id": json.dumps(label_to_cat_id),
            "class_names": json.dumps(list(class_names))})
        # The loss terms are in metrics.jsonl and TensorBoard; the picture keeps to the overview.
        keys = ["loss", "lr", "bbox_AP"] + (["segm_AP"] if masks else [])
        plot_curves(metrics_log.path, out / "loss_curve.png", keys)
        _prediction_grid(model, val_set, cfg.vis_images, device, class_names, cfg.vis_score_thresh,
                         out / "val_predictions.png")
    metrics_log.close()
    barrier()
    return metrics if metrics is not None else {}


def _restore_trainable(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler | None) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])


def load_start_weights(model: nn.Module, pretrained: str | Path | None = None, weights: str | Path | None = None,
                       verbose: bool = True) -> None:
    """Load the weights a run starts from: ``pretrained`` into the backbone body, then a full detector ``weights``.

    ``pretrained``: a torchvision/timm ImageNet checkpoint or our classification ``model_final.pth``
    (``backbones.load_weights``; the classifier is dropped). ``weights``: our or torchvision's
    detector checkpoint (``heads.load_weights``; with another class count the class-specific
    predictor layers keep their initial values, with a warning).
    """
    if pretrained is not None:
        result = backbones.load_weights(model.backbone, pretrained)
        if verbose:
            logger.info("loaded backbone weights from %s%s", pretrained,
                        f" (not loaded: {len(result.skipped_keys)} classifier/unused keys)" if result.skipped_keys else "")
    if weights is not None:
        result = heads.load_weights(model, weights)
        if verbose:
            logger.info("loaded detector weights from %s%s", weights,
                        " (class-specific predictor skipped: other class count)" if result.skipped_keys else "")


def run_from_args(config: str | Path | None, overrides: dict[str, Any], resume: bool = False,
                  eval_only: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Build the config (logging schedule changes), then train or, with ``eval_only``, evaluate; the body of
    ``tools/train_det.py``.

    ``config=None`` with a dataset in ``overrides`` chooses the recipe's length, image sizes and RoI
    budget from the training set (:func:`tools.engine.auto_recipe.det_recipe`); given flags win.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config is None and given.get("train_ann") is not None and not eval_only:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        values, reasons = det_recipe(det_data_stats(given["train_ann"]),
                                     given.get("batch_size", DetTrainConfig.batch_size), world_size)
        for key, reason in reasons.items():
            if key not in given:
                logger.info("recipe from the data (--config to choose one): %s", reason)
        overrides = {**values, **given}
    cfg, messages = build_config(config, overrides)
    for m in messages:
        logger.info(m)
    if eval_only:
        # Only flags given explicitly override what the checkpoint says about its model.
        given = {k: v for k, v in overrides.items() if v is not None}
        model_overrides = {"kind": given.get("detector"), "backbone": given.get("backbone"),
                           "variant": given.get("variant")}
        if "min_sizes" in given:
            model_overrides["min_size"] = max(given["min_sizes"])
        if "max_size" in given:
            model_overrides["max_size"] = given["max_size"]
        return evaluate_config(cfg, model_overrides)
    return train(cfg, resume=resume, overwrite=overwrite)


def evaluate_config(cfg: DetTrainConfig, model_overrides: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """``--eval-only``: evaluate a checkpoint on the recipe's validation set and write the results.

    The model is rebuilt from the checkpoint (:func:`load_detector`; ``model_overrides`` replace
    what it says). The weights are ``cfg.weights`` when given, else ``OUTPUT_DIR/model_final.pth``, else the newest
    checkpoint in ``OUTPUT_DIR``. Writes ``coco_results.json`` and ``metrics.json`` there.
    """
    out = Path(cfg.output_dir)
    weights: Path | None = Path(cfg.weights) if cfg.weights else None
    if weights is None:
        weights = out / "model_final.pth" if (out / "model_final.pth").is_file() else CheckpointManager(out).latest()
    if weights is None:
        raise ValueError(f"--eval-only needs --weights or a checkpoint in {out}")
    paths = _dataset_paths(cfg)
    return evaluate_checkpoint(weights, paths["val_images"], paths["val_ann"], out, model_overrides,
                               device=cfg.device, batch_size=cfg.batch_size, workers=cfg.workers,
                               allow_outside_root=cfg.allow_outside_root)


# ----------------------------------------------------------------------------- checkpoints -> models


def _spec_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """What a checkpoint without a ``model_spec`` (e.g. torchvision's COCO files) shows of its model."""
    spec: dict[str, Any] = {}
    if "roi_heads.box_predictor.cls_score.weight" in state:
        spec["num_classes"] = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    spec["kind"] = "mask_rcnn" if any(k.startswith("roi_heads.mask_") for k in state) else "faster_rcnn"
    # v1's box head is two FC layers (fc6, fc7); v2's is four convs then one FC.
    spec["variant"] = "v1" if "roi_heads.box_head.fc6.weight" in state else "v2"
    return spec


def load_detector(
    weights: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[heads.FasterRCNN, dict[str, Any]]:
    """Rebuild a detector from a checkpoint and load its weights; returns ``(model_in_eval_mode, info)``.

    Our checkpoints carry their ``model_spec`` (``model_final.safetensors`` in its header); for
    others (torchvision's COCO detectors) the
    kind, variant and class count are read from the weights and the backbone defaults to
    resnet50. ``overrides`` (``kind``, ``backbone``, ``variant``, ``num_classes``, ``min_size``,
    ``max_size``; ``None`` values ignored) replace what the checkpoint says.

    ``info`` holds ``model_spec``, ``label_to_cat_id`` (``None`` when the checkpoint has none)
    and ``class_names`` (torchvision's COCO names for a 91-class model without names).
    """
    raw = load_checkpoint(weights)
    if Path(weights).suffix == ".safetensors":  # flat weights; what rebuilds the model is in the header
        raw = {**load_metadata(weights), "model": raw}
    try:
        state = backbones.read_checkpoint(raw)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    stored = raw.get("model_spec")
    if stored is not None:
        if not isinstance(stored, dict):
            raise ValueError(f"{weights}: model_spec must be a mapping, got {type(stored).__name__}")
        spec = dict(stored)
        if isinstance(spec.get("backbone_options"), dict) and "checkpoint" in spec["backbone_options"]:
            # TimmBackbone's ImageNet weights file, used when the run started: this checkpoint's weights replace
            # them, so the file is not read (nor need it exist here).
            spec["backbone_options"] = {k: v for k, v in spec["backbone_options"].items() if k != "checkpoint"}
    else:
        spec = {"kind": "faster_rcnn", "backbone": "resnet50", "num_classes": 91, "variant": "v1",
                "pretrained_backbone": True, "backbone_options": {}, "fpn_options": {}, "options": {}}
        spec.update(_spec_from_state(state))
    for key in ("kind", "backbone", "variant", "num_classes"):
        if key in overrides:
            spec[key] = overrides[key]
    try:
        spec = check_model_spec(spec)  # the same rules as a config's: a spec is data, never a way to load files
    except ValueError as e:
        raise ValueError(f"{weights}: model spec: {e}") from None
    if "min_size" in overrides:
        spec["options"]["min_size"] = (int(overrides["min_size"]),)
    if "max_size" in overrides:
        spec["options"]["max_size"] = int(overrides["max_size"])
    mapping, class_names = raw.get("label_to_cat_id"), raw.get("class_names")
    try:
        mapping = {int(k): int(v) for k, v in mapping.items()} if mapping else None
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{weights}: label_to_cat_id must map labels to category ids, got {str(mapping)[:100]}"
                         ) from None
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
        raise ValueError(f"{weights}: class_names must be a list of strings, got {str(class_names)[:100]}")
    try:
        model = build_model(spec)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    try:
        heads.load_weights(model, state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model.eval()
    if class_names is None and spec["num_classes"] == 91:
        class_names = list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][1:])
    return model, {"model_spec": spec, "label_to_cat_id": mapping, "class_names": class_names}


def _for_inference(model: nn.Module, bf16: bool, compile: bool) -> nn.Module:
    """The eval-mode model as is (already folding its norms on the fly, channels_last), or, with ``bf16`` or
    ``compile``, its :func:`backbones.optimize_for_inference` copy (bf16 where the device has it natively)."""
    if not (bf16 or compile):
        return model
    return backbones.optimize_for_inference(model, bf16=bf16, compile=compile)


def _label_mapping(info: dict[str, Any], dataset: CocoDetection) -> dict[int, int]:
    """Label -> category id: the checkpoint's, else torchvision's COCO numbering (label = id), else the dataset's."""
    if info["label_to_cat_id"] is not None:
        mapping = info["label_to_cat_id"]
    elif info["model_spec"]["num_classes"] == 91:
        mapping = {label: label for label in range(1, 91)}
        logger.info("checkpoint has no label map; 91 classes: using torchvision's COCO numbering (label = id)")
    else:
        mapping = dataset.label_to_cat_id
        logger.info("checkpoint has no label map; using the dataset's categories in id order")
    unknown = sorted(set(mapping.values()) - set(dataset.cat_ids))
    if unknown and info["model_spec"]["num_classes"] != 91:
        raise ValueError(f"the checkpoint's category ids {unknown} are not in the dataset (ids {dataset.cat_ids})")
    return {label: cat for label, cat in mapping.items() if cat in dataset.coco.cats}


def evaluate_checkpoint(
    weights: str | Path,
    val_images: str | Path,
    val_ann: str | Path,
    output_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    device: str | None = None,
    batch_size: int = 2,
    workers: int = 2,
    allow_outside_root: bool = False,
    bf16: bool = False,
    compile: bool = False,
) -> dict[str, dict[str, float]]:
    """Evaluate a detector checkpoint on a COCO set; prints the table, writes ``coco_results.json`` and ``metrics.json``.

    Detections whose class the dataset lacks (a COCO model on a subset) are left out.
    ``allow_outside_root``: accept annotation ``file_name``s that are absolute or leave ``val_images``.
    ``bf16`` / ``compile``: run through :func:`backbones.optimize_for_inference` with those options.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_detector(weights, overrides)
    model = _for_inference(model.to(dev), bf16, compile)
    masks = model.roi_heads.has_mask()
    val_set = CocoDetection(val_images, val_ann, None, with_masks=masks, allow_outside_root=allow_outside_root)
    mapping = _label_mapping(info, val_set)
    loader = build_det_loader(val_set, batch_size, train=False, workers=workers)
    model.eval()
    results: list[dict] = []
    with torch.no_grad():
        for images, targets in loader:
            outputs = model([img.to(dev) for img in images])
            outputs = [_keep_labels(o, mapping) for o in outputs]
            results += detections_to_coco_results(outputs, [t["image_id"] for t in targets], mapping)
    metrics = evaluate_coco(val_set.coco, results, ("bbox", "segm") if masks else ("bbox",))
    _write_eval(Path(output_dir), metrics, results)
    return metrics


def _keep_labels(output: dict[str, Tensor], mapping: dict[int, int]) -> dict[str, Tensor]:
    keep = torch.tensor([int(label) in mapping for label in output["labels"].tolist()], dtype=torch.bool)
    return {k: v[keep.to(v.device)] for k, v in output.items()}


def score_results_file(results: str | Path, val_ann: str | Path, output_dir: str | Path,
                       allow_outside_root: bool = False) -> dict[str, dict[str, float]]:
    """Score an existing COCO results file: ``bbox``, plus ``segm`` when every result has a segmentation.

    The ground truth goes through the same checks as in training (:class:`CocoDetection`).
    Prints the table and writes ``OUTPUT_DIR/metrics.json``.
    """
    entries = load_results(results)
    segm = results_have_segm(entries)
    gt = CocoDetection(Path(val_ann).parent, val_ann, None, with_masks=segm, allow_outside_root=allow_outside_root)
    try:
        if segm:
            check_result_masks(entries, gt.coco)
        metrics = evaluate_coco(gt.coco, entries, ("bbox", "segm") if segm else ("bbox",))
    except ValueError as e:
        raise ValueError(f"{results}: {e}") from None
    write_metrics(Path(output_dir) / "metrics.json", metrics)
    return metrics


def infer_images(
    weights: str | Path,
    images: Sequence[str | Path],
    output_dir: str | Path,
    score_thresh: float = 0.5,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    bf16: bool = False,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Run a detector on image files; writes ``OUTPUT_DIR/<stem>.png`` (detections drawn) and ``detections.json``.

    Returns the JSON content: per image ``{"image", "output", "detections": [{"box" (xyxy),
    "score", "label", "category_id", "category_name"}]}`` for detections scoring ``>= score_thresh``.
    ``bf16`` / ``compile``: run through :func:`backbones.optimize_for_inference` with those options.

    Nothing that exists is ever written over, inputs included: a name already taken (by an input
    inside ``OUTPUT_DIR``, an earlier run's output, another image of the same name) gets the first
    free suffix, ``<stem>_1.png``, ``<stem>_2.png``, ... (``detections_1.json``, ...); each record's
    ``"output"`` and the returned list say which file is whose.
    """
    if not 0.0 <= score_thresh <= 1.0:
        raise ValueError(f"score_thresh must be in [0, 1], got {score_thresh}")
    if not images:
        raise ValueError("no images given")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, info = load_detector(weights, overrides)
    model = _for_inference(model.to(dev), bf16, compile)
    names = info["class_names"]
    mapping = info["label_to_cat_id"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for image_path in images:
        image_path = Path(image_path)
        image = load_rgb_image(image_path)
        with torch.no_grad():
            det = model([image.to(dev)])[0]
        keep = det["scores"] >= score_thresh
        det = {k: v[keep].cpu() for k, v in det.items()}
        png = _new_file(out, image_path.stem, ".png")
        save_grid([draw_detections(image, det, names, score_thresh)], png)
        detections = []
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            detections.append({
                "box": [round(v, 2) for v in box],
                "score": round(score, 4),
                "label": int(label),
                "category_id": (mapping or {}).get(int(label), int(label)),
                "category_name": names[label - 1] if names and 0 < label <= len(names) else str(label),
            })
        records.append({"image": str(image_path), "output": str(png), "detections": detections})
    _new_file(out, "detections", ".json").write_text(json.dumps(records, indent=2) + "\n")
    return records


def _new_file(folder: Path, stem: str, suffix: str) -> Path:
    """Create and return ``folder/<stem><suffix>``, or the first of ``<stem>_1<suffix>``, ... that does not exist.

    Created with O_EXCL, so an existing file (an input, an earlier run's output) or a link is never written
    through, even if it appears while the names are tried.
    """
    path, k = folder / f"{stem}{suffix}", 0
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            k += 1
            path = folder / f"{stem}_{k}{suffix}"
