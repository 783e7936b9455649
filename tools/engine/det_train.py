"""Detection fine-tuning: Faster/Mask R-CNN over ResNet-FPN on COCO-format data.

:func:`train` runs a :class:`tools.engine.det_config.DetTrainConfig` recipe through the shared
:class:`tools.engine.runner.Runner`: COCO data with multi-scale training, SGD with linear warmup and step
decay, DDP via torchrun, AMP, channels_last, atomic resumable checkpoints, periodic and final COCO
evaluation, metrics, curves and a picture of the validation predictions.

Resume is exact: a run killed at any point and restarted with ``resume=True`` ends with
bit-identical weights to an uninterrupted one (CPU, same seed). The training batches are a
function of (seed, iteration) (:class:`tools.engine.det_loader.InfiniteBatches`), and every
checkpoint holds the python/numpy/torch RNG states of every rank, which drive the random
train-time resize and the RPN/RoI sampling.

A checkpoint also records how to rebuild its model (``"model_spec"``: detector kind, backbone,
variant, classes, options) and the dataset's labels (``"label_to_cat_id"``, ``"class_names"``),
so ``heads.load_detector`` (used by ``tools/eval_coco.py`` and ``tools/infer.py``)
needs no flags.

Example::

    cfg, messages = build_config("configs/shapes.yaml", {"backbone": "resnet18", "output_dir": "out/s"})
    metrics = train(cfg)            # {"bbox": {"AP": ..., ...}}
"""
from __future__ import annotations

import bisect
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from tools.engine.auto_recipe import det_data_stats, det_recipe, under_flags
from tools.engine.coco_dataset import CocoDetection, build_det_transforms
from tools.engine.checkpoint import export_weights, save_checkpoint
from tools.engine.config import ema_decay_for_run
from tools.engine.copy_paste import CopyPaste
from tools.engine.det_config import DetTrainConfig, best_metric, build_config, check_config, dataset_paths, model_spec
from tools.engine.coco_eval import write_eval
from tools.engine.det_eval import evaluate, evaluate_config, prediction_grid
from tools.engine.det_loader import InfiniteBatches, build_det_loader
from heads.spec import build_from_spec
from tools.engine.det_model import load_start_weights
from tools.engine.det_tta import TTASettings
from tools.engine.distributed import DistInfo
from tools.engine.logger import progress
from tools.engine.plots import plot_curves
from tools.engine.runner import Runner, launch
from tools.engine.train_utils import autocast

__all__ = ["WarmupMultiStep", "build_optimizer", "build_scheduler", "train", "run_from_args"]

logger = logging.getLogger(__name__)


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


def build_optimizer(model: nn.Module, cfg: DetTrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (timm's factory) over the trainable parameters.

    Norm layers get ``weight_decay_norm`` when set; with ``no_weight_decay_norm_bias`` norm layers and biases
    get none.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = isinstance(module, norm_types) or (cfg.no_weight_decay_norm_bias and name == "bias")
            (no_decay if exempt else decay).append(p)
    norm_wd = cfg.weight_decay if cfg.weight_decay_norm is None else cfg.weight_decay_norm
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0 if cfg.no_weight_decay_norm_bias else norm_wd})
    return create_optimizer_v2(groups, opt="momentum" if cfg.optimizer == "sgd" else "adamw", lr=lr,
                               weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DetTrainConfig) -> Any:
    """The lr schedule by iteration: warmup then step decay (``LambdaLR`` over :class:`WarmupMultiStep`), or
    warmup then cosine (timm's scheduler, stepped by update count)."""
    if cfg.sched == "multistep":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupMultiStep(cfg.steps, cfg.gamma, cfg.warmup_iters, cfg.warmup_factor))
    lr = optimizer.param_groups[0]["lr"]
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.iters, updates_per_epoch=1,
                                       step_on_epochs=False, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_iters,
                                       warmup_lr=lr * cfg.warmup_factor)
    return scheduler


def _to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


class _Data(NamedTuple):
    train_set: CocoDetection
    val_set: CocoDetection
    class_names: list[str]
    label_to_cat_id: dict[int, int]


