"""The collection loop: padding stays out, interrupted runs resume to identical caches, seed API works."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import core.store.cache as rc
from core.collection.collector import ActivationCollector
from core.store.cache import CacheMismatchError, RoutingCache
from tests.fakes import FakeTokenizer, FakeWrapper, Killed, make_rows

KW = dict(batch_size=3, shard_tokens=10, progress=False)
ROOT = Path(__file__).resolve().parents[1]


def shards(cache_dir) -> list[tuple]:
    m = json.loads((Path(cache_dir) / "manifest.json").read_text())
    return [(s["file"], s["first_row"], s["num_rows"], s["num_tokens"], s["sha256"]) for s in m["shards"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, to compare resumed runs against."""
    d = tmp_path_factory.mktemp("ref")
    cache = ActivationCollector(FakeWrapper()).collect(make_rows(), d, hidden_layers=[2], **KW)
    return d, cache


def test_padding_never_enters_and_labels_line_up(reference):
    d, cache = reference
    rows = make_rows()
    mask = rows.attention_mask.bool()
    rd = RoutingCache.open(d).load()
    assert rd.num_tokens == cache.num_tokens == int(rows.attention_mask.sum())
    assert torch.equal(rd.token_ids, rows.input_ids[mask])
    assert torch.equal(rd.doc_ids, rows.doc_ids[mask]) and torch.equal(rd.positions, rows.positions[mask])
    assert torch.equal(rd.domain_ids, rows.domain_ids[mask]) and (rd.dataset_ids == 0).all()
    assert rd.hidden[2].shape == (rd.num_tokens, FakeWrapper.hidden_size)
    full = FakeWrapper().trace_routing(rows.input_ids, rows.attention_mask)
    assert torch.equal(rd.topk_idx, full.topk_idx)
    assert torch.equal(rd.router_logits, full.router_logits.half().float())
    m = cache.manifest
    assert cache.num_shards > 2 and m["rows_done"] == m["num_rows"] == 13 and m["complete"]
    assert all(s["num_rows"] % 3 == 0 for s in m["shards"][:-1])  # shards hold whole batches


def test_killed_between_shards_resumes_to_identical_cache(tmp_path, reference):
    with pytest.raises(Killed):
        ActivationCollector(FakeWrapper(fail_on_call=4)).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)
    partial = shards(tmp_path)
    assert 0 < len(partial) < len(shards(reference[0]))
    wrapper = FakeWrapper()
    ActivationCollector(wrapper).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)
    assert shards(tmp_path) == shards(reference[0])
    assert wrapper.calls < 5  # only the rows after the last committed shard were traced again
    calls = wrapper.calls
    ActivationCollector(wrapper).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)  # complete: no work
    assert wrapper.calls == calls


