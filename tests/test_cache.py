"""The on-disk routing cache: exact round trip, checksums, identity checks, atomic commits."""

from __future__ import annotations

import json

import pytest
import torch

from core.store.cache import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    RoutingCache,
    RoutingCacheWriter,
)
from tests.fakes import FakeWrapper, make_rows


def header(**over):
    h = {
        "model_name": "fake/moe",
        "revision": "r1",
        "model_identity": {"kind": "named", "name": "fake/moe", "revision": "r1"},
        "dataset": "toy",
        "settings": {"storage": "full", "dtype": "float32", "batch_size": 4, "hidden_layers": [2]},
        "moe_layers": [0, 2],
        "num_experts": 8,
        "top_k": 2,
        "score_fn": "softmax",
        "domain_names": ["general", "math"],
        "dataset_names": ["toy"],
        "num_rows": 2,
        "data_fingerprint": "abc",
    }
    h.update(over)
    return h


def routing(hidden=(2,)):
    rows = make_rows(2, 9)
    rd = FakeWrapper().trace_routing(rows.input_ids, rows.attention_mask, hidden_layers=hidden)
    rd.doc_ids = rows.doc_ids[rows.attention_mask.bool()]
    rd.domain_names, rd.dataset_names = ["general", "math"], ["toy"]
    return rd


def write(tmp_path, rd, **over):
    w = RoutingCacheWriter(tmp_path, header(**over))
    w.write_shard(rd.select(slice(0, 9)), 0, 1)
    w.write_shard(rd.select(slice(9, None)), 1, 1)
    return w.finish()


def test_round_trip_is_exact_in_float32(tmp_path):
    rd = routing()
    cache = write(tmp_path, rd)
    back = RoutingCache.open(tmp_path).load()
    assert cache.num_tokens == rd.num_tokens == back.num_tokens
    for name in ("router_logits", "topk_idx", "topk_weight", "token_ids", "positions", "doc_ids"):
        assert torch.equal(getattr(back, name), getattr(rd, name)), name
    assert back.topk_idx.dtype == torch.long
    assert torch.equal(back.hidden[2], rd.hidden[2])
    assert (back.moe_layers, back.num_experts, back.top_k, back.score_fn) == ([0, 2], 8, 2, "softmax")
    assert back.domain_names == ["general", "math"]


def test_float16_and_compact_storage(tmp_path):
    rd = routing(hidden=())
    settings = {"storage": "full", "dtype": "float16", "batch_size": 4, "hidden_layers": []}
    full = write(tmp_path / "full", rd, settings=settings)
    back = full.load(dtype=None)
    assert back.router_logits.dtype == torch.float16
    assert torch.equal(back.router_logits, rd.router_logits.half())
    assert torch.equal(back.topk_weight, rd.topk_weight.half())
    compact = write(tmp_path / "compact", rd, settings={**settings, "storage": "compact"})
    c = compact.load()
    assert c.router_logits is None and torch.equal(c.topk_idx, rd.topk_idx)
    assert compact.bytes_per_token() < full.bytes_per_token()
    assert len(list(compact.iter_shards())) == 2


def test_corrupted_shard_is_detected(tmp_path):
    write(tmp_path, routing())
    shard = tmp_path / "shard-00001.safetensors"
    payload = bytearray(shard.read_bytes())
    payload[-3] ^= 0xFF  # flip bits inside the tensor data, same size
    shard.write_bytes(bytes(payload))
    cache = RoutingCache.open(tmp_path)
    cache.load_shard(0)  # the good shard still reads
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        cache.load_shard(1)
    with pytest.raises(CacheCorruptError, match="shard-00001.safetensors"):
        cache.verify()
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        cache.load_shard(0)


