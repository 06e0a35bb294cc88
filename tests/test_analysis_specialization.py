"""Domain, vocabulary and sequence specialization on routings with known answers."""

import json

import numpy as np
import pytest

from tests.fakes import routing
from core import domain_specialization, routing_consistency, vocabulary_specialization


def _rd(idx, E, **kw):
    return routing(idx, E, **kw)


def test_domain_specialization_against_k_over_e():
    # math tokens always go to expert 0, code tokens spread evenly over experts 0..3
    n = 40
    idx = np.concatenate([np.zeros((n, 1, 1)), np.arange(n).reshape(n, 1, 1) % 4])
    dom = [0] * n + [1] * n
    ds = domain_specialization(_rd(idx, 4, domain_ids=dom, domain_names=["math", "code"]).iter_chunks(13))
    assert ds.baseline == 0.25
    assert ds.share[0, 0, 0] == 1.0 and ds.ratio[0, 0, 0] == 4.0
    np.testing.assert_allclose(ds.share[0, 1], 0.25)
    assert ds.kl[0, 1] < ds.kl[0, 0]
    assert ds.preferred_group[0, 0] == 0 and ds.score[0, 0] == 4.0
    top = ds.top_experts("math", 1)
    assert top.loc[0, "expert"] == 0 and top.loc[0, "ratio"] == 4.0
    json.dumps(ds.to_dict())


def test_vocabulary_specialization():
    # token 7 always -> expert 2; token 9 alternates over 4 experts; token 11 is rare
    tok = [7] * 20 + [9] * 20 + [11] * 3
    idx = np.array([2] * 20 + [i % 4 for i in range(20)] + [0] * 3).reshape(-1, 1, 1)
    v = vocabulary_specialization(_rd(idx, 4, token_ids=tok).iter_chunks(9), min_count=10)
    assert v.token_ids.tolist() == [7, 9]
    assert v.concentration[:, 0].tolist() == [1.0, 0.25]
    assert v.preferred_expert[0, 0] == 2
    assert v.mean_concentration[0] == pytest.approx(0.625)
    json.dumps(v.to_dict())


def test_routing_consistency_across_chunks_and_documents():
    # doc 0: 5 tokens all expert 1 (4 pairs, same); doc 1: alternating 0/1 (3 pairs, none same)
    idx = np.array([1] * 5 + [0, 1, 0, 1]).reshape(-1, 1, 1)
    docs = [0] * 5 + [1] * 4
    pos = list(range(5)) + list(range(4))
    rc = routing_consistency(_rd(idx, 2, doc_ids=docs, positions=pos).iter_chunks(2))
    assert rc.num_pairs == 7
    assert rc.same_top1[0] == pytest.approx(4 / 7)
    # within-document shuffle: doc 0 always the same (4 pairs x 1), doc 1 two of each (3 pairs x 4/12)
    assert rc.chance[0] == pytest.approx(5 / 7)
    assert rc.topk_overlap[0] == pytest.approx(4 / 7)
    assert rc.next_in_topk[0] == pytest.approx(4 / 7) and rc.num_documents == 2


def test_missing_fields_error():
    rd = _rd(np.zeros((3, 1, 1)), 2)
    with pytest.raises(ValueError, match="domain_ids"):
        domain_specialization(rd)
    with pytest.raises(ValueError, match="token_ids"):
        vocabulary_specialization(rd)
    with pytest.raises(ValueError, match="positions"):
        routing_consistency(rd)


def test_a_domain_of_one_document_has_no_interval_for_its_ratio():
    """Its one (domain, block) cell has no spread to measure: the jackknife gave it a zero-width interval."""
    from core.analysis.specialization import DomainSpecializationAccumulator
    from core.analysis.streaming import fold

    rng = np.random.default_rng(0)
    L, E, k = 2, 8, 2
    docs = np.repeat(np.arange(41), 40)
    dom = np.where(docs == 40, 2, docs % 2)  # domains a and b: 20 documents each; c: one
    idx = np.argsort(rng.random((len(docs), L, E)), -1)[..., :k]
    idx[dom == 2, :, 0] = 5  # c always picks expert 5
    rd = routing(idx, E, doc_ids=docs, positions=np.tile(np.arange(40), 41), domain_ids=dom,
                 token_ids=rng.integers(0, 30, len(docs)), dataset_ids=dom, domain_names=["a", "b", "c"],
                 dataset_names=["a", "b", "c"])
    acc = DomainSpecializationAccumulator("domain", permutations=50, resamples=50, seed=0)
    est = fold([rd], {"s": acc})["s"].estimates
    ratio = est["max_ratio"]
    assert ratio.value[2] == pytest.approx(E / k)  # c's top expert: every token, the E/k cap
    assert np.isnan(ratio.low[2]) and np.isnan(ratio.high[2])
    assert np.isfinite(ratio.low[:2]).all() and (ratio.low[:2] < ratio.value[:2]).all() and (ratio.value[:2] < ratio.high[:2]).all()
    assert (est["layer_score"].low >= 0).all()  # a divergence's interval stays at or above 0