def test_killed_while_writing_a_shard_resumes_to_identical_cache(tmp_path, reference, monkeypatch):
    real = rc.atomic_write_bytes
    count = {"shards": 0}

    def dying_write(path, payload, **kw):
        if path.name.startswith("shard-"):
            count["shards"] += 1
            if count["shards"] == 3:  # half the bytes reach the temp file, then the process "dies"
                (path.parent / rc.shard_temp_name(path.name)).write_bytes(payload[: len(payload) // 2])
                raise Killed("killed mid-write")
        real(path, payload, **kw)

    monkeypatch.setattr(rc, "atomic_write_bytes", dying_write)
    with pytest.raises(Killed):
        ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)
    monkeypatch.setattr(rc, "atomic_write_bytes", real)
    assert len(shards(tmp_path)) == 2
    # also a truncated shard file that got renamed but never made it into the manifest
    (tmp_path / "shard-00002.safetensors").write_bytes(b"\x00" * 17)
    ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)
    assert shards(tmp_path) == shards(reference[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_sigkill_mid_write_resumes_to_identical_cache(tmp_path, reference):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import core.store.cache as rc
        from core.collection.collector import ActivationCollector
        from tests.fakes import FakeWrapper, make_rows
        real, n = rc.atomic_write_bytes, [0]
        def write(path, payload, **kw):
            if path.name.startswith("shard-"):
                n[0] += 1
                if n[0] == 3:
                    with open(path.parent / rc.shard_temp_name(path.name), "wb") as f:
                        f.write(payload[: len(payload) // 2]); f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
            real(path, payload, **kw)
        rc.atomic_write_bytes = write
        ActivationCollector(FakeWrapper()).collect(make_rows(), {str(tmp_path)!r}, hidden_layers=[2],
                                                   batch_size=3, shard_tokens=10, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(shards(tmp_path)) == 2 and list(tmp_path.glob("*.tmp"))
    ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path, hidden_layers=[2], **KW)
    assert shards(tmp_path) == shards(reference[0])


def test_changed_data_or_settings_are_refused(tmp_path):
    c = ActivationCollector(FakeWrapper())
    with pytest.raises(Killed):
        ActivationCollector(FakeWrapper(fail_on_call=2)).collect(make_rows(), tmp_path, **KW)
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        c.collect(make_rows(seed=1), tmp_path, **KW)
    with pytest.raises(CacheMismatchError, match="settings.storage: cache has 'full', you asked for 'compact'"):
        c.collect(make_rows(), tmp_path, **{**KW, "storage": "compact"})
    other = FakeWrapper()
    other.revision = "r2"
    with pytest.raises(CacheMismatchError, match="revision: cache has 'r1', you asked for 'r2'"):
        ActivationCollector(other).collect(make_rows(), tmp_path, **KW)


def test_compact_storage_and_bad_arguments(tmp_path):
    c = ActivationCollector(FakeWrapper(), progress=False)
    cache = c.collect(make_rows(), tmp_path, storage="compact", batch_size=4, shard_tokens=1000)
    rd = cache.load()
    assert rd.router_logits is None and rd.topk_idx.shape == (cache.num_tokens, 2, 2)
    assert cache.num_shards == 1
    with pytest.raises(ValueError, match="storage must be one of"):
        c.collect(make_rows(), tmp_path / "x", storage="half")
    with pytest.raises(TypeError, match="input_ids"):
        c.collect([[1, 2, 3]], tmp_path / "y")
    with pytest.raises(TypeError, match="MoEModelWrapper"):
        ActivationCollector(object())


def test_seed_api_in_memory_and_cached(tmp_path):
    texts = ["The cat sat.", "x = 1 + 2", "A much longer sentence about mixtures of experts."]
    collector = ActivationCollector(FakeWrapper(tokenizer=FakeTokenizer()), progress=False)
    acts = collector.collect_router_activations(texts)
    assert acts.num_tokens == sum(len(t) for t in texts)
    assert acts.doc_ids.tolist() == sum(([i] * len(t) for i, t in enumerate(texts)), [])
    cached = collector.collect_router_activations(texts, cache_dir=tmp_path, batch_size=2)
    assert torch.equal(cached.topk_idx, acts.topk_idx)
    corr = collector.compute_activation_correlations(acts)
    assert set(corr) == {"topk", "probs"}
    streamed = collector.compute_activation_correlations(RoutingCache.open(tmp_path))
    assert streamed["topk"].corr.shape == corr["topk"].corr.shape
    with pytest.raises(ValueError, match="non-empty list of strings"):
        collector.collect_router_activations([])
    with pytest.raises(ValueError, match="no tokenizer"):
        ActivationCollector(FakeWrapper()).collect_router_activations(["hi"])


def test_all_padding_batch_counts_as_done(tmp_path):
    rows = make_rows()
    rows.attention_mask[3:6] = 0  # the whole second batch is padding
    for name in ("doc_ids", "positions", "domain_ids", "dataset_ids"):
        getattr(rows, name)[3:6] = -1
    wrapper = FakeWrapper()
    cache = ActivationCollector(wrapper).collect(rows, tmp_path, hidden_layers=[2], batch_size=3, shard_tokens=1,
                                                 progress=False)
    rd = cache.load()
    assert rd.num_tokens == int(rows.attention_mask.sum()) and wrapper.calls == 4
    s = cache.manifest["shards"]
    assert (s[1]["first_row"], s[1]["num_rows"]) == (3, 6)  # the empty batch rides along with the next one
    assert sum(x["num_rows"] for x in s) == 13 and rd.hidden[2].shape[1] == FakeWrapper.hidden_size
    assert (rd.doc_ids >= 0).all() and (rd.positions >= 0).all()


def test_cache_of_only_padding_rows(tmp_path):
    rows = make_rows(4, 5)
    rows.attention_mask[:] = 0
    cache = ActivationCollector(FakeWrapper()).collect(rows, tmp_path, batch_size=2, progress=False)
    assert cache.num_tokens == 0 and cache.complete and cache.load().topk_idx.shape == (0, 2, 2)


def test_fake_wrapper_is_deterministic():
    rows = make_rows()
    a = FakeWrapper().trace_routing(rows.input_ids, rows.attention_mask)
    b = FakeWrapper().trace_routing(rows.input_ids, rows.attention_mask)
    assert torch.equal(a.router_logits, b.router_logits)
    assert a.num_tokens == int(rows.attention_mask.sum())
