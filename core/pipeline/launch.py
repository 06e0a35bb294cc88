"""The main run under ``torchrun``: the process group from torchrun's environment, each rank's device, rank 0 first.

    uv run torchrun --standalone --nproc_per_node 2 exp/basic_routing_analysis.py --micro     # 2 CPU processes (gloo)
    uv run torchrun --nproc_per_node 8 exp/basic_routing_analysis.py --config configs/olmoe.yaml  # 8 GPUs (NCCL)

Every rank collects its share of the caches (``core.distributed``) and analyses its share of
the tokens (``core.pipeline.shares``); the analyses are merged onto rank 0, which writes the
report: the results are those of one process on the same caches. If a rank fails, torchrun
stops the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from core.distributed import Ranks, current_ranks

# A barrier waits for the slowest rank's whole share of collection (hours for a large sweep);
# failures do not wait on it: torchrun stops every rank when one exits with an error.
BARRIER_TIMEOUT = timedelta(hours=24)


def start_ranks(device: str) -> tuple[Ranks, str]:
    """Join torchrun's process group if launched by it; returns the ranks and this rank's device (cuda -> cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    import torch
    import torch.distributed as dist

    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=BARRIER_TIMEOUT)
    return current_ranks(), device


def stop_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def rank_zero_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 does the body first (training or writing a model), then the others do it (finding it done)."""
    if ranks.rank != 0:
        ranks.barrier()
    yield
    if ranks.rank == 0:
        ranks.barrier()
