"""Router and expert weight analyses on hand-made weights with planted structure."""

import json

import numpy as np
import pytest
import torch

from core.analysis.expert_alignment import ExpertAnalyzer
from core.analysis.router_weights import RouterAnalyzer, linear_cka

H, E, I = 48, 6, 4


def test_router_similarity_identical_permuted_and_random():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(E, H))
    perm = rng.permutation(E)
    weights = {0: torch.tensor(w), 1: torch.tensor(w[perm]), 2: torch.tensor(rng.normal(size=(E, H)))}
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(weights)
    assert sim.layers == [0, 1, 2]
    assert sim.matched_cosine[0, 1] < 0.5  # identity matching fails on permuted experts
    for m in (sim.hungarian_cosine, sim.subspace_similarity, sim.cka):
        assert m[0, 1] == pytest.approx(1.0)
    assert sim.subspace_baseline == (E - 1) / H  # softmax rows are centred: rank E - 1
    assert abs(sim.subspace_similarity[0, 2] - (E - 1) / H) < 0.15  # random routers sit at the baseline
    assert sim.hungarian_cosine[0, 2] < 0.6
    assert sim.hungarian_null_low[0, 2] <= sim.hungarian_cosine[0, 2] <= sim.hungarian_null_high[0, 2]
    assert RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(weights, score_fn="sigmoid").subspace_baseline == E / H
    json.dumps(sim.to_dict())


def test_router_subspaces_effective_rank():
    rng = np.random.default_rng(1)
    low = rng.normal(size=(E, 2)) @ rng.normal(size=(2, H))  # rank 2
    flat = np.linalg.qr(rng.normal(size=(H, E)))[0].T * 3.0  # orthogonal rows, equal singular values
    sub = RouterAnalyzer(score_fn="sigmoid").analyze_router_subspaces({5: low, 7: flat}, energy=0.99)
    assert sub.rank_at_energy.tolist() == [2, E] and not sub.centered
    assert sub.effective_rank[1] == pytest.approx(E) and sub.stable_rank[1] == pytest.approx(E)
    assert sub.effective_rank[0] < 2.01
    np.testing.assert_allclose(sub.row_norms[1], 3.0)
    json.dumps(sub.to_dict())
    # softmax: centring removes the one direction (the mean row) that never changed routing
    soft = RouterAnalyzer(score_fn="softmax").analyze_router_subspaces({5: low, 7: flat}, energy=0.99)
    assert soft.centered and soft.rank_at_energy.tolist() == [2, E - 1]
    assert soft.stable_rank[1] == pytest.approx(E - 1)
    np.testing.assert_allclose(soft.row_norms[1], 3.0 * np.sqrt(1 - 1 / E))


def test_cka_invariant_to_rotation():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 5))
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    assert linear_cka(x, x @ q) == pytest.approx(1.0)


def _experts(rng, gate=True):
    up = rng.normal(size=(E, I, H))
    return {"gate": rng.normal(size=(E, I, H)) if gate else None, "up": up, "down": rng.normal(size=(E, H, I))}


@pytest.mark.parametrize("gate", [True, False])
def test_planted_router_row_aligns_and_random_sits_at_baseline(gate):
    rng = np.random.default_rng(3)
    ex = _experts(rng, gate)
    rows = np.concatenate([ex["gate"], ex["up"]], axis=1) if gate else ex["up"]
    planted = np.stack([rng.normal(size=rows.shape[1]) @ rows[e] for e in range(E)])  # inside own span
    random = rng.normal(size=(E, H))
    an = ExpertAnalyzer(rank=rows.shape[1], score_fn="sigmoid")  # rows kept as planted
    res = an.analyze_expert_router_alignment({2: ex, 4: ex}, {2: torch.tensor(planted), 4: random})
    r = rows.shape[1]
    assert (res.ranks == r).all() and not res.centered
    np.testing.assert_allclose(res.own[0], 1.0, atol=1e-8)
    assert res.mean_other[0] < 0.5
    np.testing.assert_allclose(res.random_mean, r / H)  # exact baseline
    assert abs(res.mean_own[1] - r / H) < 0.1
    assert res.perm_p[0] < 0.01 and res.effect[0] > 0.4  # own expert beats the others
    assert res.perm_p[1] > 0.05 and abs(res.effect[1]) < 0.1  # random rows do not
    json.dumps(res.to_dict())
    soft = ExpertAnalyzer(rank=r, score_fn="softmax").analyze_expert_router_alignment({2: ex}, {2: torch.tensor(planted)})
    assert soft.centered and soft.mean_own[0] > 0.5 and soft.perm_p[0] < 0.01


