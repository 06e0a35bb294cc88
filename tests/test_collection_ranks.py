"""How a sweep's work is split over torchrun ranks: every cache exactly once, numbered alike on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.collection.checkpoints import Checkpoint
from core.distributed import Ranks
from core.collection.sweep import _my_share, _Pending

NAMES = ["wikitext2", "gsm8k", "humaneval"]


def _plans(n_ckpt: int, done: set[tuple[int, str]] = frozenset(), routers_missing: bool = True) -> list[_Pending]:
    plans = []
    for i in range(n_ckpt):
        todo = [(name, None, Path(f"/c{i}/{name}")) for name in NAMES if (i, name) not in done]
        plans.append(_Pending(Checkpoint(f"step{i}"), {}, todo, {}, Path(f"/c{i}/routers"), None if routers_missing else {}))
    return plans


@pytest.mark.parametrize("n_ckpt, world", [(1, 2), (2, 2), (3, 2), (1, 4), (8, 3)])
def test_every_cache_is_collected_by_exactly_one_rank(n_ckpt, world):
    seen, routers = [], []
    for rank in range(world):
        for p, share in _my_share(_plans(n_ckpt), NAMES, True, Ranks(rank, world)):
            seen += [(p.ckpt.name, t[0]) for t in share.todo]
            routers.append(p.ckpt.name)
    assert sorted(seen) == sorted((f"step{i}", n) for i in range(n_ckpt) for n in NAMES)
    if n_ckpt >= world:  # whole checkpoints: each loaded once
        assert sorted(routers) == sorted(f"step{i}" for i in range(n_ckpt))
    assert {f"step{i}" for i in range(n_ckpt)} <= set(routers)


def test_ranks_that_found_different_caches_finished_still_agree():
    """A rank that started later sees some caches done: the split must not shift (it numbers all units)."""
    early = _my_share(_plans(3), NAMES, True, Ranks(0, 2))
    late = _my_share(_plans(3, done={(0, n) for n in NAMES}), NAMES, True, Ranks(1, 2))
    mine0 = {(p.ckpt.name, t[0]) for p, s in early for t in s.todo}
    mine1 = {(p.ckpt.name, t[0]) for p, s in late for t in s.todo}
    assert not mine0 & mine1 and {n for c, n in mine1 if c == "step1"} == set(NAMES)


def test_a_checkpoint_is_collected_as_garbage_at_once_only_when_its_weights_are_big():
    """The sweep runs a full garbage collection (0.1-0.3 s) after a checkpoint only where it frees a big model."""
    import torch

    from core.model_access.loading import BIG_MODEL_BYTES, resident_weight_bytes

    assert resident_weight_bytes(torch.nn.Linear(4, 4)) == (16 + 4) * 4
    with torch.device("meta"):
        remote = torch.nn.Linear(1 << 14, 1 << 14)  # 1 GiB on the meta device: nothing held
    assert resident_weight_bytes(remote) == 0 and resident_weight_bytes(None) == 0
    big = torch.nn.Linear(1 << 12, 1 << 12, bias=False)
    assert resident_weight_bytes(big) == (1 << 24) * 4 >= BIG_MODEL_BYTES
