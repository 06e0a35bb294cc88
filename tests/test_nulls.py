"""Every finding against the right null: no effect reads "not distinguishable", a planted effect is found."""

from __future__ import annotations

import numpy as np
import pytest

from core.analysis.consistency import routing_consistency
from core.analysis.resampling import DocumentRuns, Estimate, block_of, bootstrap, paired_estimate
from core.analysis.shuffles import permute_within
from tests.planted import planted


def test_consistency_domain_preference_without_stickiness_is_not_distinguishable():
    rd = planted(stickiness=0.0, seed=1)
    rc = routing_consistency(rd.iter_chunks(333))
    pooled = (np.bincount(rd.topk_idx[:, 0, 0].numpy(), minlength=8) / rd.num_tokens) ** 2
    # the old pooled chance is well below the observed rate; the within-document null is not
    assert rc.same_top1[0] > pooled.sum() + 0.03
    for name in ("same_top1", "next_in_topk", "topk_overlap"):
        assert not rc.estimates[name].distinguishable.any(), rc.estimates[name].text
        assert "not distinguishable" in rc.estimates[name].at(0).text()


def test_consistency_planted_stickiness_is_detected():
    rc = routing_consistency(planted(stickiness=0.5, seed=2).iter_chunks(500))
    for name in ("same_top1", "next_in_topk", "topk_overlap"):
        est = rc.estimates[name]
        assert est.distinguishable.all()
        assert (est.low > est.null).all()
        assert "not distinguishable" not in est.at(1).text()


def test_consistency_of_random_routing_flags_few_layers_holm_corrected():
    """Few documents: the percentile bootstrap flagged 13-15% of random layers at 8 documents; the jackknife t, ~5% raw."""
    flagged, raw, runs = 0, [], 20
    for seed in range(runs):
        rd = planted(num_docs=12, doc_len=60, num_layers=4, domain_pref=1.0, seed=300 + seed)
        est = routing_consistency(rd).estimates["same_top1"]
        assert est.family == 4 and not est.why_none
        flagged += int(est.distinguishable.any())
        raw.append(np.asarray(est.p_value) < 0.05)
    assert flagged <= 3  # family-wise 5% across the 4 layers: about 1 run in 20
    assert np.mean(raw) <= 0.12  # uncorrected, each layer near its 5%


def test_consistency_under_six_document_blocks_has_no_verdict_and_the_finding_says_so():
    from core.pipeline.analyses.specialization import consistency

    rc = routing_consistency(planted(num_docs=5, doc_len=80, stickiness=0.5, seed=16))
    est = rc.estimates["same_top1"]
    assert np.isfinite(est.value).all() and np.isfinite(est.null).all()  # value and null stay
    assert np.isnan(est.low).all() and not est.distinguishable.any() and "under the 6" in est.why_none
    assert "no verdict: fewer than 6 documents" in consistency(rc)
    big = routing_consistency(planted(num_docs=40, doc_len=60, stickiness=0.3, seed=17))
    assert "2 of 2 layers beyond chance (Holm: ≈ 0.05 false per run)" in consistency(big)


def test_consistency_chunking_does_not_change_anything():
    rd = planted(stickiness=0.3, seed=3)
    a, b = routing_consistency(rd), routing_consistency(rd.iter_chunks(37))
    for name in ("same_top1", "chance", "next_in_topk", "next_in_topk_chance", "topk_overlap_chance"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name))
    np.testing.assert_allclose(a.estimates["same_top1"].low, b.estimates["same_top1"].low)


def test_bootstrap_interval_covers_the_truth_of_a_share():
    rng = np.random.default_rng(0)
    # 200 documents; a document's tokens are all "hits" with probability 0.3 (clustered data)
    docs = np.repeat(np.arange(200), 20)
    hit = np.repeat(rng.random(200) < 0.3, 20).astype(float)
    units = block_of(docs)
    sums = {"hit": np.bincount(units, hit, 64), "n": np.bincount(units, minlength=64).astype(float)}
    value, draws = bootstrap(lambda t: t["hit"] / t["n"], sums, sums["n"] > 0)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    assert lo < 0.3 < hi
    # clustered: the interval is much wider than a token-level binomial one would be
    assert hi - lo > 4 * 1.96 * np.sqrt(0.3 * 0.7 / len(docs))


