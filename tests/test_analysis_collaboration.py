"""Collaboration mining recovers planted cross-layer co-activation groups tied to domains."""

import json

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.analysis.collaboration import CollaborationMiner
from core.routing_data import RoutingData
from tests.fakes import routing

L, E, K, G = 3, 8, 2, 4


def _planted(n_per=60, noise=0.1, seed=0):
    """Domain g's tokens select group g: experts {2g, 2g+1} rotated by layer, with some random noise."""
    rng = np.random.default_rng(seed)
    groups = {g: [(l, (2 * g + l * 2 + j) % E) for l in range(L) for j in range(K)] for g in range(G)}
    idx, dom = [], []
    for g in range(G):
        for _ in range(n_per):
            row = []
            for l in range(L):
                experts = [e for (ll, e) in groups[g] if ll == l]
                if rng.random() < noise:
                    experts = list(rng.choice(E, size=K, replace=False))
                row.append(experts)
            idx.append(row)
            dom.append(g)
    idx = torch.as_tensor(np.array(idx))
    rd = RoutingData(
        moe_layers=[0, 2, 4],
        num_experts=E,
        top_k=K,
        topk_idx=idx,
        topk_weight=torch.full(idx.shape, 0.5),
        domain_ids=torch.as_tensor(dom),
        domain_names=["math", "code", "law", "bio"],
    )
    return rd, groups


def test_dictionary_learning_recovers_planted_groups():
    rd, groups = _planted()
    miner = CollaborationMiner(sample_ratio=0.5, n_components=G, n_meta_components=2, top_k=3, alpha=0.05)
    res = miner.fit(rd.iter_chunks(50))
    assert res.num_tokens_seen == G * 60 and res.num_tokens_sampled == G * 60 // 2
    assert res.atoms.shape == (G, L, E)
    found = set()
    for k in range(G):
        units = {(rd.moe_layers.index(l), e) for l, e, _ in res.pattern_units(k, n=L * K)}
        best = max(range(G), key=lambda g: len(units & set(groups[g])))
        assert len(units & set(groups[best])) / len(units | set(groups[best])) >= 0.7
        assert res.preferred_domain[k] == best and res.specificity[k] > 0.8
        found.add(best)
    assert found == set(range(G))
    # top domain-specialized experts: each domain's planted units, ratio well above 1
    top = res.top_experts["math"]
    assert len(top) == 3 and all((rd.moe_layers.index(t["layer"]), t["expert"]) in groups[0] for t in top)
    assert top[0]["ratio"] > 2
    # hierarchical: meta-patterns reconstruct the patterns
    assert res.meta_atoms.shape == (2, L, E) and res.meta_codes.shape == (G, 2)
    assert res.reconstruction_error < 0.6
    json.dumps(res.to_dict())


def test_hierarchical_variant_groups_patterns_into_families():
    # two families: patterns 0/1 share their layer 0-1 experts, as do patterns 2/3; layer 2 tells them apart
    rng = np.random.default_rng(0)
    pats = {0: [[0, 1]] * 3, 1: [[0, 1], [0, 1], [2, 3]], 2: [[4, 5]] * 3, 3: [[4, 5], [4, 5], [6, 7]]}
    idx = [
        [list(rng.choice(E, size=K, replace=False)) if rng.random() < 0.1 else pats[g][l] for l in range(L)]
        for g in range(4)
        for _ in range(60)
    ]
    idx = torch.as_tensor(np.array(idx))
    rd = RoutingData(
        moe_layers=[0, 1, 2],
        num_experts=E,
        top_k=K,
        topk_idx=idx,
        topk_weight=torch.full(idx.shape, 0.5),
        domain_ids=torch.as_tensor(np.repeat(np.arange(4), 60)),
        domain_names=list("abcd"),
    )
    res = CollaborationMiner(sample_ratio=0.5, n_components=4, n_meta_components=2, alpha=0.05).fit(rd)
    family = {int(res.preferred_domain[k]): int(res.pattern_meta[k]) for k in range(4)}
    assert sorted(family) == [0, 1, 2, 3]
    assert family[0] == family[1] != family[2] == family[3]


