"""Routing statistics on routings with known answers: uniform, one-expert collapse, compact storage."""

import json

import numpy as np
import pytest
import torch

from core.routing_data import RoutingData
from tests.fakes import routing
from core.analysis.routing_stats import CollapseThresholds, RoutingStatsAccumulator, routing_stats
from core.analysis.streaming import fold_one


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
    E, n = 8, 500
    logits = np.full((n, 2, E), -10.0)
    logits[..., 3] = 10.0
    s = routing_stats(_routing(np.full((n, 2, 1), 3), E, logits=logits))
    assert s.collapsed.all() and s.diagnosis == ["collapsed", "collapsed"]
    assert s.utilization[0, 3] == 1.0 and s.dead.sum(1).tolist() == [E - 1, E - 1]
    assert s.dominant[:, 3].all()
    assert s.token_entropy_norm.max() < 0.01
    assert s.reasons[0]  # says why
    few = routing_stats(_routing(np.full((50, 1, 1), 3), E))
    # 0 of 50 tokens is what a share of 1/80 (the dead threshold) gives with probability 0.53: not evidence of a
    # dead expert; but one expert taking every token is a collapse beyond noise even at 50 tokens
    assert few.diagnosis == ["collapsed"] and not few.dead.any() and "selected by 100.0% of tokens" in few.reasons[0][-1]


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
    idx = np.array(([[[0]]] * 9 + [[[1]]] * 1 + [[[2]]] * 1 + [[[3]]] * 1) * 10)
    s = routing_stats(_routing(idx, E))
    assert s.diagnosis == ["imbalanced"] and s.dominant[0, 0]
    assert s.token_entropy is None and s.notes
    few = routing_stats(_routing(idx[:12], E))  # 9 of 12 at k=1: P = 0.07 under a share of 1/2, not beyond noise
    assert not few.dominant.any() and few.reasons == [["load CV 1.15 > 1.0"]]  # but CV 1.15 is (uniform's 99%: 0.91)


def _weighted_routing(n: int, L: int, E: int, k: int, seed: int, docs: int, weights: dict | None = None):
    """Each token picks k distinct experts at random (Gumbel top-k), by default all equally likely: balanced routing
    up to sampling noise. ``weights`` {layer: [E] weights} plants a preference in a layer (0: never picked)."""
    rng = np.random.default_rng(seed)
    w = np.ones((L, E))
    for layer, row in (weights or {}).items():
        w[layer] = row
    with np.errstate(divide="ignore"):
        keys = np.log(w)[None] + rng.gumbel(size=(n, L, E))
    idx = np.argsort(-keys, axis=-1)[..., :k]
    return routing(idx, E, doc_ids=np.arange(n) * docs // n)


@pytest.mark.parametrize("n", [40, 1000, 5000])
def test_balanced_routing_is_healthy_at_any_number_of_tokens(n):
    """Sampling noise alone: the fixed factors of 1/E would flag experts at few tokens; the diagnosis does not."""
    L, E, k = 16, 64, 8
    s = fold_one(_weighted_routing(n, L, E, k, seed=n, docs=max(2, n // 50)), RoutingStatsAccumulator(resamples=100))
    if n == 40:  # what the fixed thresholds alone would have called dominant and dead
        assert (s.utilization > 2 / E).any() and (s.utilization < 0.1 / E).any()
    assert s.diagnosis == ["healthy"] * L and not s.dead.any() and not s.dominant.any(), s.reasons
    assert "sampling noise at" in s.null_note
    assert ("no dead or dominant expert judged" if n == 40 else "jackknife t test over document blocks") in s.null_note


def test_planted_dead_and_dominant_experts_are_caught_at_olmoe_shape():
    L, E, k, n = 16, 64, 8, 3000
    favoured, starved = np.ones(E), np.ones(E)
    favoured[7] = 6.0  # layer 5, expert 7: in most tokens' top 8, about 5x its fair share
    starved[11] = 0.0  # layer 9, expert 11: never picked
    rd = _weighted_routing(n, L, E, k, seed=1, docs=60, weights={5: favoured, 9: starved})
    s = fold_one(rd, RoutingStatsAccumulator(resamples=100))
    assert s.utilization[5, 7] > 4 / E and s.utilization[9, 11] == 0
    assert s.dominant[5, 7] and s.dead[9, 11], s.reasons
    assert s.dominant.sum() == 1 and s.dead.sum() == 1, s.reasons
    assert [li for li, d in enumerate(s.diagnosis) if d != "healthy"] == [5, 9]
    assert s.reasons[5] == ["1 dominant experts"] and s.reasons[9] == ["1 dead experts"]


def test_a_few_documents_are_not_evidence_of_dominance():
    """Every token of a document goes to one expert: the documents, not the tokens, are the sample."""
    E, docs, per_doc = 8, 8, 100
    expert_of_doc = np.array([0, 0, 0, 1, 2, 3, 4, 5])  # expert 0 takes 3 of 8 documents: 37.5%, 3x its fair share
    rd = routing(np.repeat(expert_of_doc, per_doc)[:, None, None], E, doc_ids=np.repeat(np.arange(docs), per_doc))
    assert fold_one(rd, RoutingStatsAccumulator()).dominant[0, 0]  # as independent tokens: 300 of 800, far past 2/8
    resampled = fold_one(rd, RoutingStatsAccumulator(resamples=200))
    assert not resampled.dominant[0, 0] and "over document blocks" in resampled.null_note


def test_bad_input_errors():
    with pytest.raises(ValueError, match="no tokens"):
        routing_stats([])
    rd = RoutingData(moe_layers=[0], num_experts=4, top_k=1, router_logits=torch.zeros(3, 1, 4))
    with pytest.raises(ValueError, match="topk_idx"):
        routing_stats(rd)
    with pytest.raises(TypeError):
        routing_stats(5)


def test_entropy_has_its_known_values_across_its_row_blocks():
    """Uniform rows give log E, one-hot rows 0, a rounding below 0 counts as 0; rows are summed a block at a time,
    so a long array (here 3 blocks and a part) must give each row what the row alone gives."""
    from core.analysis.measures import entropy

    E = 64
    p = np.random.default_rng(0).dirichlet(np.ones(E), size=(1700, 2))
    p[0, 0], p[5, 1] = 1.0 / E, np.eye(E)[3]
    p[7, 0, :2] = [-1e-18, p[7, 0, 0] + p[7, 0, 1]]
    h = entropy(p)
    assert h.shape == (1700, 2)
    assert h[0, 0] == pytest.approx(np.log(E)) and h[5, 1] == 0.0
    for i, j in [(7, 0), (511, 1), (512, 0), (1699, 1)]:
        row = np.clip(p[i, j], 0, None)
        assert h[i, j] == pytest.approx(-np.sum(row[row > 0] * np.log(row[row > 0])), rel=1e-12)
    assert np.array_equal(entropy(p[1024:]), h[1024:]) and entropy(np.array([0.5, 0.5])) == pytest.approx(np.log(2))
