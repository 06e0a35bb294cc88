"""The stream the analyses read, and which part of it each torchrun process reads.

A dataset's caches (one per checkpoint) are cut into *units*: runs of shards that end on the
same row in every checkpoint's cache. Units are whole token rows, and the main run writes one
document per row, so a unit boundary is a document boundary. The units of all datasets, in
order, are split into ``world_size`` contiguous shares of about equal tokens; each process folds
its share and the accumulators are merged in share order (``Ranks.reduce``). The chunks inside a
unit are cut the same way whoever reads it, so the merged results are those of one process.
Everything here is decided from the manifests: no process reads another's shards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from core.analysis.streaming import align, chunk_tokens, rechunk
from core.collection.sweep import Sweep
from core.distributed import Ranks
from core.routing_data import RoutingData
from core.store.cache import RoutingCache


@dataclass(frozen=True)
class Unit:
    """Shards of one dataset that cover the same rows at every checkpoint (``shards[c]``: checkpoint c's)."""

    dataset: str
    shards: tuple[tuple[int, ...], ...]
    tokens: int


def sweep_units(sweep: Sweep) -> list[Unit]:
    """Every dataset's caches cut where all checkpoints' shards end on the same row, in stream order."""
    units = []
    for name in sweep.datasets:
        caches = sweep.caches[name]
        ends = [np.cumsum([int(s["num_rows"]) for s in c.manifest["shards"]]) for c in caches]
        common = sorted(set.intersection(*(set(e.tolist()) for e in ends))) if ends else []
        prev = [0] * len(caches)
        for row in common:
            upto = [int(np.searchsorted(e, row, side="right")) for e in ends]
            shards = tuple(tuple(range(a, b)) for a, b in zip(prev, upto))
            tokens = sum(int(caches[-1].manifest["shards"][i]["num_tokens"]) for i in shards[-1])
            units.append(Unit(name, shards, tokens))
            prev = upto
    return units


def owners(units: Sequence[Unit], world_size: int) -> list[int]:
    """The process of each unit: contiguous shares of about equal tokens, in stream order."""
    total = sum(u.tokens for u in units)
    out, before = [], 0
    for u in units:
        mid = before + u.tokens / 2
        out.append(min(world_size - 1, int(mid * world_size // total)) if total else 0)
        before += u.tokens
    return out


def share_tokens(sweep: Sweep, world_size: int) -> list[int]:
    """Tokens each of ``world_size`` processes analyses."""
    units = sweep_units(sweep)
    out = [0] * world_size
    for u, r in zip(units, owners(units, world_size)):
        out[r] += u.tokens
    return out


def sweep_stream(sweep: Sweep, ranks: Ranks | None = None) -> Iterator[list[RoutingData]]:
    """This process's share (all of it in one process) of every dataset's tokens, each as the same chunk at every checkpoint.

    The final checkpoint is last in each list. Chunks are small enough that an analysis's dense
    view of one stays near 64 MB whatever the model's layers x experts (:func:`chunk_tokens`).
    """
    ranks = ranks or Ranks()
    units = sweep_units(sweep)
    for unit, owner in zip(units, owners(units, ranks.world_size)):
        if owner != ranks.rank:
            continue
        streams = [_read(cache, idx) for cache, idx in zip(sweep.caches[unit.dataset], unit.shards)]
        yield from rechunk(align(streams), lambda c: chunk_tokens(c.num_layers, c.num_experts))


def _read(cache: RoutingCache, shards: Sequence[int]) -> Iterator[RoutingData]:
    """The shards of one cache, read (and checked) one at a time as the stream reaches them."""
    for i in shards:
        yield cache.load_shard(i)
