"""One cache written by several ranks: the planned shards are one process's, parts join into the same cache, none is traced twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.store.cache import RoutingCache
from core.store.cache_format import CacheError
from core.collection.collector import ActivationCollector
from core.distributed import Ranks
from core.store.split_cache import has_parts, join_parts, plan_shards
from tests.fakes import FakeWrapper, Killed, make_rows

KW = dict(batch_size=3, shard_tokens=10, progress=False, hidden_layers=[2])


def _same(cache_dir) -> list[tuple]:
    """What must not depend on who wrote the cache: each shard's rows, tokens and bytes."""
    m = json.loads((Path(cache_dir) / "manifest.json").read_text())
    return [(s["first_row"], s["num_rows"], s["num_tokens"], s["bytes"], s["sha256"]) for s in m["shards"]]


def _writers(cache_dir) -> set[tuple[int, int]]:
    m = json.loads((Path(cache_dir) / "manifest.json").read_text())
    return {(s["written_by"]["rank"], s["written_by"]["world_size"]) for s in m["shards"]}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    ActivationCollector(FakeWrapper()).collect(make_rows(), d, **KW)
    return d


def test_the_plan_is_the_shards_one_process_writes(one_process):
    rows = make_rows()
    plan = plan_shards(rows.attention_mask, KW["batch_size"], KW["shard_tokens"])
    assert [(a, b - a) for a, b in plan] == [(r[0], r[1]) for r in _same(one_process)]
    assert len(plan) > 2


def test_two_ranks_write_parts_that_join_into_the_one_process_cache(one_process, tmp_path):
    for rank in (1, 0):
        got = ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, ranks=Ranks(rank, 2), **KW)
        assert got is None and has_parts(tmp_path)  # nothing is a cache until the parts are joined
    cache = join_parts(tmp_path)
    assert _same(tmp_path) == _same(one_process) and _writers(tmp_path) == {(0, 2), (1, 2)}
    assert not has_parts(tmp_path) and not list(tmp_path.glob("part-*.json"))
    a, b = cache.load(), RoutingCache.open(one_process).load()
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.doc_ids, b.doc_ids)
    # a joined cache is an ordinary complete cache: collecting it again traces nothing
    again = FakeWrapper()
    ActivationCollector(again).collect(make_rows(), tmp_path, **KW)
    assert again.calls == 0


def test_parts_of_a_stopped_rank_are_finished_by_any_later_run(one_process, tmp_path):
    ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, ranks=Ranks(0, 2), **KW)
    with pytest.raises(CacheError, match="lacks rows .* run the same command again"):
        join_parts(tmp_path)  # rank 1 never wrote its parts
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("part-*.safetensors")}
    later = FakeWrapper()
    cache = ActivationCollector(later).collect(make_rows(), tmp_path, **KW)  # one process, no ranks
    assert isinstance(cache, RoutingCache) and cache.complete and _same(tmp_path) == _same(one_process)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # rank 0's parts were not traced again
    plan = plan_shards(make_rows().attention_mask, KW["batch_size"], KW["shard_tokens"])
    odd_batches = sum(-(-(b - a) // KW["batch_size"]) for i, (a, b) in enumerate(plan) if i % 2)
    assert later.calls == odd_batches


def test_shards_one_process_committed_before_a_split_count_as_parts(one_process, tmp_path):
    with pytest.raises(Killed):
        ActivationCollector(FakeWrapper(fail_on_call=5)).collect(make_rows(), tmp_path, **KW)
    kept = {s["file"] for s in json.loads((tmp_path / "manifest.json").read_text())["shards"]}
    assert kept
    for rank in (0, 1):
        ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, ranks=Ranks(rank, 2), **KW)
    join_parts(tmp_path)
    files = [s["file"] for s in json.loads((tmp_path / "manifest.json").read_text())["shards"]]
    assert kept <= set(files) and _same(tmp_path) == _same(one_process)
