"""Detection batches: the training loader whose every batch is a function of (seed, iteration), and the
evaluation loader that shards images over ranks without repeats."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from tools.engine.coco_dataset import collate_detection
from tools.engine.samplers import GroupedBatchSampler, ResumableBatchSampler, ShardSampler
from tools.engine.values import is_int

__all__ = ["SeededDataset", "build_det_loader", "InfiniteBatches"]


class SeededDataset(Dataset):
    """Loads ``dataset[index]`` under ``torch.manual_seed(sample_seed)`` for ``(index, sample_seed)`` keys,
    so random transforms repeat exactly; the caller's RNG state is left untouched."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def build_det_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0,
                     distributed: bool = False, seed: int = 0, group_aspect: bool = True) -> DataLoader:
    """DataLoader of ``(list[Tensor], list[dict])`` batches (see :func:`collate_detection`).

    Training: shuffled by a ``DistributedSampler`` (one replica unless ``distributed``)
    seeded with ``seed``, grouped by orientation if ``group_aspect``, full batches only,
    wrapped in :class:`ResumableBatchSampler`. Iterate it through
    :class:`InfiniteBatches`, which handles epochs and resumption.

    Evaluation: in order, each image once; with ``distributed`` each rank gets every
    ``world_size``-th image (no padding, so gathered results have no duplicates).

    ``group_aspect`` needs ``dataset.aspect_ratios`` (width / height per index), which
    :class:`CocoDetection` provides. The loader has its own seeded generator, so
    iterating it never touches the global torch RNG.
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        num_replicas, rank = 1, 0
    ratios = getattr(dataset, "aspect_ratios", None)
    if group_aspect and ratios is None:
        raise ValueError(f"group_aspect=True needs dataset.aspect_ratios, which {type(dataset).__name__} lacks; "
                         f"pass group_aspect=False")
    generator = torch.Generator().manual_seed(seed)

    if train:
        sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if len(sampler) < batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(sampler)} training images per process")
        batches = (GroupedBatchSampler(sampler, ratios, batch_size, drop_last=True) if group_aspect
                   else BatchSampler(sampler, batch_size, drop_last=True))
        return DataLoader(SeededDataset(dataset), batch_sampler=ResumableBatchSampler(batches, seed, rank),
                          num_workers=workers, collate_fn=collate_detection, generator=generator)

    sampler = ShardSampler(len(dataset), rank, num_replicas)
    batches = (GroupedBatchSampler(sampler, ratios, batch_size, drop_last=False) if group_aspect
               else BatchSampler(sampler, batch_size, drop_last=False))
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_detection,
                      generator=generator)


class InfiniteBatches:
    """Endless stream of training batches that resumes exactly.

    Iteration ``k`` is batch ``k % E`` of epoch ``k // E`` (``E = batches_per_epoch``),
    and its content (images, order, augmentation) depends only on the loader's seed
    and ``k``. So a run restarted with ``InfiniteBatches(loader, start_iter=k)`` sees
    exactly the batches an uninterrupted run sees from iteration ``k`` on, with any
    number of workers. ``iteration`` is the number of batches consumed so far, i.e.
    the ``start_iter`` to save in a checkpoint.

    Args:
        loader: a training loader from :func:`build_det_loader` (its batch sampler
            must be a :class:`ResumableBatchSampler`).
        start_iter: first iteration to produce.

    Example:
        >>> batches = InfiniteBatches(build_det_loader(ds, 4, train=True, seed=1), start_iter=ckpt_iter)
        >>> for images, targets in itertools.islice(batches, max_iter - ckpt_iter): ...
    """

    def __init__(self, loader: DataLoader, start_iter: int = 0) -> None:
        if not isinstance(loader.batch_sampler, ResumableBatchSampler):
            raise ValueError("InfiniteBatches needs a training loader from build_det_loader(..., train=True)")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.loader = loader
        self.batches_per_epoch = loader.batch_sampler.batches_per_epoch
        self.iteration = start_iter
        self._batches: Iterator | None = None

    @property
    def epoch(self) -> int:
        return self.iteration // self.batches_per_epoch

    def __iter__(self) -> InfiniteBatches:
        return self

    def __next__(self) -> tuple[list[torch.Tensor], list[dict]]:
        # Plain state instead of a generator: a generator holding ``self`` forms a reference cycle,
        # and a loader iterator freed by the cycle collector waits 5 s per worker to shut down.
        if self._batches is None:
            epoch, offset = divmod(self.iteration, self.batches_per_epoch)
            self.loader.batch_sampler.set_position(epoch, offset)
            self._batches = iter(self.loader)
        try:
            batch = next(self._batches)
        except StopIteration:
            self._batches = None
            return next(self)
        self.iteration += 1
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes now (they also stop when this object is freed)."""
        self._batches = None


