"""Samplers shared by the detection and classification pipelines."""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler

__all__ = ["ShardSampler"]


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
