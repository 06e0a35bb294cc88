"""Which share of a run's work this process does, when ``torchrun`` starts several.

Collection splits deterministically: whole checkpoints over ranks when a sweep has at least as
many checkpoints to load as there are ranks, else (checkpoint, dataset) caches round-robin, and
with fewer caches than ranks the planned shards of every cache (``core.store.split_cache``).
Manifests record the rank and world size that wrote each shard; after a barrier every rank
opens all the caches. A cache's identity does not depend on who wrote
it, so the same command with another number of processes reuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's rank among ``world_size`` processes (0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1

    def owns(self, unit: int) -> bool:
        """Whether work unit ``unit`` (numbered the same in every process) is this rank's."""
        return unit % self.world_size == self.rank

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process). torchrun stops the others if a rank fails."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def reduce(self, value: T, combine: Callable[[T, T], T]) -> T | None:
        """``combine`` every rank's ``value`` in rank order onto rank 0 (others get None): a tree of sends.

        In round s, rank r (a multiple of 2s) receives the value of rank r + s and keeps
        ``combine(own, received)``: lower ranks stay on the left, so a combine that is merging
        shares of a stream sees them in stream order. Each rank holds at most two values at once.
        """
        if self.world_size == 1:
            return value
        dist = torch.distributed
        step = 1
        while step < self.world_size:
            if self.rank % (2 * step) == step:
                dist.send_object_list([value], dst=self.rank - step)
                return None
            if self.rank % (2 * step) == 0 and self.rank + step < self.world_size:
                got: list[Any] = [None]
                dist.recv_object_list(got, src=self.rank + step)
                value = combine(value, got[0])
            step *= 2
        return value

    def as_dict(self) -> dict[str, int]:
        return {"rank": self.rank, "world_size": self.world_size}


def current_ranks() -> Ranks:
    """The ranks of the initialized ``torch.distributed`` process group, else one process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()
