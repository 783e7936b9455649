"""ImageNet-style classification training for the ``backbones`` ResNets.

:func:`train` runs a :class:`tools.engine.cls_config.ClsTrainConfig` recipe through the shared
:class:`tools.engine.runner.Runner`: ImageFolder data with timm transforms / Mixup-CutMix, timm optimizer,
scheduler and EMA, DDP via torchrun, AMP, channels_last, atomic resumable checkpoints, metrics, curves.

Resume is exact: a run killed at any point and restarted with ``resume=True`` ends with
bit-identical weights to an uninterrupted run (CPU, same seed, ``workers=0``; with workers
it is exact when resuming from an epoch-end checkpoint). This holds because the data order
is a function of (seed, epoch), the DataLoader has its own generator reseeded per epoch,
and the python/numpy/torch RNG states (which drive augmentation, Mixup and drop-path) are
saved in every checkpoint.

Example::

    cfg, messages = build_config("configs/cls/shapes.yaml", {"output_dir": "out/shapes"})
    results = train(cfg)            # {"top1": ..., "top5": ...}
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from tools.engine.auto_recipe import cls_data_stats, cls_recipe, under_flags
from tools.engine.cls_config import ClsTrainConfig, build_config, build_model
from tools.engine.cls_data import build_datasets, collate_skipping_none, eval_loader
from tools.engine.cls_eval import evaluate
from tools.engine.config import ema_decay_for_run
from tools.engine.distributed import DistInfo
from tools.engine.logger import progress
from tools.engine.plots import plot_curves
from tools.engine.runner import Runner, launch, on_main_first
from tools.engine.samplers import ResumableSampler
from tools.engine.train_utils import autocast

__all__ = ["train", "run_from_args"]

logger = logging.getLogger(__name__)

# timm names of torch optimizers with a fused kernel (CPU and CUDA): one kernel for all parameters instead of
# a loop over them (BENCHMARKS.md, optimizer step).
_FUSED_OPTIMIZERS = frozenset({"sgd", "nesterov", "momentum", "adam", "adamw"})


@dataclass
class _Position:
    """Where a run is, and the running loss of the current epoch: saved in every checkpoint."""

    epoch: int = 0
    iter_in_epoch: int = 0
    iteration: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    skipped_train: int = 0

    @classmethod
    def resumed(cls, found: tuple[Path, dict[str, Any]] | None) -> _Position:
        return cls() if found is None else cls(**{f.name: found[1][f.name] for f in dataclasses.fields(cls)})

    def mean_loss(self) -> float:
        return self.loss_sum / max(self.loss_count, 1)

    def save(self, runner: Runner, task_state: dict[str, Any]) -> None:
        runner.save(self.iteration, **{k: v for k, v in dataclasses.asdict(self).items() if k != "iteration"},
                    **task_state)


def _criterion(cfg: ClsTrainConfig) -> nn.Module:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()  # Mixup makes the (smoothed) soft targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


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
        overwrite: a new run deletes another run's files in ``cfg.output_dir`` instead of refusing.
        criterion: loss module overriding the one the recipe implies.

    Raises:
        FloatingPointError: the loss became NaN/inf or exploded after ``max_recoveries`` roll-backs
            (:mod:`tools.engine.recovery`; the message names the iteration); the checkpoints written
            before stay as they are.
        ValueError: bad data layout, unknown model, impossible settings.
    """
    return launch(cfg, lambda info, resume_: _train(cfg, info, resume_, overwrite, criterion), resume)


