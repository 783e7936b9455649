"""Samplers shared by the detection and classification pipelines: every one is a function of (seed, epoch), so a
resumed run sees the same order."""
from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, Sampler

from tools.engine.values import is_int

__all__ = ["ShardSampler", "ResumableSampler", "GroupedBatchSampler", "ResumableBatchSampler"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in order: every item seen exactly once over all ranks.

    For evaluation: torch's ``DistributedSampler`` pads the last shard with repeats, which would count
    duplicate detections in COCO evaluation and duplicate images in accuracy.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (order = function of seed and epoch) that can start part-way into an epoch
    (``start_index`` samples in)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return super().__len__() - self.start_index


def _set_epoch(sampler: Any, epoch: int) -> None:
    """Call ``set_epoch`` on the first sampler in a wrapper chain that has one."""
    while sampler is not None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return
        sampler = getattr(sampler, "sampler", None)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share an orientation (landscape/square vs portrait), to pad less.

    Indices come from ``sampler`` (any sampler, e.g. a ``DistributedSampler``) and are
    buffered per group; a batch is emitted when its group's buffer is full.

    * ``drop_last=False``: leftover partial batches are emitted at the end, so every
      index appears exactly once; ``len()`` counts them (it iterates ``sampler``, which
      must give the same order when iterated twice in an epoch, as Sequential and
      Distributed samplers do).
    * ``drop_last=True``: exactly ``len(sampler) // batch_size`` full batches per
      epoch; leftovers are completed with other indices of their group. A fixed count
      keeps DDP ranks in step, since the groups split differently on each rank.

    Args:
        aspect_ratios_or_group_ids: per dataset index, width/height as floats (grouped
            into w >= h and w < h) or group ids as ints.
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], aspect_ratios_or_group_ids: Sequence[float | int],
                 batch_size: int, drop_last: bool = False) -> None:
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        values = list(aspect_ratios_or_group_ids)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            self.group_ids = [int(v) for v in values]
        else:
            self.group_ids = [0 if float(v) >= 1.0 else 1 for v in values]
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.sampler, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                emitted += 1
        leftovers = sorted(((g, b) for g, b in buffers.items() if b), key=lambda gb: len(gb[1]), reverse=True)
        if not self.drop_last:
            for _, batch in leftovers:
                yield batch
            return
        for group, batch in leftovers[:len(self) - emitted]:
            pool = seen[group]
            missing = self.batch_size - len(batch)
            yield batch + [pool[i % len(pool)] for i in range(missing)]

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        per_group = Counter(self.group_ids[i] for i in self.sampler)
        return sum(math.ceil(n / self.batch_size) for n in per_group.values())


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wraps a per-epoch batch sampler so that any batch can be reproduced from (seed, epoch, batch).

    It yields ``(index, sample_seed)`` pairs for :class:`SeededDataset`: the seed fixes
    the random augmentation of that sample, whatever worker loads it. The inner
    sampler must be a pure function of the epoch (``DistributedSampler`` with a seed
    is). :meth:`set_position` chooses the epoch and the first batch; skipped batches
    cost index arithmetic only, no image loading.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], seed: int = 0, rank: int = 0) -> None:
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batch_sampler)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0 or epoch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch} and {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        _set_epoch(self.batch_sampler, self.epoch)
        for b, batch in enumerate(self.batch_sampler):
            if b < self.start_batch:
                continue
            seeds = np.random.SeedSequence([self.seed, self.rank, self.epoch, b]).generate_state(len(batch))
            yield [(int(i), int(s)) for i, s in zip(batch, seeds)]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0)