def test_permute_within_keeps_groups():
    rng = np.random.default_rng(0)
    groups = np.array([2, 0, 2, 1, 0, 2, 1, 1, 0])
    idx = permute_within(groups, rng)
    assert sorted(idx) == list(range(len(groups)))
    np.testing.assert_array_equal(groups[idx], groups)


def test_document_runs_carry_across_chunks():
    runs = DocumentRuns()
    k1, t1 = runs.add(np.array([5, 5, 7]), np.ones((3, 1)))
    k2, t2 = runs.add(np.array([7, 7, 9]), np.ones((3, 1)))
    k3, t3 = runs.flush()
    assert list(k1) == [5] and t1[:, 0].tolist() == [2]
    assert list(k2) == [7] and t2[:, 0].tolist() == [3]
    assert list(k3) == [9] and t3[:, 0].tolist() == [1]


def test_estimate_text_and_verdict():
    sums = {"x": np.arange(10.0), "n": np.ones(10)}
    est = paired_estimate(lambda t: t["x"] / t["n"], lambda t: 0 * t["x"] + 4.5, sums, "a constant")
    assert isinstance(est, Estimate)
    assert est.value == pytest.approx(4.5) and est.null == pytest.approx(4.5)
    assert not est.distinguishable and est.text().endswith("not distinguishable from the null")
    est2 = paired_estimate(lambda t: t["x"] / t["n"], lambda t: 0 * t["x"] + 1.0, sums, "a constant")
    assert est2.distinguishable and "95% CI" in est2.text()


def test_vocabulary_random_routing_sits_at_its_null_not_at_k_over_e():
    from core.analysis.vocabulary import vocabulary_specialization

    rd = planted(num_docs=80, doc_len=50, domain_pref=1.0, vocab=100, seed=4)  # uniform routing, ~40 per id
    v = vocabulary_specialization(rd.iter_chunks(700), min_count=20)
    assert (v.mean_concentration > 0.3).all() and v.floor == 0.25  # the max over experts is biased upwards
    np.testing.assert_allclose(v.null_concentration, v.mean_concentration, atol=0.02)
    assert not v.estimate.distinguishable.any(), v.estimate.at(0).text()
    assert v.estimate.low[0] <= v.estimate.null[0] + 0.02


def test_vocabulary_planted_token_preference_is_detected():
    from core.analysis.vocabulary import vocabulary_specialization

    rd = planted(num_docs=80, doc_len=50, domain_pref=1.0, vocab=100, token_pref=1.0, seed=5)
    v = vocabulary_specialization(rd.iter_chunks(700), min_count=20)
    assert v.estimate.distinguishable.all()
    assert (v.estimate.low > v.estimate.null_high).all()


def test_domain_specialization_without_preference_is_not_distinguishable():
    from core.analysis.specialization import domain_specialization

    spec = domain_specialization(planted(domain_pref=1.0, seed=6).iter_chunks(400))
    assert (spec.estimates["max_ratio"].value > 1.0).all()  # a max over experts exceeds k/E by chance alone
    for name in ("layer_score", "max_ratio"):
        assert not spec.estimates[name].distinguishable.any(), spec.estimates[name].at(0).text()


def test_domain_specialization_planted_preference_is_detected():
    from core.analysis.specialization import domain_specialization

    spec = domain_specialization(planted(domain_pref=2.0, seed=7).iter_chunks(400))
    assert spec.estimates["layer_score"].distinguishable.all()
    assert (spec.estimates["layer_score"].low > spec.estimates["layer_score"].null_high).all()


