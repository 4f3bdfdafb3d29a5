"""Samplers: an unpadded rank-strided evaluation sampler and a shuffling sampler over one process's shard."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ShardedEvalSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` below ``length``, in order and without padding.

    Across ranks every index appears exactly once, so each validation image is evaluated once; ranks may
    get counts differing by one (sum them with ``all_reduce``).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size}) and world_size >= 1")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        """No-op: the order does not depend on the epoch."""


class ShardRandomSampler(Sampler[int]):
    """A fresh random ``num_samples`` of ``indices`` (this process's shard) every epoch, seeded by seed + epoch.

    Used with the ``part`` cache, where each process only holds its own shard. Give every rank the same
    ``num_samples`` so all ranks run the same number of steps.
    """

    def __init__(self, indices: Sequence[int], num_samples: int | None = None, seed: int = 0) -> None:
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.num_samples = len(self.indices) if num_samples is None else num_samples
        if not 0 <= self.num_samples <= len(self.indices):
            raise ValueError(f"num_samples {self.num_samples} must be in [0, {len(self.indices)}]")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (called by the training loop before each epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.indices), generator=g)[: self.num_samples]
        return iter(self.indices[perm].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ResumableSampler(Sampler[int]):
    """``sampler``'s order for an epoch, optionally without its first ``skip`` indices (a run continuing mid-epoch).

    ``set_epoch(epoch, skip)`` sets both for the next iteration; ``len`` counts what is left.
    """

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        if not 0 <= skip <= len(self.sampler):
            raise ValueError(f"skip {skip} must be in [0, {len(self.sampler)}]")
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip
