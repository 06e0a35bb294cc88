"""Weight analyses are honest: routing-equivalent routers compare as equal, and every score has its null.

Planted data where the truth is known: a softmax router shifted by ``1cᵀ`` routes identically
(and, on a tiny OLMoE, traces identically), so every weight analysis must return the same
numbers; a sigmoid router's shift is real and must show. Router rows planted in their own
expert's subspace must beat the expert-permutation null; random rows must not. Independent
routers must sit inside the Hungarian-matched cosine null, also when both share one anisotropic
covariance (trained routers do); a permuted copy must be far above it, and a noisy permuted copy
found.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.analysis.checkpoint_dynamics import router_weight_drift
from core.analysis.expert_alignment import ExpertAnalyzer, expert_permutation_null, random_subspace_share
from core.analysis.measures import center_router_rows, layer_rng, random_orthonormal_frame
from core.analysis.router_null import hungarian_cosine, pair_nulls, rotation_fixing_ones
from core.analysis.router_weights import RouterAnalyzer

H, E, I = 64, 16, 2  # 16 experts: the identity is one of 16! permutations, so a planted p is at its minimum
ATOL = 1e-9


def _experts(rng: np.random.Generator, n_layers: int = 1) -> dict[int, dict[str, np.ndarray]]:
    return {
        2 * l: {"gate": rng.normal(size=(E, I, H)), "up": rng.normal(size=(E, I, H)), "down": rng.normal(size=(E, H, I))}
        for l in range(n_layers)
    }


def _shift(weights: dict, rng: np.random.Generator, scale: float = 3.0) -> dict:
    """W + 1cᵀ per layer, with a shift larger than the rows themselves."""
    out = {}
    for l, w in weights.items():
        w = np.asarray(w, dtype=np.float64)
        out[l] = w + scale * rng.normal(size=(1, w.shape[1]))
    return out


def _assert_same(a, b, fields) -> None:
    for f in fields:
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=ATOL, rtol=0, err_msg=f)


# ----------------------------------------------------------------- shift invariance

def test_center_router_rows_removes_only_a_softmax_shift():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(E, H))
    shifted = w + rng.normal(size=(1, H))
    np.testing.assert_allclose(center_router_rows(w, "softmax"), center_router_rows(torch.tensor(shifted), "softmax"), atol=1e-12)
    np.testing.assert_allclose(center_router_rows(w, "softmax").mean(0), 0.0, atol=1e-12)
    np.testing.assert_array_equal(center_router_rows(shifted, "sigmoid"), shifted)
    with pytest.raises(ValueError, match="score_fn"):
        center_router_rows(w, "relu")


def test_softmax_shift_leaves_every_router_analysis_unchanged():
    rng = np.random.default_rng(1)
    w = {l: rng.normal(size=(E, H)) for l in (0, 1, 3)}
    ws = _shift(w, rng)
    an = RouterAnalyzer(score_fn="softmax")
    sim, sim_s = (an.compute_router_similarity_matrix(x, num_null=20) for x in (w, ws))
    assert sim.centered and sim.score_fn == "softmax"
    _assert_same(sim, sim_s, ["matched_cosine", "hungarian_cosine", "subspace_similarity", "cka",
                              "hungarian_null_mean", "hungarian_null_low", "hungarian_null_high", "hungarian_p"])
    sub, sub_s = (an.analyze_router_subspaces(x) for x in (w, ws))
    _assert_same(sub, sub_s, ["singular_values", "explained_energy", "effective_rank", "stable_rank",
                              "rank_at_energy", "row_norms"])
    # drift: a checkpoint that only adds 1cᵀ has not moved
    d = router_weight_drift([w, ws], names=["before", "shifted"], score_fn="softmax")
    np.testing.assert_allclose(d.cosine_prev[1], 1.0, atol=ATOL)
    np.testing.assert_allclose(d.rel_change_prev[1], 0.0, atol=ATOL)
    assert d.centered and json.dumps(d.to_dict())
    w2 = {l: v + 0.3 * rng.normal(size=v.shape) for l, v in w.items()}
    _assert_same(router_weight_drift([w, w2], score_fn="softmax"),
                 router_weight_drift([ws, _shift(w2, rng)], score_fn="softmax"),
                 ["cosine_prev", "rel_change_prev", "cosine_final", "rel_change_final"])


def test_softmax_shift_leaves_router_expert_alignment_unchanged():
    rng = np.random.default_rng(2)
    ex = _experts(rng, 2)
    w = {l: rng.normal(size=(E, H)) for l in ex}
    a, b = (ExpertAnalyzer(rank=2 * I, score_fn="softmax").analyze_expert_router_alignment(ex, x) for x in (w, _shift(w, rng)))
    assert a.centered
    _assert_same(a, b, ["own", "cross", "other_mean", "mean_own", "perm_null_mean", "perm_null_low",
                        "perm_null_high", "perm_p", "effect"])


def test_sigmoid_shift_is_real_and_is_kept():
    rng = np.random.default_rng(3)
    w = {l: rng.normal(size=(E, H)) for l in (0, 1)}
    ws = _shift(w, rng)
    pair = {0: w[0], 1: ws[0]}  # a router and its shifted copy
    sim = RouterAnalyzer(score_fn="sigmoid").compute_router_similarity_matrix(pair, num_null=5)
    assert not sim.centered and sim.score_fn == "sigmoid"
    assert sim.matched_cosine[0, 1] < 0.5 and sim.cka[0, 1] < 0.9  # the shift is a real change
    soft = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(pair, num_null=5)
    assert soft.matched_cosine[0, 1] == pytest.approx(1.0) and soft.cka[0, 1] == pytest.approx(1.0)
    an = RouterAnalyzer(score_fn="sigmoid")
    sub, sub_s = (an.analyze_router_subspaces(x) for x in (w, ws))
    assert abs(sub.stable_rank[0] - sub_s.stable_rank[0]) > 0.5
    d = router_weight_drift([w, ws], score_fn="sigmoid")
    assert not d.centered and d.rel_change_prev[1].min() > 0.5
    ex = _experts(rng)
    al = ExpertAnalyzer(rank=2 * I, score_fn="sigmoid")
    a, b = (al.analyze_expert_router_alignment(ex, {0: x[0]}) for x in (w, ws))
    assert not a.centered and np.abs(a.own - b.own).max() > 0.01


NO_DEFAULT = r"needs score_fn, one of \('softmax', 'sigmoid'\)"


def test_score_fn_has_no_default():
    """Centring is right for softmax only: every weight analysis refuses to guess, and says what to pass."""
    rng = np.random.default_rng(15)
    w = {0: rng.normal(size=(E, H)), 1: rng.normal(size=(E, H))}
    with pytest.raises(TypeError, match="RouterAnalyzer " + NO_DEFAULT):
        RouterAnalyzer().compute_router_similarity_matrix(w, num_null=5)
    with pytest.raises(TypeError, match=NO_DEFAULT):
        RouterAnalyzer().analyze_router_subspaces(w)
    with pytest.raises(TypeError, match="analyze_expert_router_alignment " + NO_DEFAULT):
        ExpertAnalyzer(rank=2 * I).analyze_expert_router_alignment(_experts(rng), {0: w[0]})
    with pytest.raises(TypeError, match="router_weight_drift " + NO_DEFAULT):
        router_weight_drift([w, w])
    with pytest.raises(TypeError, match="center_router_rows " + NO_DEFAULT):
        center_router_rows(w[0])
    with pytest.raises(TypeError, match=NO_DEFAULT):  # a wrapper that does not say
        RouterAnalyzer(type("Bare", (), {"get_router_weights": lambda self: w})()).analyze_router_subspaces()
    ExpertAnalyzer(rank=2 * I).expert_input_subspaces(_experts(rng))  # no router involved: no score_fn needed


def test_a_sigmoid_routers_rows_are_not_centred():
    rng = np.random.default_rng(16)
    w = rng.normal(size=(E, H)) + 2.0 * rng.normal(size=(1, H))  # a large row all experts share
    np.testing.assert_array_equal(center_router_rows(w, "sigmoid"), w)
    sub = RouterAnalyzer(score_fn="sigmoid").analyze_router_subspaces({0: w})
    assert not sub.centered and sub.score_fn == "sigmoid"
    np.testing.assert_allclose(sub.singular_values[0], np.linalg.svd(w, compute_uv=False))  # the rows as they are
    np.testing.assert_allclose(sub.row_norms[0], np.linalg.norm(w, axis=1))
    soft = RouterAnalyzer(score_fn="softmax").analyze_router_subspaces({0: w})
    assert soft.centered and soft.row_norms[0].mean() < 0.8 * sub.row_norms[0].mean()
    wrapped = type("Sigmoid", (), {"score_fn": "sigmoid", "get_router_weights": lambda self: {0: w}})()
    assert RouterAnalyzer(wrapped).analyze_router_subspaces().score_fn == "sigmoid"  # the wrapper's own, read


def _shift_routers_in_place(wrapper, rng: np.random.Generator) -> None:
    with torch.no_grad():
        for info in wrapper.layers:
            weight = wrapper.hf_model.get_submodule(info.router_path).weight
            assert weight.shape == (info.num_experts, info.hidden_size)
            weight += 3.0 * weight.std() * torch.as_tensor(rng.normal(size=(1, weight.shape[1])), dtype=weight.dtype)


def test_tiny_olmoe_routes_identically_after_the_shift_and_analyses_agree():
    from core.model_access.wrapper import MoEModelWrapper
    from tests.tiny_models import VOCAB, build

    wrapper = MoEModelWrapper(build("olmoe"))
    assert wrapper.score_fn == "softmax"
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    def analyses():
        routers = wrapper.get_router_weights()
        return (RouterAnalyzer(wrapper).compute_router_similarity_matrix(routers, num_null=10),  # the wrapper's score_fn
                RouterAnalyzer(score_fn=wrapper.score_fn).analyze_router_subspaces(routers),
                ExpertAnalyzer(wrapper, rank=4).analyze_expert_router_alignment(router_weights=routers),
                routers)

    before_routing = wrapper.trace_routing(ids)
    sim, sub, al, routers = analyses()
    _shift_routers_in_place(wrapper, np.random.default_rng(4))
    after_routing = wrapper.trace_routing(ids)
    sim_s, sub_s, al_s, routers_s = analyses()
    # the symmetry is real: logits move, routing does not
    assert (after_routing.router_logits - before_routing.router_logits).abs().max() > 0.1
    assert torch.equal(before_routing.topk_idx, after_routing.topk_idx)
    torch.testing.assert_close(before_routing.topk_weight, after_routing.topk_weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(before_routing.probs(), after_routing.probs(), atol=1e-5, rtol=1e-4)
    # and every weight analysis agrees (float32 weights: float32 tolerance)
    for a, b, fields in ((sim, sim_s, ["matched_cosine", "hungarian_cosine", "subspace_similarity", "cka"]),
                         (sub, sub_s, ["singular_values", "effective_rank", "stable_rank", "row_norms"]),
                         (al, al_s, ["own", "cross", "perm_null_mean", "effect"])):
        for f in fields:
            np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=1e-4, err_msg=f)
    d = router_weight_drift([routers, routers_s], score_fn=wrapper.score_fn)
    np.testing.assert_allclose(d.cosine_prev[1], 1.0, atol=1e-5)
    # without centring the same routers would have looked different
    raw, raw_s = (RouterAnalyzer(score_fn="sigmoid").compute_router_similarity_matrix(r, num_null=1) for r in (routers, routers_s))
    assert np.abs(raw.matched_cosine - raw_s.matched_cosine).max() > 0.1


# ----------------------------------------------------------------- router-expert alignment null

def test_random_subspace_share_is_exact():
    rng = np.random.default_rng(5)
    h, r, n = 40, 6, 20000
    x = rng.normal(size=(n, h))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = random_orthonormal_frame(h, r, rng)  # one random subspace; a random vector makes it random in effect
    share = ((x @ q) ** 2).sum(1)
    mean, sd = random_subspace_share(r, h)
    assert mean == pytest.approx(r / h)
    assert share.mean() == pytest.approx(mean, abs=4 * sd / np.sqrt(n))
    assert share.std() == pytest.approx(sd, rel=0.03)


def test_alignment_null_on_random_rows_is_not_significant():
    rng = np.random.default_rng(6)
    ex = _experts(rng)
    res = ExpertAnalyzer(rank=2 * I, score_fn="softmax").analyze_expert_router_alignment(ex, {0: rng.normal(size=(E, H))}, seed=0)
    assert res.perm_p[0] > 0.05 and abs(res.effect[0]) < 0.02
    assert res.perm_null_low[0] <= res.mean_own[0] <= res.perm_null_high[0]
    assert res.perm_null_mean[0] == pytest.approx(res.cross[0].mean())
    assert res.num_permutations == 1000 and "z" not in res.to_dict()
    json.dumps(res.to_dict())


def test_alignment_null_is_calibrated_over_many_random_draws():
    """Rows and subspaces independent: the permutation test rejects at 5% about 5% of the time."""
    ps = []
    for s in range(60):
        rng = np.random.default_rng(100 + s)
        cross = rng.beta(2, 30, size=(E, E))  # exchangeable shares, no own-expert effect
        ps.append(expert_permutation_null(cross, 500, layer_rng(0, s))[4])
    assert np.mean(np.array(ps) < 0.05) <= 0.15 and 0.3 < np.mean(ps) < 0.7


def test_alignment_null_detects_planted_rows():
    rng = np.random.default_rng(7)
    ex = _experts(rng)
    rows = np.concatenate([ex[0]["gate"], ex[0]["up"]], axis=1)  # [E, 2I, H]
    planted = np.stack([rng.normal(size=2 * I) @ rows[e] for e in range(E)])
    R = 1000
    for score_fn in ("sigmoid", "softmax"):
        res = ExpertAnalyzer(rank=2 * I, score_fn=score_fn).analyze_expert_router_alignment(
            ex, {0: planted}, num_permutations=R)
        assert res.perm_p[0] == pytest.approx(1 / (1 + R))  # no permutation reaches the planted statistic
        assert res.effect[0] > 0.5 and res.mean_own[0] > res.perm_null_high[0]
    np.testing.assert_allclose(res.random_mean, 2 * I / H)


def test_alignment_verdict_is_holm_corrected_over_layers_with_enough_permutations():
    """Three planted layers and 10 permutations asked for: 120 are drawn, so 1/121 survives Holm's x3."""
    rng = np.random.default_rng(14)
    ex = _experts(rng, 3)
    planted = {l: np.stack([rng.normal(size=2 * I) @ np.concatenate([w["gate"][e], w["up"][e]]) for e in range(E)])
               for l, w in ex.items()}
    res = ExpertAnalyzer(rank=2 * I, score_fn="sigmoid").analyze_expert_router_alignment(ex, planted, num_permutations=10)
    assert res.num_permutations == 120
    np.testing.assert_allclose(res.perm_p, 1 / 121)
    np.testing.assert_allclose(res.perm_p_adjusted, 3 / 121)


