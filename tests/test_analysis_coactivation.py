"""Co-activation within layers and routing paths across layers on hand-built routings."""

import json

import numpy as np
import pytest

from core.analysis.coactivation import coactivation, routing_paths
from tests.fakes import routing


def _rd(idx, E, weights=None):
    return routing(idx, E, weights=weights)


def test_within_layer_conditional_probability():
    # experts 0 and 1 always together; expert 2 with 3 half the time, with 0 the other half
    idx = [[[0, 1]]] * 4 + [[[2, 3]]] * 2 + [[[2, 0]]] * 2
    c = coactivation(_rd(idx, 4))
    cond = c.conditional[0]
    assert cond[1, 0] == 1.0  # P(0 | 1)
    assert cond[2, 3] == 0.5 and cond[2, 0] == 0.5
    assert cond[0, 1] == pytest.approx(4 / 6)
    np.testing.assert_allclose(np.diagonal(cond), 1.0)
    assert c.counts[0].tolist() == [6, 4, 4, 2]
    json.dumps(c.to_dict())


def test_transitions_and_paths():
    # path (0, 1, 2) for 6 tokens, (3, 3, 3) for 2 tokens; top-1 is the heavier of the two selected
    idx = [[[0, 2], [1, 0], [2, 1]]] * 6 + [[[1, 3], [0, 3], [3, 0]]] * 2
    w = [[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]] * 6 + [[[0.1, 0.9], [0.2, 0.8], [0.6, 0.4]]] * 2
    rd = _rd(idx, 4, w)
    c = coactivation(rd.iter_chunks(3))
    assert c.transitions.shape == (2, 4, 4)
    assert c.transitions[0, 0, 1] == 6 and c.transitions[0, 3, 3] == 2
    assert c.transition_probs[1, 1, 2] == 1.0
    p = routing_paths(rd.iter_chunks(3), top_n=5)
    assert p.top_paths == [(0, 1, 2), (3, 3, 3)] and p.top_counts == [6, 2]
    assert p.num_unique == 2
    expected = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert p.entropy == pytest.approx(expected)
    assert p.entropy_norm == pytest.approx(expected / np.log(8))  # min(4**3, 8 tokens) = 8
    sub = routing_paths(rd, layers=[0, 2])
    assert sub.layers == [0, 2] and sub.top_paths[0] == (0, 2)
    assert list(p.table().columns) == ["path", "count", "share"]
    json.dumps(p.to_dict())


def test_single_path_has_zero_entropy_and_bad_layers_error():
    rd = _rd([[[1], [2]]] * 5, 3)
    assert routing_paths(rd).entropy == 0.0
    with pytest.raises(ValueError, match="positions"):
        routing_paths(rd, layers=[5])


def test_paths_past_max_paths_keep_the_frequent_ones_in_bounded_memory():
    """16 layers x 64 experts: almost every token has its own path; the counter must not grow with the tokens."""
    import torch

    from core.analysis.coactivation import RoutingPathsAccumulator
    from core.routing_data import RoutingData

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 64, (20_000, 16, 1), generator=g)
    idx[::10] = 5  # one planted path taken by a tenth of the tokens
    idx[1::25] = 7  # and another by a twenty-fifth
    rd = RoutingData(moe_layers=list(range(16)), num_experts=64, top_k=1, topk_idx=idx, topk_weight=torch.ones(idx.shape))
    acc = RoutingPathsAccumulator(max_paths=500)
    for chunk in rd.iter_chunks(2000):
        acc.update(chunk)
        assert len(acc.counter) <= 2 * 500
    res, exact = acc.result(), routing_paths(rd)
    assert exact.exact and not res.exact and res.pruned_tokens > 0
    assert res.top_paths[:2] == exact.top_paths[:2] == [(5,) * 16, (7,) * 16]
    assert res.top_counts[:2] == exact.top_counts[:2] == [2000, 800]
    assert res.entropy >= exact.entropy - 1e-9 and abs(res.entropy - exact.entropy) < 0.01
    assert res.num_unique == exact.num_unique
