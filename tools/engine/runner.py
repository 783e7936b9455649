"""The training machinery detection and classification share.

:func:`launch` runs a trainer's body inside a process group (torchrun/DDP or a single process), resuming
when torchrun restarted the workers. :class:`Runner` holds what every run has besides its data, model and
evaluation: the model prepared for the device (SyncBN, channels_last, DDP), the optimizer, scheduler, AMP
scaler and optional EMA, the divergence guard, the checkpoints (run identity, resume, rotation) and the
metrics log. A trainer builds its data and model, then drives its loop through the runner::

    runner = Runner(cfg, info, model)
    found = runner.find_checkpoint(resume, overwrite)     # loads the weights of the checkpoint resumed from
    net = runner.prepare_model()
    runner.start(optimizer, scheduler, found)
    for iteration in ...:
        losses, stepped = runner.step(forward, micro_batches, iteration)  # or a roll-back on a divergence
        runner.after_step(iteration + 1)                  # scheduler, lr scale, EMA, snapshot
        if ...: runner.save(iteration + 1, **task_state)
    runner.finish(final_state, weights_metadata)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from timm.utils import ModelEmaV3
from torch import nn

from tools.engine.checkpoint import CheckpointManager, export_weights, get_rng_state, restore_training_state
from tools.engine.config import config_to_dict, save_config, scale_lr
from tools.engine.distributed import (
    DistInfo,
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
from tools.engine.logger import MetricLogger
from tools.engine.recovery import DivergenceGuard
from tools.engine.train_utils import backward, optimizer_step, resolve_amp, seed_everything

__all__ = ["default_device", "launch", "on_main_first", "Runner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu": the device of every tool given none."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def launch(cfg: Any, body: Callable[[DistInfo, bool], T], resume: bool) -> T:
    """Run ``body(info, resume)`` in this process's group (``cfg.device``, ``cfg.dist_timeout_s``), then leave it.

    A worker group restarted by ``torchrun --max-restarts`` always resumes. Every rank is seeded with
    ``cfg.seed + rank`` first. With ``cfg.deterministic`` torch uses its deterministic algorithms for the run and
    warns once for each op that has none.
    """
    info = init_distributed(cfg.device or default_device(), cfg.dist_timeout_s)
    if is_elastic_restart() and not resume:
        logger.info("torchrun restarted the workers: resuming from the newest checkpoint in %s", cfg.output_dir)
        resume = True
    try:
        with _deterministic(cfg.deterministic):
            seed_everything(cfg.seed + info.rank)
            return body(info, resume)
    finally:
        cleanup()


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch's deterministic algorithms and no cuDNN autotuning while the context lasts (when ``enabled``)."""
    if not enabled:
        yield
        return
    # cuBLAS needs a fixed workspace for deterministic matmuls; it is read when the first handle is made.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns instead of failing
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def on_main_first(make: Callable[[], T]) -> T:
    """``make()`` on the main process first (e.g. generating the built-in dataset), then on the others."""
    value = make() if is_main_process() else None
    barrier()
    return value if value is not None else make()


