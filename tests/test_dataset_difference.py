"""Mean |Δr| between datasets against the dealt-blocks null, on routing with a known answer."""

import json

import numpy as np

from core.analysis.correlations import correlation_difference, cross_layer_correlation
from core.analysis.dataset_difference import dataset_difference, overall
from tests.fakes import routing
from tests.planted import planted


def _two_datasets(link_in_second: bool, num_docs: int = 80, seed: int = 0):
    """Two datasets of the same planted routing; with ``link_in_second`` the second's layer 1 copies its layer 0."""
    rd = planted(num_docs=num_docs, doc_len=30, num_experts=6, top_k=2, num_layers=2, domain_pref=1.0, seed=seed)
    idx = rd.topk_idx.numpy().copy()
    ds = (rd.doc_ids.numpy() % 2).astype(int)
    if link_in_second:
        rng = np.random.default_rng(seed)
        copy = (ds == 1) & (rng.random(len(ds)) < 0.6)
        idx[copy, 1] = idx[copy, 0]
    return routing(idx, 6, doc_ids=rd.doc_ids, positions=rd.positions, dataset_ids=ds, domain_ids=rd.domain_ids,
                   domain_names=rd.domain_names, dataset_names=["first", "second"])


def test_value_is_the_mean_abs_difference_of_the_two_correlations():
    rd = _two_datasets(False)
    res = dataset_difference(rd, permutations=0)
    ds = rd.dataset_ids.numpy()
    a, b = (cross_layer_correlation(rd.select(np.nonzero(ds == d)[0])) for d in (0, 1))
    ref = correlation_difference(a, b).layer_mean_abs_diff  # its diagonal also averages in each feature with itself (0)
    np.testing.assert_allclose(res.layer_diff["first - second"][0, 1], ref[0, 1], atol=1e-9)
    np.testing.assert_allclose(res.layer_diff["first - second"][0, 0], ref[0, 0] * 36 / 30, atol=1e-9)
    assert float(res.estimates["first - second"].value) > 0.02  # noise alone makes it positive
    json.dumps(res.to_dict())


def test_same_routing_is_not_a_difference_and_a_planted_link_is():
    same = dataset_difference(_two_datasets(False, seed=1), permutations=60)
    est = same.estimates["first - second"]
    assert not bool(est.distinguishable) and est.null_low <= est.value  # |Δr| of noise sits inside its null
    linked = dataset_difference(_two_datasets(True, seed=1), permutations=60).estimates["first - second"]
    assert bool(linked.distinguishable) and linked.low > linked.null_high


def test_chunks_and_overall():
    rd = _two_datasets(True, num_docs=30, seed=2)
    a, b = dataset_difference(rd, permutations=10), dataset_difference(rd.iter_chunks(77), permutations=10)
    np.testing.assert_allclose(a.layer_diff["first - second"], b.layer_diff["first - second"])
    np.testing.assert_allclose(a.estimates["first - second"].null, b.estimates["first - second"].null)
    m = np.array([[9.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 9.0]])
    assert overall(m) == 2.0 and overall(np.array([[0.5]])) == 0.5


def test_a_difference_in_one_layer_pair_is_found_there():
    """Four layers; the second dataset's layer 2 copies layer 1: diluted in the overall mean, found at its layer pair."""
    rd = planted(num_docs=80, doc_len=30, num_experts=6, top_k=2, num_layers=4, domain_pref=1.0, seed=3)
    idx, ds = rd.topk_idx.numpy().copy(), (rd.doc_ids.numpy() % 2).astype(int)
    copy = (ds == 1) & (np.random.default_rng(3).random(len(ds)) < 0.4)
    idx[copy, 2] = idx[copy, 1]
    rd = routing(idx, 6, doc_ids=rd.doc_ids, positions=rd.positions, dataset_ids=ds, dataset_names=["first", "second"])
    per = dataset_difference(rd, permutations=60).layer_estimates["first - second"]
    flagged = np.argwhere(np.asarray(per.distinguishable, bool)).tolist()
    assert flagged == [[1, 2]] and per.family == 6
