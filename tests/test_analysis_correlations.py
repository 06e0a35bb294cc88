"""Cross-layer correlation: a planted dependency is recovered, streaming matches batch, groups differ."""

import json

import numpy as np
import pytest
import torch

from core.analysis.correlations import (
    CountMoments,
    StreamingCorrelation,
    activation_correlations,
    correlation_difference,
    correlations_by_group,
    cross_layer_correlation,
)
from core.routing_data import RoutingData

E, L, N = 8, 3, 600


def _planted(seed=0, plant=True, domain=0):
    """Random top-1 routing; if ``plant``: expert 3 at layer 0  <=>  expert 5 at layer 2."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, E, size=(N, L, 1))
    if plant:
        idx[idx[:, 0, 0] == 3, 2, 0] = 5
        idx[(idx[:, 0, 0] != 3) & (idx[:, 2, 0] == 5), 2, 0] = 6
    logits = rng.normal(size=(N, L, E))
    logits[np.arange(N)[:, None], np.arange(L)[None], idx[..., 0]] += 4.0  # probs follow the choice
    return RoutingData(
        moe_layers=[1, 3, 5],
        num_experts=E,
        top_k=1,
        topk_idx=torch.as_tensor(idx),
        topk_weight=torch.ones(N, L, 1),
        router_logits=torch.as_tensor(logits, dtype=torch.float32),
        dataset_ids=torch.full((N,), domain),
        dataset_names=["web", "code"],
    )


def test_streaming_correlation_matches_numpy():
    x = np.random.default_rng(1).normal(size=(500, 6))
    x[:, 5] = 2 * x[:, 0] + 0.1 * x[:, 5]
    sc = StreamingCorrelation()
    for part in np.array_split(x, 7):
        sc.update(part)
    np.testing.assert_allclose(sc.correlation(), np.corrcoef(x, rowvar=False), atol=1e-10)


def test_count_moments_match_numpy_and_merge_to_the_bit():
    """0/1 features: the correlation of exact counts is numpy's, constant features are NaN, and split shares add up
    to exactly the moments of one pass, in any order."""
    rng = np.random.default_rng(2)
    x = (rng.random((700, 9)) < 0.3).astype(np.float32)
    x[:, 4] = x[:, 0]  # a copy: r = 1
    x[:, 7], x[:, 8] = 0, 1  # never and always on: undefined
    whole = CountMoments().update(x)
    r = whole.correlation()
    live = [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(r[np.ix_(live, live)], np.corrcoef(x[:, live], rowvar=False), atol=1e-12)
    assert r[0, 4] == pytest.approx(1.0) and np.isnan(r[7]).all() and np.isnan(r[:, 8]).all()
    parts = [CountMoments().update(p) for p in np.array_split(x, 5)]
    merged = parts[3].merge(parts[0]).merge(parts[4]).merge(parts[2]).merge(parts[1])
    assert merged.n == whole.n and np.array_equal(merged.q, whole.q) and np.array_equal(merged.s, whole.s)


def test_planted_cross_layer_correlation_is_recovered():
    rd = _planted()
    res = cross_layer_correlation(rd.iter_chunks(64), feature="topk")
    assert res.num_tokens == N
    assert res.pair(0, 3, 2, 5) == pytest.approx(1.0)
    top = res.top_pairs(1)
    assert (top.loc[0, "layer_a"], top.loc[0, "expert_a"], top.loc[0, "layer_b"], top.loc[0, "expert_b"]) == (
        1,
        3,
        5,
        5,
    )
    assert res.layer_max_abs[0, 2] == pytest.approx(1.0)
    assert res.layer_max_abs[0, 1] < 0.3  # layers 0 and 1 are independent
    probs = cross_layer_correlation(rd, feature="probs")
    assert probs.pair(0, 3, 2, 5) > 0.8
    json.dumps(res.to_dict())


def test_groups_and_difference():
    from core.routing_data import RoutingData as RD

    both = RD.concat([_planted(0, True, 0), _planted(1, False, 1)])
    groups = correlations_by_group(both.iter_chunks(100), by="dataset")
    assert set(groups) == {"web", "code"}
    d = correlation_difference(groups["web"], groups["code"])
    assert d.diff[0 * E + 3, 2 * E + 5] > 0.8
    assert d.layer_mean_abs_diff.shape == (L, L)
    out = activation_correlations(both)
    assert set(out) == {"topk", "probs"}


def test_bad_input():
    rd = _planted()
    with pytest.raises(ValueError, match="feature"):
        cross_layer_correlation(rd, feature="logits")
    rd.router_logits = None
    with pytest.raises(ValueError, match="router_logits"):
        cross_layer_correlation(rd, feature="probs")
    assert set(activation_correlations(rd)) == {"topk"}