def test_alignment_seeds_differ_per_layer_and_old_argument_is_accepted():
    rng = np.random.default_rng(8)
    ex = _experts(rng)
    w = {0: rng.normal(size=(E, H))}
    with pytest.warns(DeprecationWarning, match="num_random"):
        ExpertAnalyzer(rank=2 * I, score_fn="softmax").analyze_expert_router_alignment(ex, w, num_random=50)
    cross = rng.random((E, E))
    a, b = (expert_permutation_null(cross, 200, layer_rng(0, l)) for l in (3, 5))
    assert a[1] == b[1] and (a[2], a[3]) != (b[2], b[3])


# ----------------------------------------------------------------- Hungarian-matched cosine null

def test_hungarian_null_independent_routers_sit_inside_it():
    rng = np.random.default_rng(9)
    w = {0: rng.normal(size=(E, H)), 1: rng.normal(size=(E, H))}
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(w, num_null=200)
    assert sim.hungarian_null_low[0, 1] <= sim.hungarian_cosine[0, 1] <= sim.hungarian_null_high[0, 1]
    assert sim.hungarian_p[0, 1] > 0.05
    assert sim.hungarian_null_mean[0, 1] > 0.1  # unrelated routers do not score 0: hence the null
    assert np.isnan(sim.hungarian_null_mean[0, 0]) and sim.num_null == 200
    np.testing.assert_allclose(sim.hungarian_null_mean, sim.hungarian_null_mean.T, equal_nan=True)
    json.dumps(sim.to_dict())


