"""Routing statistics on routings with known answers: uniform, one-expert collapse, compact storage."""

import json

import numpy as np
import pytest
import torch

from core.routing_data import RoutingData
from tests.fakes import routing
from core.analysis.routing_stats import CollapseThresholds, RoutingStatsAccumulator, routing_stats


def _routing(topk_idx, num_experts, logits=None):
    k = np.shape(topk_idx)[2]
    return routing(topk_idx, num_experts, weights=np.full(np.shape(topk_idx), 1.0 / k), logits=logits)


def _uniform(E=8, k=2, L=3, reps=10):
    # every expert selected equally often, router logits all equal
    rows = [[(i + j) % E for j in range(k)] for i in range(E)] * reps
    idx = np.array([[r] * L for r in rows])
    return _routing(idx, E, logits=np.zeros((len(rows), L, E)))


def test_uniform_routing_has_entropy_log_e_and_is_healthy():
    E = 8
    s = routing_stats(_uniform(E))
    np.testing.assert_allclose(s.token_entropy, np.log(E))
    np.testing.assert_allclose(s.token_entropy_norm, 1.0)
    np.testing.assert_allclose(s.utilization, 1.0 / E)
    np.testing.assert_allclose(s.utilization_entropy_norm, 1.0)
    np.testing.assert_allclose(s.selection_rate.sum(1), 2.0)
    np.testing.assert_allclose(s.cv, 0.0, atol=1e-12)
    np.testing.assert_allclose(s.max_over_mean, 1.0)
    assert not s.collapsed.any() and s.diagnosis == ["healthy"] * 3
    assert not s.dead.any() and not s.dominant.any()
    json.dumps(s.to_dict())
    assert len(s.layer_table()) == 3 and len(s.expert_table()) == 3 * E


def test_one_expert_model_is_collapsed():
    E, n = 8, 50
    logits = np.full((n, 2, E), -10.0)
    logits[..., 3] = 10.0
    s = routing_stats(_routing(np.full((n, 2, 1), 3), E, logits=logits))
    assert s.collapsed.all() and s.diagnosis == ["collapsed", "collapsed"]
    assert s.utilization[0, 3] == 1.0 and s.dead.sum(1).tolist() == [E - 1, E - 1]
    assert s.dominant[:, 3].all()
    assert s.token_entropy_norm.max() < 0.01
    assert s.reasons[0]  # says why


def test_streaming_equals_batch_and_thresholds_reported():
    rd = _uniform()
    acc = RoutingStatsAccumulator(CollapseThresholds(dead_factor=0.2))
    for chunk in rd.iter_chunks(7):
        acc.update(chunk)
    a, b = acc.result(), routing_stats(rd)
    np.testing.assert_allclose(a.counts, b.counts)
    np.testing.assert_allclose(a.token_entropy, b.token_entropy)
    assert a.to_dict()["thresholds"]["dead_factor"] == 0.2


def test_imbalanced_layer_and_compact_storage():
    E = 4
    # expert 0 takes 3/4 of assignments (3x its fair share), the rest 1/12 each; no logits
    idx = np.array([[[0]]] * 9 + [[[1]]] * 1 + [[[2]]] * 1 + [[[3]]] * 1)
    s = routing_stats(_routing(idx, E))
    assert s.diagnosis == ["imbalanced"] and s.dominant[0, 0]
    assert s.token_entropy is None and s.notes


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no tokens"):
        routing_stats([])
    rd = RoutingData(moe_layers=[0], num_experts=4, top_k=1, router_logits=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="topk_idx"):
        routing_stats(rd)
    with pytest.raises(TypeError):
        routing_stats(5)