def _mixtral_routing():
    """Four documents, top-2 of 4 experts; pairs counted by hand (top-1 is the first slot)."""
    sets = [[0, 1], [0, 2], [3, 2], [1, 0],  # doc 0, domain a: pairs same top-1 1 of 3, sets share an expert 2 of 3
            [1, 2], [1, 3], [2, 3],          # doc 1, domain b: same top-1 1 of 2, share 2 of 2
            [0, 1],                          # doc 2, domain b: one token, no pair
            [0, 1], [0, 1]]                  # doc 3, no domain: its pair counts in no domain
    docs, dom = [0] * 4 + [1] * 3 + [2] + [3] * 2, [0] * 4 + [1] * 3 + [1] + [-1] * 2
    pos = [0, 1, 2, 3, 0, 1, 2, 0, 0, 1]
    idx = np.array(sets)[:, None, :].repeat(2, 1)  # two identical layers
    return _rd(idx, 4, doc_ids=docs, positions=pos, domain_ids=dom, domain_names=["a", "b"])


@pytest.mark.parametrize("chunk", [1, 2, 3, 10])
def test_mixtral_columns_per_domain_are_counted_exactly_across_chunks(chunk):
    rc = routing_consistency(_mixtral_routing().iter_chunks(chunk))
    assert rc.domain_names == ["a", "b"] and rc.domain_pairs.tolist() == [3, 2]
    np.testing.assert_allclose(rc.domain_same_top1, [[1 / 3] * 2, [1 / 2] * 2])
    np.testing.assert_allclose(rc.domain_any_overlap, [[2 / 3] * 2, [1.0] * 2])
    np.testing.assert_allclose(rc.topk_any_overlap, [5 / 6] * 2)  # 6 pairs in all: doc 3's pair shares its experts
    assert rc.uniform_same_top1 == 0.25 and rc.uniform_any_overlap == pytest.approx(1 - 1 / 6)
    table = rc.mixtral_table()
    assert len(table) == 4 and list(table.columns[-4:]) == ["same_top1", "same_top1_uniform", "topk_any_overlap",
                                                            "topk_any_overlap_uniform"]
    assert table.loc[(table.domain == "b") & (table.layer == 1), "topk_any_overlap"].item() == 1.0
    json.dumps(rc.to_dict(), allow_nan=False)


def test_uniform_chance_of_mixtrals_columns():
    from itertools import combinations

    from core.analysis.consistency import uniform_any_overlap, uniform_same_top1

    assert uniform_any_overlap(8, 2) == pytest.approx(1 - (6 / 8) * (5 / 7))
    assert uniform_same_top1(8) == 1 / 8
    for E, k in ((6, 3), (7, 2), (5, 1)):
        sets = [set(s) for s in combinations(range(E), k)]
        share = np.mean([bool(a & b) for a in sets for b in sets])  # every ordered pair of top-k sets
        assert uniform_any_overlap(E, k) == pytest.approx(share)


def test_mixtral_columns_of_uniform_routing_sit_at_their_chance():
    rng = np.random.default_rng(0)
    E, k, docs, n = 8, 2, 300, 50
    idx = np.argsort(rng.random((docs * n, 1, E)), -1)[..., :k]  # uniform top-k sets, in random order
    doc = np.repeat(np.arange(docs), n)
    rc = routing_consistency(_rd(idx, E, doc_ids=doc, positions=np.tile(np.arange(n), docs), domain_ids=doc % 2,
                                 domain_names=["a", "b"]).iter_chunks(997))
    for rates, p in ((rc.domain_same_top1, 1 / E), (rc.domain_any_overlap, 1 - (6 / 8) * (5 / 7))):
        se = np.sqrt(p * (1 - p) / rc.domain_pairs)[:, None]  # consecutive pairs of uniform tokens are independent events
        assert (np.abs(rates - p) < 4 * se).all(), (rates, p, se)