def _datasets(cfg: DetTrainConfig) -> _Data:
    """The training and validation sets. Multi-scale resizing happens in the model (GeneralizedRCNNTransform
    picks one of min_sizes per image), so the training set only flips, or with ``lsj`` jitters and crops to
    the detector's fixed size."""
    masks = cfg.detector == "mask_rcnn"
    paths = dataset_paths(cfg)
    transforms = build_det_transforms(train=True, hflip_prob=cfg.hflip, lsj_size=cfg.max_size if cfg.lsj else None)
    train_set = CocoDetection(paths["train_images"], paths["train_ann"], transforms,
                              with_masks=masks, drop_empty=cfg.drop_empty,
                              allow_outside_root=cfg.allow_outside_root)
    val_set = CocoDetection(paths["val_images"], paths["val_ann"], None, with_masks=masks,
                            allow_outside_root=cfg.allow_outside_root)
    if val_set.cat_ids != train_set.cat_ids:
        raise ValueError(f"train and val categories differ: {train_set.cat_ids} vs {val_set.cat_ids}")
    return _Data(train_set, val_set, list(train_set.class_names), dict(train_set.label_to_cat_id))


def train(cfg: DetTrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, dict[str, float]]:
    """Run the recipe ``cfg``; returns the final COCO metrics ``{"bbox": {...}, "segm"?: {...}}``.

    Writes to ``cfg.output_dir``: ``config.yaml``, ``model_{iter:07d}.pth`` checkpoints (every
    ``checkpoint_every`` iterations and at the end), ``model_final.pth`` (its weights alone also as
    ``model_final.safetensors``), ``metrics.jsonl`` and TensorBoard events (losses and lr every
    ``log_every`` iterations, APs at each evaluation), ``coco_results.json``, ``metrics.json`` (with per-category
    AP), ``pr_curves.png``, ``loss_curve.png``, ``val_predictions.png`` and, with ``keep_best``, ``model_best.*``.
    Checkpoints hold ``model``, ``optimizer``, ``scheduler``,
    ``scaler``, ``divergence_guard``, ``iteration``, ``rng`` (every rank's), ``config``, ``model_spec``,
    ``label_to_cat_id`` and ``class_names``.

    Args:
        cfg: the recipe.
        resume: continue from the newest checkpoint in ``cfg.output_dir`` that loads (from
            scratch when there is none). A finished run is evaluated again. Always on in a
            worker group restarted by ``torchrun --max-restarts``.
        overwrite: a new run deletes another run's files in ``cfg.output_dir`` instead of refusing.

    Raises:
        FloatingPointError: a loss became NaN/inf or exploded after ``max_recoveries`` roll-backs
            (:mod:`tools.engine.recovery`; the message names the iteration and every loss term);
            the checkpoints written before stay as they are.
        ValueError: bad data, unknown backbone, impossible settings.
    """
    return launch(cfg, lambda info, resume_: _train(cfg, info, resume_, overwrite), resume)


