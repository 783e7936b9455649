"""ImageNet-style classification training and evaluation for the ``backbones`` ResNets.

:class:`ClsTrainConfig` is the recipe (YAML files in ``configs/cls/``); :func:`train` runs it:
ImageFolder data with timm transforms / Mixup-CutMix, timm optimizer, scheduler and EMA,
DDP via torchrun, AMP, channels_last, atomic resumable checkpoints, metrics, curves.

Resume is exact: a run killed at any point and restarted with ``resume=True`` ends with
bit-identical weights to an uninterrupted run (CPU, same seed, ``workers=0``; with workers
it is exact when resuming from an epoch-end checkpoint). This holds because the data order
is a function of (seed, epoch), the DataLoader has its own generator reseeded per epoch,
and the python/numpy/torch RNG states (which drive augmentation, Mixup and drop-path) are
saved in every checkpoint.

Example::

    cfg = load_config(ClsTrainConfig, "configs/cls/shapes.yaml", {"output_dir": "out/shapes"})
    results = train(cfg)            # {"top1": 0.93, "top5": 1.0}
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data.dataloader import default_collate
from torchvision.datasets import ImageFolder

import backbones
from tools.engine.auto_recipe import cls_data_stats, cls_recipe
from tools.engine.checkpoint import (
    CheckpointManager,
    export_weights,
    get_rng_state,
    load_checkpoint,
    load_metadata,
    restore_training_state,
)
from tools.engine.config import (
    bounds,
    check_options,
    config_to_dict,
    ema_decay_for_run,
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
from tools.engine.images import read_rgb_image
from tools.engine.logger import MetricLogger, progress
from tools.engine.plots import plot_curves
from tools.engine.recovery import DivergenceGuard
from tools.engine.samplers import ShardSampler
from tools.engine.train_utils import (
    AmpSettings,
    autocast,
    backward_and_step,
    resolve_amp,
    seed_everything,
)

__all__ = [
    "ClsTrainConfig",
    "build_config",
    "build_model",
    "check_model_options",
    "build_datasets",
    "evaluate",
    "evaluate_checkpoint",
    "check_layout",
    "collate_skipping_none",
    "train",
    "EXPECTED_LAYOUT",
]

logger = logging.getLogger(__name__)

EXPECTED_LAYOUT = "DIR/train/<class_name>/<image>.jpg and DIR/val/<class_name>/<image>.jpg (torchvision ImageFolder)"

# timm names of torch optimizers with a fused kernel (CPU and CUDA). On CPU the fused AdamW step of a
# half-width ResNet-18 takes 5 ms instead of 26 ms for the default per-tensor loop (about 13% of a
# training step at 48 px); fused SGD 4 ms instead of 12 ms.
_FUSED_OPTIMIZERS = frozenset({"sgd", "nesterov", "momentum", "adam", "adamw"})


@dataclass
class ClsTrainConfig:
    """A classification recipe. Every field can be set in YAML; the CLI overrides some.

    ``batch_size`` is per process; the learning rate follows the linear scaling rule
    ``base_lr * batch_size * world_size / base_batch_size`` unless ``lr`` is given.
    Epoch-valued schedule fields (``decay_milestones``, ``warmup_epochs``) are applied
    per iteration (timm schedulers with ``step_on_epochs=False``).
    """

    # Model: a ``backbones`` factory name; ``model_options`` go to it as keyword arguments
    # (e.g. ``{deep_stem: true, avg_down: true}`` for ResNet-D, ``drop_path_rate: 0.05``).
    model: str = "resnet50"
    model_options: dict = field(default_factory=dict)
    # Data: ``None`` = the built-in synthetic shapes set.
    data: str | None = None
    image_size: int = field(default=224, metadata=bounds(ge=1))  # evaluation crop
    train_image_size: int | None = field(default=None, metadata=bounds(ge=1))  # None = image_size (FixRes: lower)
    crop_pct: float = field(default=0.875, metadata=bounds(gt=0, le=1))  # eval: resize to size / crop_pct, crop
    crop_scale: tuple[float, float] = field(default=(0.08, 1.0), metadata=bounds(gt=0, le=1))  # RandomResizedCrop
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    hflip: float = field(default=0.5, metadata=bounds(ge=0, le=1))
    color_jitter: float = field(default=0.0, metadata=bounds(ge=0))
    auto_augment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    re_prob: float = field(default=0.0, metadata=bounds(ge=0, le=1))  # random erasing probability
    mixup: float = field(default=0.0, metadata=bounds(ge=0))  # mixup alpha (0 = off)
    cutmix: float = field(default=0.0, metadata=bounds(ge=0))  # cutmix alpha (0 = off)
    label_smoothing: float = field(default=0.0, metadata=bounds(ge=0, lt=1))
    workers: int = field(default=4, metadata=bounds(ge=0))
    skip_bad_images: bool = False  # False: stop at the first unreadable image, naming it
    # Optimisation
    epochs: int = field(default=90, metadata=bounds(ge=1))
    batch_size: int = field(default=32, metadata=bounds(ge=1))
    lr: float | None = field(default=None, metadata=bounds(gt=0))  # explicit lr: used as is, no scaling
    base_lr: float = field(default=0.1, metadata=bounds(gt=0))
    base_batch_size: int = field(default=256, metadata=bounds(ge=1))
    lr_scaling: Literal["linear", "sqrt"] = "linear"  # how lr follows the total batch size
    optimizer: str = "momentum"  # timm name: "momentum" = SGD with momentum; "sgd" in timm is Nesterov
    momentum: float = field(default=0.9, metadata=bounds(ge=0, lt=1))
    weight_decay: float = field(default=1e-4, metadata=bounds(ge=0))
    no_weight_decay_norm_bias: bool = False
    sched: Literal["multistep", "cosine"] = "multistep"
    decay_milestones: tuple[int, ...] = field(default=(30, 60, 80), metadata=bounds(ge=0))  # epochs (multistep)
    decay_rate: float = field(default=0.1, metadata=bounds(gt=0))
    warmup_epochs: int = field(default=0, metadata=bounds(ge=0))
    warmup_lr: float = field(default=1e-6, metadata=bounds(ge=0))
    min_lr: float = field(default=0.0, metadata=bounds(ge=0))
    clip_grad_norm: float | None = field(default=None, metadata=bounds(gt=0))  # None = no clipping
    # Divergence (tools.engine.recovery): a NaN/inf loss, or one above spike_factor x the recent median,
    # rolls back to the last good state at half the lr, up to max_recoveries times; then the run stops.
    max_recoveries: int = field(default=3, metadata=bounds(ge=0))
    spike_factor: float | None = field(default=10.0, metadata=bounds(gt=1))
    ema: bool = False
    ema_decay: float = field(default=0.9999, metadata=bounds(gt=0, lt=1))
    # Runtime
    device: Literal["cpu", "cuda"] | None = None  # None = cuda when available
    amp: bool = False
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    channels_last: bool = False
    sync_bn: bool = False
    seed: int = field(default=0, metadata=bounds(ge=0, le=2**32 - 1))
    output_dir: str = "output/cls"
    keep_last: int | None = field(default=3, metadata=bounds(ge=1))
    checkpoint_period: int | None = field(default=None, metadata=bounds(ge=1))  # also every N iterations
    dist_timeout_s: float = field(default=1800.0, metadata=bounds(gt=0, le=1e9))


def build_config(
    config_path: str | Path | None, overrides: dict[str, Any] | None = None
) -> tuple[ClsTrainConfig, list[str]]:
    """Load a recipe and apply overrides; returns ``(config, messages)``.

    When ``overrides`` changes ``epochs`` from the recipe's, the multistep milestones and the
    warmup are moved to keep their fraction of the run (:func:`rescale_schedule`), and a
    message says so.
    """
    recipe = load_config(ClsTrainConfig, config_path)
    cfg = load_config(ClsTrainConfig, config_path, overrides)
    messages = []
    if cfg.epochs != recipe.epochs:
        steps, warmup = rescale_schedule(recipe.epochs, recipe.decay_milestones, recipe.warmup_epochs, cfg.epochs,
                                         warmup_floor=1)
        if "decay_milestones" not in (overrides or {}) and cfg.sched == "multistep":
            cfg = dataclasses.replace(cfg, decay_milestones=steps)
            messages.append(f"epochs {recipe.epochs} -> {cfg.epochs}: lr decays moved to epochs {list(steps)}")
        if "warmup_epochs" not in (overrides or {}) and warmup != cfg.warmup_epochs:
            cfg = dataclasses.replace(cfg, warmup_epochs=warmup)
            messages.append(f"epochs {recipe.epochs} -> {cfg.epochs}: warmup {recipe.warmup_epochs} -> {warmup} epochs "
                            "(at least 1 or a quarter of the run, at most the recipe's)")
    messages.append(f"schedule: {cfg.epochs} epochs, {cfg.sched}, warmup {cfg.warmup_epochs} epochs"
                    + (f", lr x{cfg.decay_rate:g} at epochs {list(cfg.decay_milestones)}"
                       if cfg.sched == "multistep" else ""))
    try:
        check_model_options(cfg.model, cfg.model_options)
    except ValueError as e:  # model_options come from the recipe file only
        raise ValueError(f"{config_path}: {e}" if config_path and cfg.model_options else str(e)) from None
    return cfg, messages


def check_model_options(name: Any, options: Any) -> dict[str, Any]:
    """``options`` for the ``backbones`` factory ``name``, checked (from a config or a checkpoint): its keys must be
    keyword parameters of ``backbones.ResNet`` (read from its signature; ``out_features`` would make it no
    classifier), its values of their types. ValueError naming the key and listing the valid ones otherwise."""
    if not isinstance(name, str) or name not in backbones.FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(backbones.FACTORIES)}")
    hints = keyword_hints(backbones.ResNet, exclude=("depth", "num_classes", "out_features"))
    return check_options({} if options is None else options, hints, "model_options")


def build_model(name: str, num_classes: int, options: dict[str, Any] | None = None) -> nn.Module:
    """A ``backbones`` classifier by factory name, e.g. ``build_model("resnet50", 1000, {"deep_stem": True})``.

    ``options`` are checked by :func:`check_model_options`."""
    options = check_model_options(name, options)
    try:
        return backbones.FACTORIES[name](num_classes=num_classes, **options)
    except TypeError as e:  # e.g. groups for a ResNeXt factory, which sets it itself
        raise ValueError(f"cannot build {name} with model_options {options}: {e}") from None


# ----------------------------------------------------------------------------- data


class _CheckedImageFolder(ImageFolder):
    """ImageFolder that reads every pixel format (:func:`tools.engine.images.read_rgb_image`) and names
    unreadable images in a ValueError, or yields ``None`` for them when skipping."""

    def __init__(self, root: str | Path, transform: Any, skip_bad_images: bool) -> None:
        super().__init__(str(root), transform=transform, loader=read_rgb_image)
        self.skip_bad_images = skip_bad_images

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, ValueError) as e:  # read_rgb_image names the file
            if self.skip_bad_images:
                logger.warning("skipping unreadable image %s: %s", path, e)
                return None
            raise ValueError(f"{e}. Fix or delete it, or pass --skip-bad-images") from None
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def collate_skipping_none(
    batch: list[tuple[Tensor, int] | None], min_images: int = 2
) -> tuple[Tensor | None, Tensor | None, int]:
    """``(images, targets, number of skipped images)``; images is None if the whole batch was skipped.

    A batch that skipping shrank below ``min_images`` is skipped whole (its images counted as skipped):
    training BatchNorm fails on a batch of one image once the feature maps are 1x1. Evaluation passes 1.
    """
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if skipped and len(good) < min_images:
        good, skipped = [], len(batch)
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)
    return images, targets, skipped


def _image_folder(root: Path, transform: Any, skip_bad_images: bool) -> _CheckedImageFolder:
    try:
        return _CheckedImageFolder(root, transform, skip_bad_images)
    except FileNotFoundError as e:  # ImageFolder: no class folders, or no images in them
        raise ValueError(f"bad dataset folder {root}: {e}. Expected layout: {EXPECTED_LAYOUT}") from None


def check_layout(data: str | Path) -> tuple[Path, Path]:
    """``(DIR/train, DIR/val)`` after checking both exist; ``ValueError`` naming the expected layout otherwise."""
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"data folder {root} has no {' or '.join(missing)} folder. Expected layout: {EXPECTED_LAYOUT}")
    return root / "train", root / "val"


def build_transforms(cfg: ClsTrainConfig) -> tuple[Any, Any]:
    """``(train_transform, eval_transform)`` from timm's ``create_transform``."""
    train_size = cfg.train_image_size or cfg.image_size
    train_tf = create_transform(
        train_size,
        is_training=True,
        scale=tuple(cfg.crop_scale),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter if cfg.color_jitter > 0 else None,
        auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation,
        re_prob=cfg.re_prob,
    )
    eval_tf = create_transform(
        cfg.image_size, is_training=False, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation
    )
    return train_tf, eval_tf