def test_hungarian_null_permuted_copy_is_far_above_it():
    rng = np.random.default_rng(10)
    w = rng.normal(size=(E, H)) + rng.normal(size=(1, H))  # anisotropic
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix({0: w, 1: w[rng.permutation(E)]}, num_null=100)
    assert sim.hungarian_cosine[0, 1] == pytest.approx(1.0)
    assert sim.hungarian_p[0, 1] == pytest.approx(1 / 101)
    assert sim.hungarian_null_high[0, 1] < 0.6


def test_rotation_fixing_ones_keeps_mean_row_and_covariance():
    rng = np.random.default_rng(12)
    q = rotation_fixing_ones(E, rng)
    w = rng.normal(size=(E, H)) + rng.normal(size=(1, H))
    np.testing.assert_allclose(q @ q.T, np.eye(E), atol=1e-12)
    np.testing.assert_allclose(q @ np.ones(E), np.ones(E), atol=1e-12)
    np.testing.assert_allclose((q @ w).mean(0), w.mean(0), atol=1e-12)  # the row all experts share
    np.testing.assert_allclose((q @ w).T @ (q @ w), w.T @ w, atol=1e-9)  # the hidden-space covariance
    assert np.abs(q - np.eye(E)).max() > 0.1  # and the rows are mixed
    assert not np.allclose(rotation_fixing_ones(E, rng), q)