class Runner:
    """One training run's shared state and steps; ``cfg`` is a trainer's config (the fields both have).

    Args:
        cfg: the recipe: ``output_dir``, ``keep_last``, ``max_recoveries``, ``spike_factor``, ``amp``,
            ``amp_dtype``, ``channels_last``, ``sync_bn``, ``deterministic``, ``clip_grad_norm``, ``base_lr``,
            ``base_batch_size``, ``batch_size``, ``lr`` are read.
        info: this process's place in the group (:func:`launch`).
        model: the model, not yet moved to the device.
        grad_accum: batches whose gradients each optimizer step accumulates (:meth:`step`).
    """

    def __init__(self, cfg: Any, info: DistInfo, model: nn.Module, grad_accum: int = 1) -> None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.main = is_main_process()
        self.out = Path(cfg.output_dir)
        self.model = model
        self.net: nn.Module = model
        self.grad_accum = grad_accum
        self.manager = CheckpointManager(self.out, keep_last=cfg.keep_last)
        self.guard = DivergenceGuard(cfg.max_recoveries, cfg.spike_factor)
        self.amp = resolve_amp(self.device, cfg.amp, cfg.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp.use_scaler else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.ema: ModelEmaV3 | None = None
        self.metrics: MetricLogger | None = None

    def find_checkpoint(self, resume: bool, overwrite: bool) -> tuple[Path, dict[str, Any]] | None:
        """Claim the output folder (:meth:`CheckpointManager.begin`); with ``resume``, load the newest checkpoint
        whose weights fit the model into it and return ``(path, state)``, else None."""
        # A checkpoint whose weights do not fit (another recipe's) is skipped for an older one.
        found = self.manager.begin(resume, overwrite, delete=self.main,
                                   accept=lambda state: self.model.load_state_dict(state["model"]))
        if resume and found is None and self.main:
            logger.info("resume: no checkpoint in %s, starting from scratch", self.out)
        return found

    def prepare_model(self) -> nn.Module:
        """SyncBN (distributed CUDA runs with ``sync_bn``), the device, channels_last, DDP; returns the module to
        call (the DDP wrapper in a distributed run). ``self.model`` stays the unwrapped model."""
        if self.cfg.sync_bn and self.info.enabled:
            if self.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU implementation; "
                                 "drop --sync-bn on CPU")
            self.model = convert_sync_batchnorm(self.model)
        self.model.to(self.device)
        if self.cfg.channels_last or self.info.enabled:
            # DDP's gradient buckets take the layout of the weights, and the ResNet convolutions produce
            # channels_last weight gradients: keep the weights in that layout too.
            self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if self.info.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return self.net

    def scaled_lr(self, rule: str = "linear") -> float:
        """The lr for the images of one optimizer step (``batch_size x grad_accum x world_size``) by ``rule``,
        unless the config gives ``lr``."""
        cfg = self.cfg
        lr, message = scale_lr(cfg.base_lr, cfg.base_batch_size, cfg.batch_size * self.grad_accum * self.info.world_size,
                               cfg.lr, rule)
        if message and self.main:
            logger.info(message)
        return lr

    def start(self, optimizer: torch.optim.Optimizer, scheduler: Any,
              found: tuple[Path, Mapping[str, Any]] | None, ema: ModelEmaV3 | None = None) -> None:
        """Take the optimizer, scheduler and EMA, restore them from ``found`` when resuming, write
        ``config.yaml``, open the metrics log and take the guard's first snapshot."""
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        if found is not None:
            path, state = found
            restore_training_state(state, optimizer, scheduler, self.scaler, self.guard, self.info.rank,
                                   self.info.world_size)
            if ema is not None and state.get("ema") is not None:
                ema.module.load_state_dict(state["ema"])
            if self.main:
                logger.info("resumed from %s (iteration %d)", path, int(state["iteration"]))
        if self.main:
            save_config(self.cfg, self.out / "config.yaml")
        self.metrics = MetricLogger(self.out, enabled=self.main)
        self.net.train()
        self.guard.take_snapshot(int(found[1]["iteration"]) if found else 0, self.trainable_state())

    def trainable_state(self) -> dict[str, Any]:
        """What a divergence rolls back: weights, optimizer, AMP scaler and EMA."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
        }

    def _restore_trainable(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])

    def step(self, forward: Callable[[Any], tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
             micro_batches: Sequence[Any], iteration: int) -> tuple[dict[str, torch.Tensor], bool]:
        """One optimizer step over ``micro_batches`` (``grad_accum`` of them): ``forward(batch)`` returns the loss
        and its terms; the gradients of ``loss / len(micro_batches)`` accumulate (DDP reduces them once, with the
        last backward), then clipping and the optimizer step.

        Returns the loss terms averaged over the micro-batches and the ranks (the same on every rank) and whether
        the step was taken: when those terms show a divergence the gradients are dropped and the run rolls back to
        the last good state at a lower lr (FloatingPointError after ``max_recoveries``).
        """
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        for k, batch in enumerate(micro_batches):
            last = k == count - 1
            sync = contextlib.nullcontext() if last or self.net is self.model else self.net.no_sync()
            with sync:
                loss, terms = forward(batch)
                backward(loss / count, self.scaler)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / count
        # Mean over ranks: every rank sees the same values, so all ranks recover or stop together.
        reduced = reduce_dict(sums)
        problem = self.guard.check(reduced, iteration)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_trainable(self.guard.recover(problem, iteration))
            return reduced, False
        crash_point("train_step")  # test hook (tools.engine.faults); no-op unless RESDET_CRASH_AT is set
        optimizer_step(self.model, self.optimizer, self.scaler, self.cfg.clip_grad_norm)
        return reduced, True

    def after_step(self, done: int) -> None:
        """After optimizer step ``done`` (counting from 1): the scheduler (a timm scheduler by update count, a
        torch one by one step), the guard's lr scale, the EMA update and, when due, a snapshot."""
        if hasattr(self.scheduler, "step_update"):
            self.scheduler.step_update(num_updates=done)
        else:
            self.scheduler.step()
        self.guard.scale_lr(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.model, step=done)
        if self.guard.due(done):
            self.guard.take_snapshot(done, self.trainable_state())

    def eval_model(self) -> nn.Module:
        """What evaluation and the final weights use: the EMA's model when there is one, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, iteration: int, **task_state: Any) -> dict[str, Any]:
        """Write checkpoint ``iteration`` (collective: every rank takes part) and return its state.

        The state holds the trainable state, ``scheduler``, ``divergence_guard``, ``iteration``, ``rng`` (every
        rank's, so each resumes its own stream), ``config`` and the trainer's ``task_state``.
        """
        state = {
            **self.trainable_state(),
            "scheduler": self.scheduler.state_dict(),
            "divergence_guard": self.guard.state_dict(),
            "iteration": iteration,
            "rng": all_gather_object(get_rng_state()),
            "config": config_to_dict(self.cfg),
            **task_state,
        }
        if self.main:
            self.manager.save(state, iteration)
        if self.guard.healthy():
            self.guard.take_snapshot(iteration, self.trainable_state())
        barrier()
        return state

    def finish(self, final_state: Mapping[str, Any], weights: nn.Module, weights_metadata: Mapping[str, Any]) -> None:
        """On the main process: ``model_final.pth`` (``final_state``) and ``model_final.safetensors``, the weights
        of ``weights`` alone, loadable without pickle, with ``weights_metadata`` (JSON-encoded) in the header."""
        if not self.main:
            return
        self.manager.save_final(final_state)
        export_weights(weights, self.out / "model_final.safetensors",
                       metadata={key: json.dumps(value) for key, value in weights_metadata.items()})

    def close(self) -> None:
        """Close the metrics log and wait for every rank."""
        if self.metrics is not None:
            self.metrics.close()
        barrier()