def _train(cfg: ClsTrainConfig, info: DistInfo, resume: bool, overwrite: bool,
           criterion: nn.Module | None) -> dict[str, float]:
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    if cfg.data is None:
        from tools.engine.shapes import default_shapes_imagefolder

        data_root = on_main_first(default_shapes_imagefolder)  # the main process generates the built-in set once
    else:
        data_root = Path(cfg.data)
    train_set, val_set, class_names = build_datasets(data_root, cfg)

    runner = Runner(cfg, info, build_model(cfg.model, len(class_names), cfg.model_options))
    found = runner.find_checkpoint(resume, overwrite)
    net = runner.prepare_model()
    sampler = ResumableSampler(train_set, info.world_size, info.rank, cfg.seed)
    iters_per_epoch = len(sampler) // cfg.batch_size
    if iters_per_epoch == 0:
        raise ValueError(
            f"training set of {len(train_set)} images is smaller than one batch "
            f"({cfg.batch_size} per process x {info.world_size} processes); lower --batch-size"
        )
    optimizer, scheduler = _optimization(cfg, runner, iters_per_epoch)
    runner.start(optimizer, scheduler, found, _ema(cfg, runner, cfg.epochs * iters_per_epoch))
    position = _Position.resumed(found)
    task_state = {"model_name": cfg.model, "model_options": dict(cfg.model_options), "class_names": class_names}
    val_loader = eval_loader(val_set, cfg.batch_size, cfg.workers, info.rank, info.world_size)
    epoch_step = _EpochStep(cfg, runner, net, sampler, len(class_names), criterion or _criterion(cfg))

    bar = progress(cfg.epochs * iters_per_epoch, initial=position.iteration, enabled=runner.main, desc="train")
    results: dict[str, float] | None = None
    for epoch in range(position.epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        epoch_step(epoch, position, bar, lambda: position.save(runner, task_state))
        results = _evaluate(runner, val_loader, cfg.channels_last)
        _log_epoch(cfg, runner, bar, position, results, time.perf_counter() - epoch_start)
        position.epoch, position.iter_in_epoch = epoch + 1, 0
        position.save(runner, task_state)
    bar.close()
    if results is None:  # resumed a run that had already finished: evaluate its weights again
        results = _evaluate(runner, val_loader, cfg.channels_last)
    return _finish(cfg, runner, results, class_names)


def _optimization(cfg: ClsTrainConfig, runner: Runner, iters_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """timm's optimizer (fused where torch has a fused kernel) and per-iteration scheduler for the recipe."""
    optimizer = create_optimizer_v2(
        runner.model,
        opt=cfg.optimizer,
        lr=runner.scaled_lr(cfg.lr_scaling),
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
    return optimizer, scheduler


def _ema(cfg: ClsTrainConfig, runner: Runner, total_updates: int) -> ModelEmaV3 | None:
    """timm's weight EMA when the recipe asks for it, its decay capped to the run's length."""
    if not cfg.ema:
        return None
    decay = ema_decay_for_run(cfg.ema_decay, total_updates)
    if decay != cfg.ema_decay and runner.main:
        logger.info("EMA decay %g -> %g: its time constant (1 / (1 - decay) updates) kept within a tenth of "
                    "the run's %d updates", cfg.ema_decay, decay, total_updates)
    return ModelEmaV3(runner.model, decay=decay)


class _EpochStep:
    """One training epoch: batches in the sampler's order, resumed part-way when the position says so."""

    def __init__(self, cfg: ClsTrainConfig, runner: Runner, net: nn.Module, sampler: ResumableSampler,
                 num_classes: int, criterion: nn.Module) -> None:
        self.cfg, self.runner, self.net, self.sampler, self.criterion = cfg, runner, net, sampler, criterion
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=num_classes)
        self.generator = torch.Generator()
        self.loader = DataLoader(sampler.dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                 collate_fn=collate_skipping_none, drop_last=True,
                                 pin_memory=runner.device.type == "cuda", generator=self.generator)
        self.iters_per_epoch = len(sampler) // cfg.batch_size

    def __call__(self, epoch: int, position: _Position, bar: Any, save: Callable[[], Any]) -> None:
        cfg, runner = self.cfg, self.runner
        self.sampler.set_epoch(epoch)
        self.sampler.start_index = position.iter_in_epoch * cfg.batch_size
        # Worker seeds come from this generator: a function of (seed, epoch, rank), never of history.
        self.generator.manual_seed((cfg.seed * 1_000_003 + epoch) * 1_009 + runner.info.rank)
        if position.iter_in_epoch == 0:
            position.loss_sum, position.loss_count, position.skipped_train = 0.0, 0, 0
        position.epoch = epoch
        for images, targets, n_skipped in self.loader:
            position.skipped_train += n_skipped
            if images is not None and self.mixup is not None and len(images) % 2:
                images, targets = images[:-1], targets[:-1]  # Mixup pairs samples; a skipped image made it odd
            if images is not None and len(images) > 0:
                self._step(images, targets, position)
            position.iteration += 1
            position.iter_in_epoch += 1
            runner.after_step(position.iteration)
            bar.update()
            bar.set_postfix(epoch=epoch + 1, loss=f"{position.mean_loss():.4f}",
                            lr=f"{runner.optimizer.param_groups[0]['lr']:.2e}")
            if (cfg.checkpoint_period and position.iteration % cfg.checkpoint_period == 0
                    and position.iter_in_epoch < self.iters_per_epoch):
                save()

    def _step(self, images: torch.Tensor, targets: torch.Tensor, position: _Position) -> None:
        runner = self.runner
        images = images.to(runner.device, non_blocking=True)
        targets = targets.to(runner.device, non_blocking=True)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        reduced, stepped = runner.step(self._forward, [(images, targets)], position.iteration)
        if stepped:
            position.loss_sum += float(reduced["loss"])
            position.loss_count += 1

    def _forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = batch
        with autocast(self.runner.device, self.runner.amp):
            logits = self.net(images)
        loss = self.criterion(logits.float(), targets)
        return loss, {"loss": loss}


def _evaluate(runner: Runner, loader: DataLoader, channels_last: bool) -> dict[str, float]:
    """Top-1/top-5 of the model, and of its EMA as ``ema_top1``/``ema_top5``."""
    results = evaluate(runner.model, loader, runner.device, runner.amp, channels_last)
    if runner.ema is not None:
        ema_results = evaluate(runner.ema.module, loader, runner.device, runner.amp, channels_last)
        results.update(ema_top1=ema_results["top1"], ema_top5=ema_results["top5"])
    return results


def _log_epoch(cfg: ClsTrainConfig, runner: Runner, bar: Any, position: _Position, results: dict[str, float],
               seconds: float) -> None:
    """One line of ``metrics.jsonl`` for the epoch just finished, and one on the console."""
    record = {
        "epoch": position.epoch + 1,
        "iteration": position.iteration,
        "train_loss": position.mean_loss(),
        "lr": runner.optimizer.param_groups[0]["lr"],
        **{k: results[k] for k in ("top1", "top5", "ema_top1", "ema_top5") if k in results},
        "epoch_time_s": seconds,
    }
    if position.skipped_train or results["skipped_images"]:
        record.update(skipped_train_images=position.skipped_train, skipped_val_images=results["skipped_images"])
        if runner.main:
            logger.warning("epoch %d: skipped %d train / %d val unreadable images",
                           position.epoch + 1, position.skipped_train, results["skipped_images"])
    runner.metrics.log(step=position.epoch + 1, **record)
    if runner.main:
        bar.write(f"epoch {position.epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                  f"top1 {record['top1']:.4f} top5 {record['top5']:.4f}"
                  + (f" ema_top1 {record['ema_top1']:.4f}" if "ema_top1" in record else ""))


def _finish(cfg: ClsTrainConfig, runner: Runner, results: dict[str, float], class_names: list[str]
            ) -> dict[str, float]:
    """``metrics.json``, ``model_final.pth``/``.safetensors`` and ``curves.png``; returns the final accuracies."""
    final = {k: float(results[k]) for k in ("top1", "top5", "ema_top1", "ema_top5") if k in results}
    # What rebuilds the model and its evaluation transform, in both final files.
    described = {"model_name": cfg.model, "model_options": dict(cfg.model_options), "class_names": list(class_names),
                 "image_size": cfg.image_size, "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation}
    if runner.main:
        (runner.out / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    runner.finish({
        "model": runner.model.state_dict(),
        "model_ema": runner.ema.module.state_dict() if runner.ema is not None else None,
        **described,
        "num_classes": len(class_names),
        "epochs": cfg.epochs,
        **final,
    }, runner.model, described)
    if runner.main:
        keys = ["train_loss", "lr", "top1", "top5"] + (["ema_top1"] if runner.ema is not None else [])
        plot_curves(runner.metrics.path, runner.out / "curves.png", keys, x_key="epoch")
    runner.close()
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
        overrides = under_flags(values, reasons, given)
    cfg, messages = build_config(config, overrides)
    for m in messages:
        logger.info(m)
    return train(cfg, resume=resume, overwrite=overwrite)