HA, EA = 256, 64  # a router's shape for the anisotropy tests
SPECTRUM = np.sqrt(1.0 / (1.0 + np.arange(HA)) ** 1.5)  # Σ^{1/2}: a decaying spectrum, like trained routers


def _anisotropic(rng: np.random.Generator) -> np.ndarray:
    """Rows W = Z Σ^{1/2}, Z iid Gaussian: every router drawn so shares Σ, none shares its experts."""
    return rng.normal(size=(EA, HA)) * SPECTRUM


def _pair_null(wa: np.ndarray, wb: np.ndarray, score_fn: str, seed: int) -> dict[str, np.ndarray]:
    """What the analyzer computes for the Hungarian null of two layers, without its SVD-based measures (many pairs, fast)."""
    W = [center_router_rows(w, score_fn) for w in (wa, wb)]
    U = [w / np.linalg.norm(w, axis=1, keepdims=True) for w in W]
    hc = np.full((2, 2), np.nan)
    hc[0, 1] = hc[1, 0] = hungarian_cosine(U[0] @ U[1].T)
    null, _ = pair_nulls([0, 1], U, W, hc, 40, seed)
    return {"hc": hc[0, 1], **{k: v[0, 1] for k, v in null.items()}}


def test_pair_null_helper_is_the_analyzers():
    rng = np.random.default_rng(17)
    wa, wb = _anisotropic(rng), _anisotropic(rng)
    sim = RouterAnalyzer(score_fn="sigmoid").compute_router_similarity_matrix({0: wa, 1: wb}, num_null=40, seed=3)
    got = _pair_null(wa, wb, "sigmoid", 3)
    assert sim.num_null_adjacent == 40 and got["hc"] == pytest.approx(sim.hungarian_cosine[0, 1])
    for k, f in (("mean", "hungarian_null_mean"), ("p", "hungarian_p"), ("p_adjusted", "hungarian_p_adjusted")):
        assert got[k] == pytest.approx(getattr(sim, f)[0, 1]), k


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_hungarian_null_holds_for_independent_anisotropic_routers(score_fn):
    """60 pairs with no expert correspondence: a hidden-space rotation flagged 60 of 60; mixing rows keeps p < 0.05 at ~5%."""
    flagged, gaps = 0, []
    for s in range(60):
        rng = np.random.default_rng(1000 + s)
        shared = 3.0 * rng.normal(size=(1, HA)) * SPECTRUM  # a mean row both routers share (kept as is by sigmoid)
        pair = _pair_null(_anisotropic(rng) + shared, _anisotropic(rng) + shared, score_fn, s)
        flagged += int(pair["p"] < 0.05)
        gaps.append(pair["hc"] - pair["mean"])
    assert flagged <= 4, flagged  # at most 7% of 60
    assert pair["hc"] > 0.3 and abs(np.mean(gaps)) < 0.01  # high by anisotropy alone, and the null says so


