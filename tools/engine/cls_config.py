"""The classification recipe: :class:`ClsTrainConfig` (YAML files in ``configs/cls/``), read by
:func:`build_config`, and the classifier it names (:func:`build_model`).

Example::

    cfg, messages = build_config("configs/cls/shapes.yaml", {"output_dir": "out/shapes"})
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

import backbones
from backbones.options import check_options, keyword_hints
from tools.engine.config import bounds, load_config, rescale_schedule

__all__ = ["ClsTrainConfig", "build_config", "check_model_options", "build_model"]


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
    deterministic: bool = False  # torch's deterministic algorithms (see DetTrainConfig.deterministic)
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
