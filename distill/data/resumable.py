"""A training DataLoader that resumes mid-epoch on exactly the batch where it stopped.

Lightning restores a dataloader's position only when the loader has `state_dict` /
`load_state_dict` (otherwise a mid-epoch resume replays the epoch from its first batch, and a
seeded `torch.Generator` restarts at epoch 0's order). Here the order of epoch e is a pure
function of (seed, e), and the loader records (epoch, batches served) in every checkpoint.
Under DDP each rank takes a strided shard of the same permutation, so the loader does its own
sharding (configs set `use_distributed_sampler: false`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SeededShuffleSampler(Sampler[int]):
    """Permutation of range(n) seeded by (seed, epoch), this rank's shard, minus `skip` items."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        self.epoch = epoch

    def _shard(self) -> list[int]:
        order = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
        )
        rank, world = _rank_world()
        per_rank = self.n // world  # equal shards so every rank runs the same number of steps
        return order[rank : per_rank * world : world].tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self._shard()[skip:]

    def __len__(self) -> int:
        return self.n // _rank_world()[1]


class ResumableLoader(DataLoader):
    """Shuffled, drop-last batches whose position survives a checkpoint (see module doc)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=SeededShuffleSampler(len(dataset), seed),
            drop_last=True,
            num_workers=num_workers,
        )
        self.served, self._resume_at = 0, 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        self.served, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.served}

    def load_state_dict(self, state: dict) -> None:
        batches = state["batches"] if state["batches"] < len(self) else 0
        self.sampler.skip = batches * self.batch_size
        self._resume_at = batches