def test_unlabelled_domain_ids_never_count_for_the_last_domain():
    from dataclasses import replace

    from core.analysis.specialization import domain_specialization

    rd = planted(seed=8)
    dom = rd.domain_ids.clone()
    dom[:40] = -1  # the first document has no label
    spec = domain_specialization(replace(rd, domain_ids=dom))
    full = domain_specialization(rd)
    assert spec.tokens.sum() == rd.num_tokens - 40
    assert spec.tokens[1] == full.tokens[1]  # the last domain keeps exactly its own tokens
    np.testing.assert_array_equal(spec.counts[:, 1], full.counts[:, 1])


def _coupled(coupling: float, seed: int):
    """Layer 1 copies layer 0's experts with probability ``coupling``; domains give both layers a preference."""
    from dataclasses import replace

    import torch

    rd = planted(seed=seed, domain_pref=3.0)
    rng = np.random.default_rng(seed)
    idx = rd.topk_idx.clone()
    copy = torch.from_numpy(rng.random(rd.num_tokens) < coupling)
    idx[copy, 1] = idx[copy, 0]
    return replace(rd, topk_idx=idx)


def test_cross_layer_correlation_from_domain_alone_is_not_distinguishable():
    from core.analysis.correlations import CorrelationAccumulator
    from core.analysis.streaming import fold_one

    c = fold_one(_coupled(0.0, 9).iter_chunks(500), CorrelationAccumulator("topk", resamples=200))
    est = c.estimates["adjacent"]
    assert est.value > 0.05  # domain preference alone correlates the layers...
    assert not est.distinguishable, est.text()  # ...and the within-document shuffle keeps that


def test_cross_layer_coupling_is_detected():
    from core.analysis.correlations import CorrelationAccumulator
    from core.analysis.streaming import fold_one

    c = fold_one(_coupled(0.3, 10).iter_chunks(500), CorrelationAccumulator("topk", resamples=200))
    est = c.estimates["adjacent"]
    assert est.distinguishable and est.low > est.null_high


def test_dead_expert_is_left_out_of_the_means_not_counted_as_zero():
    from core.analysis.correlations import cross_layer_correlation

    rng = np.random.default_rng(0)
    n = 400
    a = rng.integers(0, 3, n)  # expert 3 of both layers is never used
    idx = np.stack([a, a], 1)[:, :, None]  # layer 1 repeats layer 0
    from tests.fakes import routing

    c = cross_layer_correlation(routing(idx, 4))
    assert c.undefined_features == 2
    # between layers: 3 live experts each; |r| is 1 on the 3 matching pairs and 0.5 on the 6 others
    assert c.layer_mean_abs[0, 1] == pytest.approx((3 * 1 + 6 * 0.5) / 9, abs=0.03)


def test_one_token_group_is_skipped_with_a_reason():
    from core.analysis.correlations import correlations_by_group
    from tests.fakes import routing

    idx = np.array([[0], [1], [0], [1], [2]])[:, :, None]
    rd = routing(np.concatenate([idx, idx], 1), 3, dataset_ids=[0, 0, 0, 0, 1], dataset_names=["big", "single"])
    res = correlations_by_group(rd)
    assert "big" in res and "single" in res.skipped and "two tokens" in res.skipped["single"]


def test_saturation_of_unrelated_routing_sits_at_within_document_chance():
    from core.analysis.checkpoint_dynamics import saturation

    found, gaps = 0, []
    for seed in range(10):  # the 95% verdict should be wrong about 1 time in 20
        final = planted(seed=100 + seed, domain_pref=4.0)
        early = planted(seed=200 + seed, domain_pref=4.0)  # same documents and domains, routing drawn afresh
        sat = saturation(early.iter_chunks(300), final.iter_chunks(300))
        assert (sat.per_layer > 0.25 + 0.05).all()  # above k/E: both prefer their domain's experts
        found += int(sat.estimate.distinguishable.sum())
        gaps.append(sat.per_layer - sat.chance)
    assert found <= 3
    assert abs(np.mean(gaps)) < 0.005