def test_hungarian_null_finds_a_noisy_permuted_copy():
    """W_b = W_a + noise of the same norm (and the same covariance), rows permuted: found in at least 16 of 20 seeds."""
    found = 0
    for s in range(20):
        rng = np.random.default_rng(2000 + s)
        wa, noise = _anisotropic(rng), _anisotropic(rng)
        wb = (wa + noise * np.linalg.norm(wa) / np.linalg.norm(noise))[rng.permutation(EA)]
        found += int(_pair_null(wa, wb, "softmax", s)["p_adjusted"] < 0.05)
    assert found >= 16, found


def test_adjacent_pairs_get_enough_draws_for_holm():
    """With 10 draws no p could pass a correction over the adjacent pairs; they get 40 per pair, Holm-adjusted."""
    rng = np.random.default_rng(13)
    w = rng.normal(size=(E, H))
    routers = {0: w, 3: w[rng.permutation(E)], 5: w[rng.permutation(E)], 9: rng.normal(size=(E, H))}
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(routers, num_null=10)
    assert sim.num_null == 10 and sim.num_null_adjacent == 120
    assert sim.hungarian_p[0, 2] == pytest.approx(1 / 11)  # not adjacent: num_null draws, no correction
    assert np.isnan(sim.hungarian_p_adjusted[0, 2]) and np.isnan(sim.hungarian_p_adjusted[0, 0])
    assert sim.hungarian_p[0, 1] == pytest.approx(1 / 121) and sim.hungarian_p_adjusted[0, 1] == pytest.approx(3 / 121)
    assert sim.hungarian_p_adjusted[2, 3] > 0.05  # the random layer
    np.testing.assert_array_equal(sim.hungarian_p_adjusted, sim.hungarian_p_adjusted.T)