def test_mismatched_cache_is_refused_naming_what_differs(tmp_path):
    w = RoutingCacheWriter(tmp_path, header())
    w.write_shard(routing().select(slice(0, 9)), 0, 1)
    with pytest.raises(CacheMismatchError, match="revision: cache has 'r1', you asked for 'r2'") as e:
        RoutingCacheWriter(tmp_path, header(revision="r2"))
    assert "settings" not in str(e.value)
    bad_settings = header(settings={**header()["settings"], "storage": "compact"})
    with pytest.raises(CacheMismatchError, match="settings.storage: cache has 'full', you asked for 'compact'"):
        RoutingCacheWriter(tmp_path, bad_settings)
    # force discards the old cache and starts over
    w2 = RoutingCacheWriter(tmp_path, header(revision="r2"), force=True)
    assert w2.next_row == 0 and not (tmp_path / "shard-00000.safetensors").exists()


def test_incomplete_cache_refused_unless_asked_and_resume_point(tmp_path):
    rd = routing()
    w = RoutingCacheWriter(tmp_path, header())
    w.write_shard(rd.select(slice(0, 9)), 0, 1)
    with pytest.raises(CacheIncompleteError, match="1 of 2 rows"):
        RoutingCache.open(tmp_path)
    assert RoutingCache.open(tmp_path, allow_incomplete=True).num_tokens == 9
    with pytest.raises(CacheIncompleteError):
        w.finish()
    # files the manifest does not name are never removed or overwritten, whatever their names
    (tmp_path / "shard-00001.safetensors").write_bytes(b"not the cache's")
    (tmp_path / "shard-00001.safetensors.tmp").write_bytes(b"half")
    w2 = RoutingCacheWriter(tmp_path, header())
    assert w2.next_row == 1
    with pytest.raises(CacheError, match="duplicated or dropped"):
        w2.write_shard(rd.select(slice(9, None)), 0, 1)
    with pytest.raises(CacheError, match="shard-00001.safetensors is in the way"):
        w2.write_shard(rd.select(slice(9, None)), 1, 1)
    assert (tmp_path / "shard-00001.safetensors").read_bytes() == b"not the cache's"
    assert (tmp_path / "shard-00001.safetensors.tmp").read_bytes() == b"half"
    (tmp_path / "shard-00001.safetensors").unlink()
    w2.write_shard(rd.select(slice(9, None)), 1, 1)
    assert RoutingCache.open(tmp_path).num_tokens == rd.num_tokens


def test_manifest_lists_checksums_and_counts(tmp_path):
    write(tmp_path, routing())
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["complete"] and m["total_tokens"] == sum(s["num_tokens"] for s in m["shards"])
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["shards"])
    with pytest.raises(CacheError, match="no routing cache"):
        RoutingCache.open(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="not valid JSON"):
        RoutingCache.open(tmp_path)


def test_open_with_expectations(tmp_path):
    write(tmp_path, routing())
    opened = RoutingCache.open(tmp_path, expect={"revision": "r1", "settings": {"storage": "full"}})
    assert opened.num_tokens == routing().num_tokens
    with pytest.raises(CacheMismatchError, match="model_name: cache has 'fake/moe', you asked for 'other'"):
        RoutingCache.open(tmp_path, expect={"model_name": "other"})
    with pytest.raises(CacheMismatchError, match="settings.dtype"):
        RoutingCache.open(tmp_path, expect={"settings": {"dtype": "float16"}})


