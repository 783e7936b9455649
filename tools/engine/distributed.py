"""Distributed helpers over ``torch.distributed`` that are harmless no-ops in a single process.

Launch with ``torchrun --nproc_per_node N tools/train_xxx.py ...``; :func:`init_distributed`
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment torchrun sets. Without
them (plain ``python tools/train_xxx.py``) everything runs as rank 0 of 1.

Example::

    info = init_distributed("cuda")
    model = model.to(info.device)
    if info.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[info.local_rank])
    ...
    losses = reduce_dict({"loss": loss.detach()})   # mean over ranks, for logging
    cleanup()
"""
from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "all_gather_object",
    "reduce_dict",
    "convert_sync_batchnorm",
    "cleanup",
    "is_elastic_restart",
]


class DistInfo(NamedTuple):
    """Where this process sits: global ``rank`` of ``world_size``, GPU index ``local_rank``, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    enabled: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: str = "cuda", timeout_s: float = 300) -> DistInfo:
    """Join the process group described by the torchrun environment, if any.

    Args:
        device: ``"cuda"`` or ``"cpu"`` (``"cuda:N"`` is accepted for single-process runs).
            Distributed CUDA runs use NCCL and ``cuda:LOCAL_RANK``; CPU runs use gloo.
        timeout_s: bound on every collective, so a dead peer raises an error after this
            long instead of hanging the job forever.

    Raises:
        ValueError: unknown device, or CUDA asked for but not available.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        # Without async error handling a NCCL collective waiting on a dead peer ignores the timeout.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=dev if backend == "nccl" else None,
            store=_restart_scoped_store(rank, world_size, timeout),
        )
    return DistInfo(rank, world_size, local_rank, dev, True)


def _restart_scoped_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """The process group's store, its keys scoped to this torchrun restart; ``None`` (torch's default) elsewhere.

    torchrun's agent hosts one TCPStore for the whole job and gives every restarted worker group the same
    ``MASTER_PORT``, while torch names the process group's keys (gloo's listening addresses, NCCL's unique
    id) the same in every attempt. A restarted worker can then read the address a dead worker of the
    previous attempt left, before its new peer overwrites it: gloo's ``connectFullMesh`` fails with
    "Connection refused", or both sides wait for each other until the timeout, depending on which side
    was slower. Under a per-restart prefix no key can be stale.

    ``TORCHELASTIC_RESTART_COUNT`` is the same in every worker only when one agent started them all
    (a single node): each agent counts its own restarts. Across nodes torch's default is kept; there
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment gives each restart a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or _env_int("GROUP_WORLD_SIZE", 1) != 1:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"default_pg/restart_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in single-process runs): the process that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank; returns ``[obj_rank0, obj_rank1, ...]`` (``[obj]`` alone)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Mean (or sum) of scalar tensors across ranks, for logging; same keys in, same keys out.

    Every rank must pass the same keys. Returns detached tensors; the input is not modified.
    """
    if not is_distributed() or not values:
        return {k: v.detach() for k, v in values.items()}
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked))


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm by ``SyncBatchNorm`` (statistics over all ranks' batches)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def cleanup() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_elastic_restart() -> bool:
    """True in a worker group that torchrun restarted after a failure (``--max-restarts N``).

    The training tools then resume from the newest valid checkpoint, as with ``--resume``:
    starting over would silently discard the work done before the failure.
    """
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) > 0
