"""The shared streaming protocol: one fold feeds every accumulator, and the adapters compose them."""

from __future__ import annotations

import numpy as np
import pytest

from core.analysis.correlations import CorrelationAccumulator, cross_layer_correlation
from core.analysis.routing_stats import RoutingStatsAccumulator, routing_stats
from core.analysis.streaming import (
    GroupedResults,
    PerGroup,
    Pick,
    RoutingAccumulator,
    WhenRecorded,
    align,
    fold,
    fold_one,
)
from core.routing_data import RoutingData
from tests.fakes import routing


def _planted(n=400, E=4, seed=0, logits=True):
    """Two layers, top-2; domain 0 prefers experts {0, 1}, domain 1 experts {2, 3}; a few unlabelled tokens."""
    rng = np.random.default_rng(seed)
    dom = rng.integers(0, 2, n)
    dom[:7] = -1
    idx = np.empty((n, 2, 2), dtype=np.int64)
    for t in range(n):
        pool = [0, 1] if dom[t] == 0 else [2, 3] if dom[t] == 1 else [0, 2]
        for layer in range(2):
            idx[t, layer] = rng.permutation(pool) if rng.random() < 0.9 else rng.choice(E, 2, replace=False)
    lg = rng.normal(size=(n, 2, E)) if logits else None
    return routing(idx, E, logits=lg, token_ids=rng.integers(0, 50, n), positions=np.arange(n) % 16,
                   doc_ids=np.arange(n) // 16, domain_ids=dom, dataset_ids=np.where(dom < 0, -1, 0),
                   domain_names=["general", "code"], dataset_names=["toy"])


class CountingStream:
    """A re-iterable stream that counts how often each chunk was produced."""

    def __init__(self, rd: RoutingData, size: int):
        self.rd, self.size, self.reads = rd, size, 0

    def __iter__(self):
        for chunk in self.rd.iter_chunks(self.size):
            self.reads += 1
            yield chunk


def test_fold_reads_each_chunk_once_and_matches_single_folds():
    rd = _planted()
    stream = CountingStream(rd, 64)
    timings: dict[str, float] = {}
    out = fold(stream, {"stats": RoutingStatsAccumulator(), "corr": CorrelationAccumulator("topk")}, timings=timings)
    assert stream.reads == -(-rd.num_tokens // 64)
    alone = routing_stats(rd)
    np.testing.assert_allclose(out["stats"].utilization, alone.utilization)
    np.testing.assert_allclose(out["corr"].corr, cross_layer_correlation(rd).corr, atol=1e-12)
    assert set(timings) == {"stats", "corr", "reading"} and all(v >= 0 for v in timings.values())
    # a known answer: every token selects two of four experts, so utilization per layer is a distribution
    np.testing.assert_allclose(out["stats"].utilization.sum(axis=1), 1.0)


def test_routing_accumulator_checks_layout_fields_and_emptiness():
    rd = _planted()
    acc = RoutingStatsAccumulator()
    acc.update(rd.select(slice(0, 0)))  # an empty first chunk sets the layout and adds nothing
    acc.update(rd.select(slice(0, 10)))
    assert acc.num_tokens == 10
    other = routing(np.zeros((3, 2, 2), dtype=int), 8)
    with pytest.raises(ValueError, match="E=8.*stream started with layers \\[0, 1\\], E=4"):
        acc.update(other)
    with pytest.raises(ValueError, match="no tokens were given"):
        RoutingStatsAccumulator().result()
    with pytest.raises(TypeError, match="takes RoutingData"):
        RoutingStatsAccumulator().update([rd])

    class NeedsLogits(RoutingAccumulator):
        name, needs = "a logit analysis", ("router_logits",)

        def _add(self, chunk):
            pass

    with pytest.raises(ValueError, match="a logit analysis needs routing with router_logits recorded"):
        NeedsLogits().update(_planted(logits=False))


def test_per_group_sees_only_its_tokens_and_counts_the_unlabelled():
    rd = _planted()
    res = fold_one(rd.iter_chunks(50), PerGroup(RoutingStatsAccumulator, by="domain"))
    assert isinstance(res, GroupedResults) and list(res) == ["general", "code"]
    dom = rd.domain_ids.numpy()
    for g, name in enumerate(["general", "code"]):
        subset = rd.select(np.nonzero(dom == g)[0])
        np.testing.assert_allclose(res[name].utilization, routing_stats(subset).utilization)
        assert res[name].num_tokens == subset.num_tokens
    # planted preferences are recovered: general uses experts 0-1, code experts 2-3
    assert res["general"].utilization[:, :2].sum(axis=1).min() > 0.85
    assert res["code"].utilization[:, 2:].sum(axis=1).min() > 0.85
    acc = PerGroup(RoutingStatsAccumulator, by="domain")
    fold_one(rd, acc)
    assert acc.unlabelled == 7


def test_per_group_skips_a_group_too_small_for_its_analysis():
    rd = _planted()
    dom = rd.domain_ids.clone()
    dom[10] = 2  # one token of a third domain
    rd.domain_ids, rd.domain_names = dom, ["general", "code", "math"]
    res = fold_one(rd, PerGroup(lambda: CorrelationAccumulator("topk"), by="domain"))
    assert set(res) == {"general", "code"} and "math" in res.skipped
    assert res["general"].group == "general"


def test_when_recorded_gives_none_if_any_chunk_lacks_the_field():
    with_logits, without = _planted(), _planted(logits=False)
    assert fold_one(with_logits, WhenRecorded(CorrelationAccumulator("probs"))) is not None
    assert fold_one([with_logits, without], WhenRecorded(CorrelationAccumulator("probs"))) is None
    assert fold_one(without, WhenRecorded(CorrelationAccumulator("probs"))) is None


def test_align_zips_the_same_tokens_across_different_chunkings():
    a, b = _planted(seed=1), _planted(seed=1)
    pairs = list(align([a.iter_chunks(30), b.iter_chunks(47)]))
    assert sum(x.num_tokens for x, _ in pairs) == a.num_tokens
    for x, y in pairs:
        assert x.num_tokens == y.num_tokens
        assert np.array_equal(x.token_ids.numpy(), y.token_ids.numpy())
    # Pick reads one checkpoint of the aligned stream: the last by default
    first = fold(align([a.iter_chunks(30), _planted(seed=2).iter_chunks(47)]),
                 {"first": Pick(RoutingStatsAccumulator(), 0), "last": Pick(RoutingStatsAccumulator())})
    np.testing.assert_allclose(first["first"].utilization, routing_stats(a).utilization)
    np.testing.assert_allclose(first["last"].utilization, routing_stats(_planted(seed=2)).utilization)
    with pytest.raises(ValueError, match=r"stream\(s\) \[1\] end after 300 tokens"):
        list(align([a.iter_chunks(30), b.select(slice(0, 300)).iter_chunks(47)]))