def test_expert_subspaces_energy_rank_and_errors():
    rng = np.random.default_rng(4)
    ex = _experts(rng)
    ex["gate"][0] = 0.0
    ex["up"][0] = np.outer(np.ones(I), rng.normal(size=H))  # expert 0 reads one direction
    sub = ExpertAnalyzer(energy=0.9, score_fn="softmax").expert_input_subspaces({1: ex})
    assert sub.ranks[0, 0] == 1 and sub.ranks[0, 1] > 1 and sub.projections == ["gate", "up"]
    assert sub.bases[1][0].shape == (H, 1)
    assert "bases" not in sub.to_dict()
    json.dumps(sub.to_dict())
    with pytest.raises(ValueError, match="without a model"):
        ExpertAnalyzer(score_fn="softmax").extract_all_expert_weights()
    with pytest.raises(ValueError, match="no layer has both"):
        ExpertAnalyzer(score_fn="softmax").analyze_expert_router_alignment({1: ex}, {9: rng.normal(size=(E, H))})
    with pytest.raises(ValueError, match="reads H"):
        ExpertAnalyzer(score_fn="softmax").analyze_expert_router_alignment({1: ex}, {1: rng.normal(size=(E, H + 1))})


class _FakeWrapper:
    """The two wrapper methods the analyzers use, and the router's score function, as documented in docs/CONTRACTS.md."""

    score_fn = "softmax"

    def __init__(self, rng):
        self.ex = {
            0: {k: (None if v is None else torch.tensor(v, dtype=torch.bfloat16)) for k, v in _experts(rng).items()}
        }
        self.rw = {0: torch.tensor(rng.normal(size=(E, H)), dtype=torch.bfloat16)}

    def get_router_weights(self):
        return self.rw

    def get_expert_weights(self, device="cpu"):
        return self.ex


def test_seed_api_as_written():
    model = _FakeWrapper(np.random.default_rng(5))
    analyzer = RouterAnalyzer(model)
    router_weights = analyzer.extract_all_router_weights()
    similarity = analyzer.compute_router_similarity_matrix(router_weights)
    subspaces = analyzer.analyze_router_subspaces(router_weights)
    expert_analyzer = ExpertAnalyzer(model)
    expert_weights = expert_analyzer.extract_all_expert_weights()
    alignment = expert_analyzer.analyze_expert_router_alignment(expert_weights, router_weights)
    assert similarity.cka.shape == (1, 1) and subspaces.singular_values.shape == (1, E)
    assert alignment.own.shape == (1, E)


def test_seed_api_on_a_tiny_olmoe_through_the_wrapper():
    from core.model_access.wrapper import MoEModelWrapper
    from tests.tiny_models import build

    model = MoEModelWrapper(build("olmoe"))
    analyzer = RouterAnalyzer(model)
    router_weights = analyzer.extract_all_router_weights()
    similarity = analyzer.compute_router_similarity_matrix(router_weights)
    subspaces = analyzer.analyze_router_subspaces(router_weights)
    expert_analyzer = ExpertAnalyzer(model)
    expert_weights = expert_analyzer.extract_all_expert_weights()
    alignment = expert_analyzer.analyze_expert_router_alignment(expert_weights, router_weights)
    L = len(model.moe_layers)
    assert similarity.cka.shape == (L, L) and len(subspaces.effective_rank) == L
    assert alignment.own.shape == (L, model.num_experts)
    # a random tiny model's routers are not aligned beyond chance
    assert np.all(np.abs(alignment.mean_own - alignment.mean_random) < 0.2)