def build_datasets(data: str | Path, cfg: ClsTrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """``(train_set, val_set, class_names)`` from ``DIR/train`` and ``DIR/val``; checks the layout."""
    train_dir, val_dir = check_layout(data)
    train_tf, eval_tf = build_transforms(cfg)
    train_set = _image_folder(train_dir, train_tf, cfg.skip_bad_images)
    val_set = _image_folder(val_dir, eval_tf, cfg.skip_bad_images)
    if train_set.classes != val_set.classes:
        raise ValueError(
            f"train and val class folders differ: train {train_set.classes}, val {val_set.classes}. "
            f"Expected layout: {EXPECTED_LAYOUT}"
        )
    return train_set, val_set, list(train_set.classes)


class _ResumableSampler(DistributedSampler):
    """DistributedSampler (order = function of seed and epoch) that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return super().__len__() - self.start_index


def _eval_loader(dataset: Dataset, batch_size: int, workers: int, rank: int, world_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers,
        collate_fn=functools.partial(collate_skipping_none, min_images=1),
        # Own generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(0),
    )


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: AmpSettings = AmpSettings(None, False),
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1 and top-k accuracy (fractions; k = min(5, classes)) over ``loader``, summed over all ranks.

    The loader yields ``(images, targets, skipped)`` as built by this module. Returns
    ``{"top1", "top5", "num_images", "skipped_images"}``.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = count = skipped = 0
    for images, targets, n_skipped in loader:
        skipped += n_skipped
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        k = min(5, logits.shape[1])
        topk = logits.float().topk(k, dim=1).indices
        hits = topk == targets[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        count += len(targets)
        crash_point("eval")  # test hook (tools.engine.faults)
    model.train(was_training)
    totals = [sum(x) for x in zip(*all_gather_object((correct1, correct5, count, skipped)))]
    correct1, correct5, count, skipped = totals
    if count == 0:
        raise ValueError("evaluation saw no images (all unreadable or an empty val set)")
    return {"top1": correct1 / count, "top5": correct5 / count, "num_images": count, "skipped_images": skipped}


def evaluate_checkpoint(
    weights: str | Path,
    data: str | Path,
    model: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
    workers: int = 4,
    use_ema: bool = False,
    crop_pct: float | None = None,
    interpolation: Literal["bilinear", "bicubic"] | None = None,
) -> dict[str, float]:
    """Top-1/top-5 of a checkpoint on ``DIR/val`` (or ``DIR`` itself when it holds the class folders).

    ``weights`` is one of ours (``model_final.pth`` or a training checkpoint: model name,
    options, classes and image size are read from it) or a torchvision/timm ImageNet
    checkpoint (``.pth``/``.safetensors``, read by ``backbones.load_weights``; pass ``model``).
    ``image_size``, ``crop_pct`` and ``interpolation`` default to the values stored in our
    checkpoints, else 224 / 0.875 / bilinear (torchvision's ImageNet evaluation).
    """
    state = load_checkpoint(weights)
    if Path(weights).suffix == ".safetensors":  # flat weights; ours name their model in the header
        state = {**load_metadata(weights), "model": state}
    # What the checkpoint says about its model and evaluation goes through the config's checks first.
    stored = {key: state.get(source) for key, source in (("model", "model_name"), ("model_options", "model_options"),
              ("image_size", "image_size"), ("crop_pct", "crop_pct"), ("interpolation", "interpolation"))}
    stored = {key: value for key, value in stored.items() if value is not None}
    checked = load_config(ClsTrainConfig, None, stored, overrides_name=f"{weights} (stored settings)")
    name = model or stored.get("model")
    if name is None:
        raise ValueError(f"{weights} does not name its model; pass --model (one of {sorted(backbones.FACTORIES)})")
    try:
        options = check_model_options(name, checked.model_options)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if use_ema:
        if not isinstance(state.get("model_ema"), dict):
            raise ValueError(f"{weights} holds no EMA weights (train with ema: true)")
        weights_state = state["model_ema"]
    else:
        weights_state = state
    try:
        flat = backbones.read_checkpoint(weights_state)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if "fc.weight" not in flat:
        raise ValueError(f"{weights} has no classifier (fc.weight); it cannot be evaluated as a classifier")
    num_classes = flat["fc.weight"].shape[0]
    cfg = load_config(ClsTrainConfig, None, {
        "image_size": image_size or checked.image_size, "crop_pct": crop_pct or checked.crop_pct,
        "interpolation": interpolation or checked.interpolation}, overrides_name="evaluation settings")

    root = Path(data)
    val_dir = root / "val" if (root / "val").is_dir() else root
    if not val_dir.is_dir():
        raise ValueError(f"data folder {root} does not exist. Expected layout: {EXPECTED_LAYOUT}")
    val_set = _image_folder(val_dir, build_transforms(cfg)[1], skip_bad_images=False)
    if len(val_set.classes) != num_classes:
        raise ValueError(f"{weights} has {num_classes} classes but {val_dir} has {len(val_set.classes)} class folders")
    saved_classes = state.get("class_names")
    if saved_classes is not None and (not isinstance(saved_classes, list) or saved_classes != val_set.classes):
        raise ValueError(f"class folders {val_set.classes} differ from the checkpoint's classes {saved_classes!r}")

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_model(name, num_classes, options)
    try:
        backbones.load_weights(net, flat)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    net.to(dev)
    loader = _eval_loader(val_set, batch_size, workers, 0, 1)
    return evaluate(net, loader, dev)


# ----------------------------------------------------------------------------- training


def _criterion(cfg: ClsTrainConfig) -> nn.Module:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()  # Mixup makes the (smoothed) soft targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def _ema_weights(ema: ModelEmaV3) -> dict[str, Tensor]:
    return ema.module.state_dict()


def train(cfg: ClsTrainConfig, *, resume: bool = False, overwrite: bool = False,
          criterion: nn.Module | None = None) -> dict[str, float]:
    """Run the recipe ``cfg``; returns the final ``{"top1", "top5"}`` (plus ``ema_top1/ema_top5``).

    Writes to ``cfg.output_dir``: ``config.yaml``, ``model_{iter:07d}.pth`` checkpoints (every
    epoch and every ``checkpoint_period`` iterations), ``metrics.jsonl`` (one line per epoch),
    TensorBoard events, ``metrics.json``, ``curves.png`` and ``model_final.pth`` (``{"model":
    state_dict, "model_name", "model_options", "class_names", ...}``, loadable by
    ``backbones.load_weights``).

    Args:
        cfg: the recipe.
        resume: continue from the newest checkpoint in ``cfg.output_dir`` that loads. Always on
            in a worker group restarted by ``torchrun --max-restarts``.
        criterion: loss module overriding the one the recipe implies.

    Raises:
        FloatingPointError: the loss became NaN/inf or exploded after ``max_recoveries`` roll-backs
            (:mod:`tools.engine.recovery`; the message names the iteration); the checkpoints written
            before stay as they are.
        ValueError: bad data layout, unknown model, impossible settings.
    """
    info = init_distributed(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"), cfg.dist_timeout_s)
    if is_elastic_restart() and not resume:
        logger.info("torchrun restarted the workers: resuming from the newest checkpoint in %s", cfg.output_dir)
        resume = True
    try:
        return _train(cfg, info, resume, overwrite, criterion)
    finally:
        cleanup()


def _train(cfg: ClsTrainConfig, info: Any, resume: bool, overwrite: bool,
           criterion: nn.Module | None) -> dict[str, float]:
    main = is_main_process()
    device = info.device
    out = Path(cfg.output_dir)
    seed_everything(cfg.seed + info.rank)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")

    if cfg.data is None:
        from tools.engine.shapes import default_shapes_imagefolder

        data_root = default_shapes_imagefolder() if main else None
        barrier()  # the main process generates the set once; the others wait, then read it
        data_root = data_root or default_shapes_imagefolder()
    else:
        data_root = Path(cfg.data)
    train_set, val_set, class_names = build_datasets(data_root, cfg)

    model = build_model(cfg.model, len(class_names), cfg.model_options)
    if cfg.sync_bn and info.enabled:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA: torch's SyncBatchNorm runs only on GPU modules; drop --sync-bn on CPU")
        model = convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last or info.enabled:
        # DDP's gradient buckets must have the gradients' layout, and backbones.ResNet computes in
        # channels_last (so its weight gradients are channels_last): keep the weights in that layout too.
        model.to(memory_format=torch.channels_last)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = _ResumableSampler(train_set, info.world_size, info.rank, cfg.seed)
    loader_gen = torch.Generator()
    train_loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate_skipping_none,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=loader_gen,
    )
    iters_per_epoch = len(sampler) // cfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(
            f"training set of {len(train_set)} images is smaller than one batch "
            f"({cfg.batch_size} per process x {info.world_size} processes); lower --batch-size"
        )
    val_loader = _eval_loader(val_set, cfg.batch_size, cfg.workers, info.rank, info.world_size)

    lr, lr_message = scale_lr(cfg.base_lr, cfg.base_batch_size, cfg.batch_size * info.world_size, cfg.lr,
                              cfg.lr_scaling)
    if lr_message and main:
        logger.info(lr_message)
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=cfg.no_weight_decay_norm_bias,
        **({"fused": True} if cfg.optimizer.lower() in _FUSED_OPTIMIZERS else {}),
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        decay_milestones=list(cfg.decay_milestones),
        decay_rate=cfg.decay_rate,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=iters_per_epoch,
    )
    amp = resolve_amp(device, cfg.amp, cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp.use_scaler else None
    ema = None
    if cfg.ema:
        decay = ema_decay_for_run(cfg.ema_decay, cfg.epochs * iters_per_epoch)
        if decay != cfg.ema_decay and main:
            logger.info("EMA decay %g -> %g: its time constant (1 / (1 - decay) updates) kept within a tenth of "
                        "the run's %d updates", cfg.ema_decay, decay, cfg.epochs * iters_per_epoch)
        ema = ModelEmaV3(model, decay=decay)
    guard = DivergenceGuard(cfg.max_recoveries, cfg.spike_factor)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=len(class_names),
        )
    criterion = criterion if criterion is not None else _criterion(cfg)

    manager = CheckpointManager(out, keep_last=cfg.keep_last)
    metrics = MetricLogger(out, enabled=main)
    start_epoch, start_iter, global_iter = 0, 0, 0
    loss_sum, loss_count, skipped_train = 0.0, 0, 0
    # Resume loads the weights here: a checkpoint they do not fit (another recipe's) is skipped for an older one.
    found = manager.begin(resume, overwrite, delete=main, accept=lambda state: model.load_state_dict(state["model"]))
    if resume and found is None and main:
        logger.info("resume: no checkpoint in %s, starting from scratch", out)
    if found is not None:
        path, state = found
        restore_training_state(state, optimizer, scheduler, scaler, guard, info.rank, info.world_size)
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, start_iter, global_iter = state["epoch"], state["iter_in_epoch"], state["iteration"]
        loss_sum, loss_count, skipped_train = state["loss_sum"], state["loss_count"], state["skipped_train"]
        if main:
            logger.info("resumed from %s (epoch %d, iteration %d)", path, start_epoch, global_iter)
    if main:
        save_config(cfg, out / "config.yaml")

    def trainable_state() -> dict[str, Any]:  # what a divergence rolls back
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": _ema_weights(ema) if ema is not None else None,
        }

    def checkpoint_state(epoch: int, iter_in_epoch: int) -> dict[str, Any]:
        return {
            **trainable_state(),
            "scheduler": scheduler.state_dict(),
            "divergence_guard": guard.state_dict(),
            "epoch": epoch,
            "iter_in_epoch": iter_in_epoch,
            "iteration": global_iter,
            "loss_sum": loss_sum,
            "loss_count": loss_count,
            "skipped_train": skipped_train,
            "rng": all_gather_object(get_rng_state()),  # every rank's, so each resumes its own stream
            "config": config_to_dict(cfg),
            "model_name": cfg.model,
            "model_options": dict(cfg.model_options),
            "class_names": class_names,
        }

    def save(epoch: int, iter_in_epoch: int) -> None:
        state = checkpoint_state(epoch, iter_in_epoch)  # collective: all ranks take part
        if main:
            manager.save(state, global_iter)
        if guard.healthy():
            guard.take_snapshot(global_iter, trainable_state())
        barrier()

    def restore(good: dict[str, Any]) -> None:
        model.load_state_dict(good["model"])
        optimizer.load_state_dict(good["optimizer"])
        if scaler is not None and good["scaler"]:
            scaler.load_state_dict(good["scaler"])
        if ema is not None:
            ema.module.load_state_dict(good["ema"])

    total_iters = cfg.epochs * iters_per_epoch
    bar = progress(total_iters, initial=global_iter, enabled=main, desc="train")
    results: dict[str, float] | None = None
    net.train()
    guard.take_snapshot(global_iter, trainable_state())
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        sampler.start_index = start_iter * cfg.batch_size if epoch == start_epoch else 0
        # Worker seeds come from this generator: a function of (seed, epoch, rank), never of history.
        loader_gen.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + info.rank)
        iter_in_epoch = start_iter if epoch == start_epoch else 0
        if iter_in_epoch == 0:
            loss_sum, loss_count, skipped_train = 0.0, 0, 0
        epoch_start = time.perf_counter()
        for images, targets, n_skipped in train_loader:
            skipped_train += n_skipped
            if images is not None and mixup_fn is not None and len(images) % 2:
                images, targets = images[:-1], targets[:-1]  # Mixup pairs samples; a skipped image made it odd
            if images is not None and len(images) > 0:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, targets)
                with autocast(device, amp):
                    logits = net(images)
                loss = criterion(logits.float(), targets)
                # Mean over ranks: every rank sees the same value, so all ranks recover or stop together.
                reduced = reduce_dict({"loss": loss.detach()})
                problem = guard.check(reduced, global_iter)
                if problem is None:
                    crash_point("train_step")  # test hook (tools.engine.faults); no-op unless RESDET_CRASH_AT is set
                    backward_and_step(loss, model, optimizer, scaler, cfg.clip_grad_norm)
                    loss_sum += float(reduced["loss"])
                    loss_count += 1
                else:  # roll back to the last good state at a lower lr; this batch is skipped
                    restore(guard.recover(problem, global_iter))
            global_iter += 1
            iter_in_epoch += 1
            scheduler.step_update(num_updates=global_iter)
            guard.scale_lr(optimizer)
            if ema is not None:
                ema.update(model, step=global_iter)
            if guard.due(global_iter):
                guard.take_snapshot(global_iter, trainable_state())
            bar.update()
            bar.set_postfix(
                epoch=epoch + 1,
                loss=f"{loss_sum / max(loss_count, 1):.4f}",
                lr=f"{optimizer.param_groups[0]['lr']:.2e}",
            )
            if cfg.checkpoint_period and global_iter % cfg.checkpoint_period == 0 and iter_in_epoch < iters_per_epoch:
                save(epoch, iter_in_epoch)

        results = evaluate(model, val_loader, device, amp, cfg.channels_last)
        record = {
            "epoch": epoch + 1,
            "iteration": global_iter,
            "train_loss": loss_sum / max(loss_count, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "top1": results["top1"],
            "top5": results["top5"],
            "epoch_time_s": time.perf_counter() - epoch_start,
        }
        if ema is not None:
            ema_results = evaluate(ema.module, val_loader, device, amp, cfg.channels_last)
            record.update(ema_top1=ema_results["top1"], ema_top5=ema_results["top5"])
            results.update(ema_top1=ema_results["top1"], ema_top5=ema_results["top5"])
        if skipped_train or results["skipped_images"]:
            record.update(skipped_train_images=skipped_train, skipped_val_images=results["skipped_images"])
            if main:
                logger.warning("epoch %d: skipped %d train / %d val unreadable images",
                               epoch + 1, skipped_train, results["skipped_images"])
        metrics.log(step=epoch + 1, **record)
        if main:
            bar.write(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                f"top1 {record['top1']:.4f} top5 {record['top5']:.4f}"
                + (f" ema_top1 {record['ema_top1']:.4f}" if ema is not None else "")
            )
        save(epoch + 1, 0)
    bar.close()

    if results is None:  # resumed a run that had already finished: evaluate its weights again
        results = evaluate(model, val_loader, device, amp, cfg.channels_last)
        if ema is not None:
            ema_results = evaluate(ema.module, val_loader, device, amp, cfg.channels_last)
            results.update(ema_top1=ema_results["top1"], ema_top5=ema_results["top5"])
    final = {k: float(results[k]) for k in ("top1", "top5", "ema_top1", "ema_top5") if k in results}
    if main:
        (out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        manager.save_final(
            {
                "model": model.state_dict(),
                "model_ema": _ema_weights(ema) if ema is not None else None,
                "model_name": cfg.model,
                "model_options": dict(cfg.model_options),
                "num_classes": len(class_names),
                "class_names": class_names,
                "image_size": cfg.image_size,
                "crop_pct": cfg.crop_pct,
                "interpolation": cfg.interpolation,
                "epochs": cfg.epochs,
                **final,
            }
        )
        # The weights alone, loadable without pickle; the header names the model and its eval transform.
        export_weights(model, out / "model_final.safetensors", metadata={
            "model_name": json.dumps(cfg.model), "model_options": json.dumps(dict(cfg.model_options)),
            "class_names": json.dumps(list(class_names)), "image_size": json.dumps(cfg.image_size),
            "crop_pct": json.dumps(cfg.crop_pct), "interpolation": json.dumps(cfg.interpolation)})
        keys = ["train_loss", "lr", "top1", "top5"] + (["ema_top1"] if ema is not None else [])
        plot_curves(metrics.path, out / "curves.png", keys, x_key="epoch")
    metrics.close()
    barrier()
    return final


def run_from_args(config: str | Path | None, overrides: dict[str, Any], resume: bool = False,
                  overwrite: bool = False) -> dict[str, float]:
    """Build the config (logging schedule changes) and train; the body of ``tools/train_cls.py``.

    ``config=None`` with ``data`` in ``overrides`` chooses the recipe and image size from the
    training set (:func:`tools.engine.auto_recipe.cls_recipe`); given flags win.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config is None and given.get("data") is not None:
        config, values, reasons = cls_recipe(cls_data_stats(Path(given["data"]) / "train"))
        for key, reason in reasons.items():
            if key not in given:
                logger.info("recipe from the data (--config to choose one): %s", reason)
        overrides = {**values, **given}
    cfg, messages = build_config(config, overrides)
    for m in messages:
        logger.info(m)
    return train(cfg, resume=resume, overwrite=overwrite)