def _train(cfg: DetTrainConfig, info: DistInfo, resume: bool, overwrite: bool) -> dict[str, dict[str, float]]:
    check_config(cfg)
    data = _datasets(cfg)
    spec = model_spec(cfg, len(data.class_names) + 1)
    runner = Runner(cfg, info, build_from_spec(spec), grad_accum=cfg.grad_accum)
    found = runner.find_checkpoint(resume, overwrite)
    if found is None:
        load_start_weights(runner.model, cfg.pretrained, cfg.weights, verbose=runner.main)
    net = runner.prepare_model()
    optimizer = build_optimizer(runner.model, cfg, runner.scaled_lr())
    runner.start(optimizer, build_scheduler(optimizer, cfg), found, _ema(cfg, runner))
    start_iter = int(found[1]["iteration"]) if found else 0

    val_loader = build_det_loader(data.val_set, cfg.batch_size, train=False, workers=cfg.workers,
                                  distributed=info.enabled)
    # What every checkpoint says about the model and its labels; "best" is kept up to date by _KeepBest.
    task_state = {"model_spec": spec, "label_to_cat_id": data.label_to_cat_id, "class_names": data.class_names}
    keep_best = _KeepBest(cfg, runner, task_state, found)

    def run_eval(iteration: int) -> dict[str, dict[str, float]] | None:
        evaluation, results = evaluate(runner.eval_model(), val_loader, data.val_set, runner.device,
                                       data.label_to_cat_id, runner.amp)
        net.train()
        metrics = evaluation.metrics if evaluation is not None else None
        if runner.main:
            write_eval(runner.out, evaluation, results)
            runner.metrics.log(step=iteration, **{f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()})
            keep_best(metrics, iteration)
        return metrics

    # One loader batch holds the images of one optimizer step: grad_accum micro-batches of batch_size.
    train_loader = build_det_loader(data.train_set, cfg.batch_size * cfg.grad_accum, train=True,
                                    workers=cfg.workers, distributed=info.enabled, seed=cfg.seed)
    _loop(cfg, runner, net, InfiniteBatches(train_loader, start_iter), task_state, run_eval)

    final_state = runner.save(cfg.iters, **task_state) if start_iter < cfg.iters else found[1]
    metrics = run_eval(cfg.iters)
    final_weights = runner.eval_model()
    runner.finish({**final_state, "model": final_weights.state_dict(), "metrics": metrics}, final_weights,
                  _weights_metadata(task_state))
    if runner.main:
        # The loss terms are in metrics.jsonl and TensorBoard; the picture keeps to the overview.
        keys = ["loss", "lr", "bbox_AP"] + (["segm_AP"] if cfg.detector == "mask_rcnn" else [])
        plot_curves(runner.metrics.path, runner.out / "loss_curve.png", keys)
        prediction_grid(final_weights, data.val_set, cfg.vis_images, runner.device, data.class_names,
                        cfg.vis_score_thresh, runner.out / "val_predictions.png")
    runner.close()
    return metrics if metrics is not None else {}


def _ema(cfg: DetTrainConfig, runner: Runner) -> ModelEmaV3 | None:
    """timm's weight EMA with its decay warm-up when the recipe asks for it, the decay capped to the run."""
    if cfg.ema is None:
        return None
    decay = ema_decay_for_run(cfg.ema, cfg.iters)
    if decay != cfg.ema and runner.main:
        logger.info("EMA decay %g -> %g: its time constant (1 / (1 - decay) updates) kept within a tenth of "
                    "the run's %d updates", cfg.ema, decay, cfg.iters)
    return ModelEmaV3(runner.model, decay=decay, use_warmup=True)


def _weights_metadata(task_state: dict[str, Any]) -> dict[str, Any]:
    """What a safetensors header carries to rebuild the detector and name its labels."""
    return {key: task_state[key] for key in ("model_spec", "label_to_cat_id", "class_names")}


class _KeepBest:
    """``--keep-best METRIC``: after each evaluation, ``model_best.pth`` and ``model_best.safetensors`` hold the
    evaluated weights if they score higher than every earlier evaluation of the run (resumed runs included).

    ``model_best.pth`` is a detector checkpoint (``model``, ``model_spec``, labels) with ``best``:
    ``{"metric", "value", "iteration"}``; the safetensors header has the same. ``task_state["best"]`` goes into
    every checkpoint.
    """

    def __init__(self, cfg: DetTrainConfig, runner: Runner, task_state: dict[str, Any],
                 found: tuple[Path, dict[str, Any]] | None) -> None:
        self.runner, self.task_state = runner, task_state
        self.metric = cfg.keep_best
        if self.metric is not None:
            self.iou_type, self.name = best_metric(self.metric, cfg.detector)
            task_state["best"] = found[1].get("best") if found else None

    def __call__(self, metrics: dict[str, dict[str, float]], iteration: int) -> None:
        if self.metric is None:
            return
        value = float(metrics[self.iou_type][self.name])
        best = self.task_state.get("best")
        if best is not None and best["metric"] == self.metric and value <= best["value"]:
            return
        best = {"metric": self.metric, "value": value, "iteration": iteration}
        self.task_state["best"] = best
        weights = self.runner.eval_model()
        out = self.runner.out
        save_checkpoint(out / "model_best.pth", {"model": weights.state_dict(), **self.task_state})
        export_weights(weights, out / "model_best.safetensors",
                       metadata={k: json.dumps(v) for k, v in {**_weights_metadata(self.task_state),
                                                               "best": best}.items()})
        logger.info("model_best: %s %.4f at iteration %d", self.metric, value, iteration)