# ----------------------------------------------------------------- figures

def test_weight_figures_draw_the_nulls():
    from viz.figures_weights import alignment_vs_baseline, hungarian_cosine_vs_null

    rng = np.random.default_rng(11)
    w = {l: rng.normal(size=(E, H)) for l in (0, 2, 4)}
    sim = RouterAnalyzer(score_fn="softmax").compute_router_similarity_matrix(w, num_null=10)
    fig = hungarian_cosine_vs_null(sim.hungarian_cosine, sim.hungarian_null_mean, sim.hungarian_null_low,
                                   sim.hungarian_null_high, sim.layers)
    assert "Hungarian-matched cosine" in fig.layout.title.text and len(fig.data[1].x) == 3
    assert "layer" in fig.data[1].hovertemplate
    ex = _experts(rng)
    al = ExpertAnalyzer(rank=2 * I, score_fn="softmax").analyze_expert_router_alignment(ex, {0: w[0]})
    fig = alignment_vs_baseline(al.own, al.other_mean, al.random_mean.mean(1), None, al.layers,
                                null_mean=al.perm_null_mean, null_low=al.perm_null_low, null_high=al.perm_null_high)
    names = " ".join(t.name for t in fig.data)
    assert "experts permuted" in names and "r/H" in names
    from viz._common import FigureInputError

    with pytest.raises(FigureInputError, match="all three"):
        alignment_vs_baseline(al.own, None, al.random_mean.mean(1), None, al.layers, null_mean=al.perm_null_mean)


@pytest.mark.parametrize("rows, h", [(12, 20), (20, 12), (16, 16)])
def test_input_basis_matches_the_svd(rows, h):
    """The Gram-matrix route gives the SVD's singular values and the same top-r subspace."""
    from core.analysis.expert_alignment import input_basis

    g = torch.Generator().manual_seed(rows * h)
    a = torch.randn(rows, h, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, h, dtype=torch.float64)
    _, s_ref, vh = torch.linalg.svd(a, full_matrices=False)  # anisotropic, like trained weights
    for x, tol in ((a, 1e-9), (a.float(), 1e-4)):  # float64 exact; float32 (the usual weights) close
        s, right = input_basis(x)
        np.testing.assert_allclose(s, s_ref.numpy(), atol=tol * float(s_ref[0]))
        for r in (1, 3, min(rows, h) - 1):
            v = right(r).double()
            assert v.dtype == torch.float64 and torch.allclose(v @ v.T, vh[:r].T @ vh[:r], atol=100 * tol), r
