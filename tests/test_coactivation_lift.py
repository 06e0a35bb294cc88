"""Co-activation lift over independence against the within-document null, on routings with a known answer."""

import json

import numpy as np
import pytest

from core.analysis.coactivation_lift import coactivation_lift
from tests.fakes import routing
from tests.planted import planted


def test_lift_is_joint_over_product_of_marginals():
    # 0 and 1 always together (4 tokens); 2 with 3 twice, 2 with 0 twice: P(0&1)=4/8, P(0)=6/8, P(1)=4/8
    idx = [[[0, 1]]] * 4 + [[[2, 3]]] * 2 + [[[2, 0]]] * 2
    res = coactivation_lift(routing(idx, 4, doc_ids=np.arange(8), positions=np.zeros(8, int)), resamples=0)
    assert res.lift[0, 0, 1] == pytest.approx((4 / 8) / (6 / 8 * 4 / 8))
    assert res.lift[0, 2, 3] == pytest.approx((2 / 8) / (4 / 8 * 2 / 8))
    assert res.lift[0, 1, 3] == 0.0 and np.isnan(res.lift[0, 0, 0])
    json.dumps(res.to_dict())


def test_uniform_routing_lift_and_its_chance():
    res = coactivation_lift(planted(num_docs=80, domain_pref=1.0, num_experts=8, top_k=2, seed=3))
    off = res.lift[0][np.triu_indices(8, 1)]
    assert np.nanmean(off) == pytest.approx(res.uniform_lift, abs=0.05)  # (k-1)E/(k(E-1)) = 4/7
    assert not np.asarray(res.estimates["pair_lift"].distinguishable).any()


def test_domain_clustering_alone_is_not_a_pair():
    """Experts that share a domain are picked together more often than over pooled tokens: lift > 1 with no link."""
    res = coactivation_lift(planted(num_docs=80, domain_pref=8.0, num_experts=8, top_k=2, seed=1))
    assert res.lift[0, 0, 1] > 1.5 * res.lift[0, 0, 5]  # both favoured by domain a, against one of each domain
    assert res.null_lift[0, 0, 1] > 1.0 > res.null_lift[0, 0, 5]  # the document null expects it
    assert not np.asarray(res.estimates["pair_lift"].distinguishable).any()


def _with_team(rd, pair=(0, 5), share=0.25, seed=0):
    """The same routing with ``share`` of the tokens routed to ``pair`` at layer 1: a team no domain explains."""
    idx = rd.topk_idx.numpy().copy()
    rng = np.random.default_rng(seed)
    hit = rng.random(len(idx)) < share
    idx[hit, 1] = pair
    return routing(idx, rd.num_experts, doc_ids=rd.doc_ids, positions=rd.positions, domain_ids=rd.domain_ids,
                   dataset_ids=rd.dataset_ids, domain_names=rd.domain_names, dataset_names=rd.dataset_names)


def test_planted_team_is_found_and_named():
    res = coactivation_lift(_with_team(planted(num_docs=60, domain_pref=3.0, seed=2)).iter_chunks(97))
    est = res.estimates["pair_lift"]
    flagged = np.argwhere(np.asarray(est.distinguishable))
    assert flagged.tolist() == [[1, 0, 5]]  # layer position 1, experts 0 and 5, and nothing else
    assert est.family == 2 * 28  # every pair of both layers
    top = res.top_pairs(1)
    assert top.loc[top.layer == 1, ["expert_i", "expert_j"]].values.tolist() == [[0, 5]]
    assert top.loc[top.layer == 1, "low"].item() > top.loc[top.layer == 1, "null_lift"].item()


def test_chunking_does_not_change_the_result():
    rd = _with_team(planted(num_docs=30, seed=4))
    a, b = coactivation_lift(rd), coactivation_lift(rd.iter_chunks(13))
    np.testing.assert_allclose(a.lift, b.lift)
    np.testing.assert_allclose(a.null_lift, b.null_lift)
    np.testing.assert_allclose(a.estimates["pair_lift"].p_value, b.estimates["pair_lift"].p_value)