def test_sampling_is_seeded_and_threshold_applies():
    rd, _ = _planted(n_per=10)
    m = CollaborationMiner(activation_threshold=0.6, sample_ratio=1 / 3, threshold_rule="absolute")
    a = m.activation_matrix(rd)
    assert a.values.shape == (round(40 / 3), L * E) and not a.values.any()  # 0.5 < threshold
    b = CollaborationMiner(activation_threshold=0.1, sample_ratio=1 / 3, threshold_rule="absolute").activation_matrix(rd)
    c = CollaborationMiner(activation_threshold=0.1, sample_ratio=1 / 3, threshold_rule="absolute").activation_matrix(rd)
    np.testing.assert_array_equal(b.groups, c.groups)
    np.testing.assert_array_equal(b.values, c.values)
    assert (b.values > 0).sum(1).tolist() == [L * K] * len(b.groups)
    # another seed samples other tokens
    d = CollaborationMiner(activation_threshold=0.1, sample_ratio=1 / 3, random_seed=7, threshold_rule="absolute").activation_matrix(rd)
    assert d.values.shape == b.values.shape and not np.array_equal(d.values, b.values)


def test_bad_parameters():
    with pytest.raises(ValueError, match="sample_ratio"):
        CollaborationMiner(sample_ratio=0)
    with pytest.raises(ValueError, match="n_meta_components"):
        CollaborationMiner(n_components=2, n_meta_components=3)
    rd, _ = _planted(n_per=5)
    rd.domain_ids = None
    with pytest.raises(ValueError, match="domain_ids"):
        CollaborationMiner().fit(rd)


def test_relative_threshold_is_scale_free_for_unnormalized_top8_of_64():
    # OLMoE-like: top-8 of 64, unnormalized weights around 0.03; one slot per token is far below the rest
    rng = np.random.default_rng(0)
    n, k = 30, 8
    idx = np.stack([rng.choice(64, k, replace=False) for _ in range(n)])[:, None, :]
    w = np.full((n, 1, k), 0.03)
    w[:, 0, -1] = 0.001  # 1/30 of a typical slot: well under a fifth of the uniform share
    rd = routing(idx, 64, weights=w, domain_ids=np.zeros(n, int), domain_names=["d"])
    absolute = CollaborationMiner(activation_threshold=0.1, sample_ratio=1.0, threshold_rule="absolute").activation_matrix(rd)
    assert not absolute.values.any()  # the seed's absolute 0.1 drops every OLMoE-scale selection
    rel = CollaborationMiner(sample_ratio=1.0).activation_matrix(rd)  # default: 0.2 of the uniform share 1/k
    assert ((rel.values > 0).sum(1) == k - 1).all()
    # the same routing with weights rescaled (normalized top-k) gives the same pattern of kept selections
    rd2 = routing(idx, 64, weights=w / w.sum(-1, keepdims=True), domain_ids=np.zeros(n, int), domain_names=["d"])
    np.testing.assert_array_equal(CollaborationMiner(sample_ratio=1.0).activation_matrix(rd2).values > 0, rel.values > 0)


def test_unlabelled_tokens_do_not_count_for_any_domain():
    rd, _ = _planted(n_per=10)
    dom = rd.domain_ids.clone()
    dom[:5] = -1
    rd2 = replace(rd, domain_ids=dom)
    res = CollaborationMiner(sample_ratio=1.0, n_components=4, n_meta_components=2).fit(rd2)
    spec = res.specialization
    assert spec.tokens.sum() == rd.num_tokens - 5 and len(spec.group_names) == len(rd.domain_names)
    last = len(rd.domain_names) - 1
    assert spec.tokens[last] == (rd.domain_ids == last).sum().item()


def test_many_tokens_stay_in_a_bounded_reservoir_and_still_recover_the_groups():
    """Past ``max_rows`` sampled tokens a uniform sample of them is kept: memory stops at ``max_rows`` rows."""
    rd, groups = _planted(n_per=600)
    miner = CollaborationMiner(sample_ratio=0.5, n_components=G, n_meta_components=2, top_k=3, alpha=0.05,
                               batch_threshold=200, max_rows=300)
    acc = miner.accumulator()
    for chunk in rd.iter_chunks(100):
        acc.update(chunk)
        assert acc.rows.shape[0] <= 300
    assert acc.sampled == G * 600 // 2
    res = acc.result()
    assert res.num_tokens_sampled == G * 300 and any("uniform sample of 300" in n for n in res.notes)
    # the reservoir is a uniform sample: every group is present in about its share
    shares = np.bincount(acc.groups, minlength=G) / 300
    assert np.all(np.abs(shares - 1 / G) < 0.1), shares
    found = set()
    for k in range(G):
        units = {(rd.moe_layers.index(l), e) for l, e, _ in res.pattern_units(k, n=L * K)}
        found.add(max(range(G), key=lambda g: len(units & set(groups[g]))))
    assert found == set(range(G))


def test_reservoir_must_hold_the_batch_sample():
    with pytest.raises(ValueError, match="max_rows"):
        CollaborationMiner(batch_threshold=5000, max_rows=100)