def test_saturation_planted_agreement_is_detected():
    from dataclasses import replace

    import torch

    from core.analysis.checkpoint_dynamics import saturation

    final, early = planted(seed=11, domain_pref=4.0), planted(seed=12, domain_pref=4.0)
    keep = torch.from_numpy(np.random.default_rng(0).random(final.num_tokens) < 0.3)
    idx = early.topk_idx.clone()
    idx[keep] = final.topk_idx[keep]
    sat = saturation(replace(early, topk_idx=idx), final)
    assert sat.estimate.distinguishable.all() and (sat.estimate.diff_low > 0.1).all()


def test_load_balance_of_uniform_routing_is_not_distinguishable_from_uniform():
    from core.analysis.routing_stats import RoutingStatsAccumulator, uniform_routing_counts
    from core.analysis.streaming import fold_one

    stats = fold_one(planted(domain_pref=1.0, seed=13), RoutingStatsAccumulator(resamples=200))
    est = stats.estimates["utilization_entropy_norm"]
    assert (est.value < 1).all() and not est.distinguishable.any(), est.at(0).text()
    assert (est.low <= est.value).all() and (est.value <= est.high).all() and (est.high <= 1).all()  # jackknife: no resampling bias
    counts = uniform_routing_counts(1000, 8, 2, 5, 0)[0]
    np.testing.assert_allclose(counts.sum(1), 2000)  # k distinct picks per token
    assert (counts.max(1) <= 1000).all()


def test_load_balance_planted_imbalance_is_detected():
    from dataclasses import replace

    import torch

    from core.analysis.routing_stats import RoutingStatsAccumulator
    from core.analysis.streaming import fold_one

    rd = planted(domain_pref=1.0, seed=14)
    idx = rd.topk_idx.clone()
    hit = torch.from_numpy(np.random.default_rng(0).random(rd.num_tokens) < 0.1) & (idx[:, :, 1] != 0).all(1)
    idx[hit, :, 0] = 0  # a tenth of the tokens move their first pick to expert 0
    stats = fold_one(replace(rd, topk_idx=idx), RoutingStatsAccumulator(resamples=200))
    assert stats.estimates["utilization_entropy_norm"].distinguishable.all()


def test_capacity_dropped_slots_count_nowhere():
    """A slot of weight 0 (the toolkit's own model dropped it for capacity) is not a selection, in any analysis."""
    from core.analysis.routing_stats import routing_stats
    from core.analysis.features import top1_np
    from tests.fakes import routing

    idx = np.array([[[0, 1]], [[2, 1]], [[3, 0]]])
    w = np.array([[[0.0, 0.4]], [[0.7, 0.3]], [[0.0, 0.0]]])  # token 0 lost expert 0, token 2 lost both
    rd = routing(idx, 4, weights=w)
    mask = rd.selection_mask()[:, 0].numpy()
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(top1_np(rd)[:, 0], [1, 2, -1])  # the same slots as the utilization counts
    stats = routing_stats(rd)
    np.testing.assert_array_equal(stats.counts[0], [0, 2, 1, 0])


def test_intervals_of_noise_inflated_statistics_contain_their_value():
    """A maximum over experts, |r| and a divergence grow with noise: their intervals must still hold the value."""
    from core.analysis.correlations import CorrelationAccumulator
    from core.analysis.specialization import domain_specialization
    from core.analysis.streaming import fold_one
    from core.analysis.vocabulary import vocabulary_specialization

    rd = planted(num_docs=80, doc_len=50, domain_pref=1.0, vocab=100, seed=4)
    ests = [vocabulary_specialization(rd, min_count=20).estimate,
            *domain_specialization(rd).estimates.values(),
            fold_one(rd, CorrelationAccumulator("topk", resamples=50)).estimates["adjacent"]]
    for est in ests:
        assert (np.asarray(est.low) <= np.asarray(est.value)).all() and (np.asarray(est.value) <= np.asarray(est.high)).all(), est.text() if np.ndim(est.value) == 0 else est.at(0).text()