def test_caches_stream_into_analyses_like_loaded_routing(tmp_path):
    """A RoutingCache and a CacheStream of several caches are re-iterable inputs with the same results as loading."""
    import numpy as np

    from core.analysis.correlations import cross_layer_correlation
    from core.store.cache import CacheStream
    from core.analysis.routing_stats import routing_stats
    from core.routing_data import RoutingData

    rd = routing(hidden=())
    a = write(tmp_path / "a", rd, settings={"storage": "full", "dtype": "float32", "batch_size": 4, "hidden_layers": []})
    b = write(tmp_path / "b", rd, settings={"storage": "full", "dtype": "float32", "batch_size": 4, "hidden_layers": []})
    assert [c.num_tokens for c in a] == [9, rd.num_tokens - 9], "iterating a cache yields its shards"
    stream = CacheStream([a, b])
    assert stream.num_tokens == 2 * rd.num_tokens and stream.has_logits
    loaded = RoutingData.concat([a.load(), b.load()])
    s1, s2 = routing_stats(stream), routing_stats(loaded)
    np.testing.assert_array_equal(s1.counts, s2.counts)
    np.testing.assert_allclose(s1.token_entropy, s2.token_entropy, rtol=1e-6)
    np.testing.assert_allclose(cross_layer_correlation(stream).corr, cross_layer_correlation(loaded).corr, atol=1e-9)
    assert routing_stats(stream).num_tokens == s1.num_tokens, "a second pass reads the caches again"


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(total_tokens=m["total_tokens"] + 1000), "total_tokens"),
    (lambda m: m.update(rows_done=m["rows_done"] - 1), "rows_done"),
    (lambda m: m["shards"][1].update(first_row=m["shards"][1]["first_row"] + 1), "row by row"),
    (lambda m: m.pop("shards"), "missing or malformed"),
])
def test_a_manifest_whose_numbers_do_not_add_up_is_refused(tmp_path, edit, says):
    """The report quotes the manifest's token counts: an edited manifest must not reach it, checksum or not."""
    from core.store.cache_format import sealed_manifest

    write(tmp_path, routing())
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        RoutingCache.open(tmp_path)
    manifest.pop("sha256")
    path.write_text(json.dumps(sealed_manifest(manifest)))  # an edit that also recomputes the checksum
    with pytest.raises(CacheCorruptError, match=says):
        RoutingCache.open(tmp_path)


def test_a_shard_entry_edited_together_with_the_total_is_caught_on_read(tmp_path):
    from core.store.cache_format import sealed_manifest

    write(tmp_path, routing())
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["num_tokens"] += 5
    manifest["total_tokens"] += 5  # consistent totals, wrong entry, and the checksum recomputed
    path.write_text(json.dumps(sealed_manifest({k: v for k, v in manifest.items() if k != "sha256"})))
    cache = RoutingCache.open(tmp_path)
    with pytest.raises(CacheCorruptError, match="manifest entry says"):
        cache.load_shard(0)


def test_compact_cache_at_olmoe_routing_shape_is_at_most_three_bytes_per_slot_plus_16(tmp_path):
    """16 MoE layers, top-8 of 64 experts: a one-byte expert id and a 16-bit weight per slot, 16 bytes of metadata."""
    from core.routing_data import RoutingData

    g = torch.Generator().manual_seed(0)
    n, L, k, E = 4000, 16, 8, 64
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n * L)]).view(n, L, k)
    idx[5, 3, -2:] = -1  # slots that selected nothing survive the one-byte encoding
    w = torch.rand(n, L, k, generator=g)
    rd = RoutingData(moe_layers=list(range(L)), num_experts=E, top_k=k, topk_idx=idx, topk_weight=w,
                     token_ids=torch.randint(0, 50_280, (n,), generator=g), doc_ids=torch.arange(n) // 100,
                     positions=torch.arange(n) % 2048, domain_ids=torch.zeros(n, dtype=torch.long),
                     dataset_ids=torch.zeros(n, dtype=torch.long), domain_names=["d"], dataset_names=["s"])
    h = header(moe_layers=list(range(L)), num_experts=E, top_k=k, num_rows=1,
               settings={"storage": "compact", "dtype": "float16", "batch_size": 4, "hidden_layers": []})
    writer = RoutingCacheWriter(tmp_path, h)
    writer.write_shard(rd, 0, 1)
    cache = writer.finish()
    assert cache.bytes_per_token() <= L * k * 3 + 16, cache.bytes_per_token()
    back = cache.load()
    assert torch.equal(back.topk_idx, idx) and back.topk_idx[5, 3, -1] == -1
    assert torch.equal(back.topk_weight, w.half().float())
    for name in ("token_ids", "doc_ids", "positions"):
        assert torch.equal(getattr(back, name), getattr(rd, name))