def _loop(cfg: DetTrainConfig, runner: Runner, net: nn.Module, batches: InfiniteBatches,
          task_state: dict[str, Any], run_eval: Callable[[int], Any]) -> None:
    """Iterations ``batches.iteration .. cfg.iters - 1``: step, log, checkpoint and evaluate on schedule."""
    bar = progress(cfg.iters, initial=batches.iteration, enabled=runner.main, desc="train")
    sums: dict[str, float] = {}
    window_start, window_iters, window_steps = time.perf_counter(), 0, 0

    def forward(batch: tuple[list[Tensor], list[dict]]) -> tuple[Tensor, dict[str, Tensor]]:
        # (channels_last needs no input conversion: the model batches the images itself, and
        # convolutions with channels_last weights produce channels_last outputs.)
        images, targets = _to_device(*batch, runner.device)
        with autocast(runner.device, runner.amp):
            loss_dict = net(images, targets)
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        loss = sum(loss_dict.values())
        return loss, {**loss_dict, "loss": loss}

    copy_paste = CopyPaste(cfg.copy_paste) if cfg.copy_paste > 0 else None
    for iteration in range(batches.iteration, cfg.iters):
        images, targets = next(batches)
        if copy_paste is not None:  # on the whole step's batch, so accumulation sees the images one batch would
            images, targets = copy_paste(*_to_device(images, targets, runner.device))
        micro_batches = [(images[i:i + cfg.batch_size], targets[i:i + cfg.batch_size])
                         for i in range(0, len(images), cfg.batch_size)]
        lr_now = runner.optimizer.param_groups[0]["lr"]
        reduced, stepped = runner.step(forward, micro_batches, iteration)
        if stepped:
            for k, v in reduced.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            window_steps += 1
        done = iteration + 1
        runner.after_step(done)

        window_iters += 1
        bar.update()
        bar.set_postfix(loss=f"{float(reduced['loss']):.3f}", lr=f"{lr_now:.2e}")
        if done % cfg.log_every == 0 or done == cfg.iters:
            elapsed = time.perf_counter() - window_start
            runner.metrics.log(step=done, lr=lr_now, time_per_iter=elapsed / window_iters,
                               **{k: v / max(window_steps, 1) for k, v in sums.items()})
            sums, window_start, window_iters, window_steps = {}, time.perf_counter(), 0, 0
        if done < cfg.iters and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            runner.save(done, **task_state)
        if done < cfg.iters and cfg.eval_every and done % cfg.eval_every == 0:
            metrics = run_eval(done)
            if runner.main:
                bar.write(f"iteration {done}: " + "  ".join(f"{t} AP {m['AP']:.4f}" for t, m in metrics.items()))
    bar.close()
    batches.close()


def run_from_args(config: str | Path | None, overrides: dict[str, Any], resume: bool = False,
                  eval_only: bool = False, overwrite: bool = False, tta: TTASettings | None = None
                  ) -> dict[str, dict[str, float]]:
    """Build the config (logging schedule changes), then train or, with ``eval_only``, evaluate (with test-time
    augmentation when ``tta`` is given); the body of ``tools/train_det.py``.

    ``config=None`` with a dataset in ``overrides`` chooses the recipe's length, image sizes and RoI
    budget from the training set (:func:`tools.engine.auto_recipe.det_recipe`); given flags win.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if config is None and given.get("train_ann") is not None and not eval_only:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        values, reasons = det_recipe(det_data_stats(given["train_ann"]),
                                     given.get("batch_size", DetTrainConfig.batch_size), world_size)
        overrides = under_flags(values, reasons, given)
    cfg, messages = build_config(config, overrides)
    for m in messages:
        logger.info(m)
    if eval_only:
        # Only flags given explicitly override what the checkpoint says about its model.
        model_overrides = {"kind": given.get("detector"), "backbone": given.get("backbone"),
                           "variant": given.get("variant")}
        if "min_sizes" in given:
            model_overrides["min_size"] = max(given["min_sizes"])
        if "max_size" in given:
            model_overrides["max_size"] = given["max_size"]
        return evaluate_config(cfg, model_overrides, tta=tta)
    return train(cfg, resume=resume, overwrite=overwrite)