def test_one_document_gets_no_interval_rather_than_a_false_certainty():
    from dataclasses import replace

    rd = planted(num_docs=1, doc_len=200, stickiness=0.3, seed=15)
    rc = routing_consistency(replace(rd, doc_ids=None, dataset_ids=None))
    est = rc.estimates["same_top1"]
    assert np.isnan(est.low).all() and not est.distinguishable.any()
    assert "no interval" in est.at(0).text()


def test_jackknife_interval_stays_inside_the_statistics_range():
    """A share near 100% with spread between blocks: the normal interval would pass 100%, the clipped one does not."""
    from core.analysis.resampling import jackknife_interval

    loo = np.array([0.99, 1.0, 0.98, 1.0, 0.995, 0.97])
    lo, hi = jackknife_interval(np.float64(0.997), loo)
    assert hi > 1.0  # unclipped: a share over 100%
    lo, hi = jackknife_interval(np.float64(0.997), loo, bounds=(0.0, 1.0))
    assert 0.0 <= lo < 0.997 and hi == 1.0


def test_whole_document_shuffles_do_not_depend_on_where_chunks_end():
    """Documents cut anywhere come out whole; each is shuffled inside itself, the same way in any chunking."""
    from core.analysis.resampling import document_keys
    from core.analysis.shuffles import WholeDocuments, shuffle_within_documents
    from tests.planted import planted

    rd = planted(num_docs=9, doc_len=17, seed=3)

    def shuffled_docs(bounds):
        buf, out = WholeDocuments(), {}
        for a, b in zip(bounds, bounds[1:]):
            parts = buf.push(rd.select(slice(a, b)))
            for part in parts + ([buf.flush()] if b == rd.num_tokens else []):
                keys, pos = document_keys(part), part.positions.numpy()
                idx = shuffle_within_documents(part, 5, times=2)
                assert (keys[idx] == keys[None]).all()  # a token only trades places inside its document
                for k in np.unique(keys):
                    assert k not in out, "a document came out in two parts"
                    out[int(k)] = pos[idx[:, keys == k]].tolist()
        return out

    one = shuffled_docs([0, rd.num_tokens])
    assert len(one) == 9 and all(sorted(v[0]) == list(range(17)) for v in one.values())
    assert any(v[0] != list(range(17)) for v in one.values())  # it does shuffle
    assert shuffled_docs([0, 5, 6, 40, 100, 101, rd.num_tokens]) == one
    assert shuffled_docs(list(range(0, rd.num_tokens, 7)) + [rd.num_tokens]) == one


def test_one_token_id_toward_one_expert_is_found_on_its_own_and_topical_vocabulary_is_not():
    """The mean over ids dilutes one id's preference; each frequent id's own test (Holm over ids x layers x experts) finds it."""
    from core.analysis.streaming import fold_one
    from core.analysis.vocabulary import VocabularyAccumulator
    from core.calibration.runner import frequent_ids
    from core.calibration.worlds import Shape, World, simulate

    shape = Shape(layers=3, experts=16, top_k=2, docs=40, doc_len=200, vocab=500)
    planted = simulate(World("token", "", topics=4, token_factor=2.0), shape, 0)
    topical = simulate(World("topics", "", topics=4), shape, 0)
    out = {name: fold_one(rd, VocabularyAccumulator(permutations=20, token_ids=frequent_ids(rd)))
           for name, rd in (("planted", planted), ("topical", topical))}
    p = out["planted"]
    assert int(p.token_ids[p.token_tested[0]]) == 0 and p.token_flags[0].all()  # id 0, at every layer
    assert p.token_expert_p_adjusted[0, :, 0].max() < 0.05 and p.token_flags[1:].sum() <= 1
    assert len(out["topical"].token_tested) >= 5 and not out["topical"].token_flags.any()
