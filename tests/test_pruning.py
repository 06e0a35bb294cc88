"""Expert pruning on a model whose experts' importance is known: the right criterion wins, random is the baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.analysis.pruning import collaboration_share, lowest, pruning_study
from data import TokenizedDataset

LAYERS, E = [1, 3], 8
# what removing each expert costs, per layer (nats per token, the same on every token)
IMPORTANCE = np.array([[0.50, 0.01, 0.30, 0.02, 0.40, 0.03, 0.20, 0.04],
                       [0.02, 0.60, 0.01, 0.35, 0.03, 0.25, 0.04, 0.45]])


class KnownCostModel:
    """``forward_loss`` = a per-token base loss plus the known cost of every expert removed."""

    def __init__(self, importance: np.ndarray = IMPORTANCE, layers: list[int] = LAYERS) -> None:
        self.importance, self.layers = importance, layers

    def forward_loss(self, input_ids, attention_mask, ablate=None):
        base = 2.0 + (input_ids[:, 1:] % 7).double() / 10  # differs by token, the same with or without ablation
        cost = sum(self.importance[self.layers.index(layer), e] for layer, experts in (ablate or {}).items() for e in experts)
        loss = base + cost
        return loss.masked_fill(attention_mask[:, 1:] == 0, float("nan"))


def _tokens(rows: int = 24, width: int = 10) -> TokenizedDataset:
    ids = torch.randint(3, 50, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    domain = (torch.arange(rows) % 2)[:, None].expand_as(ids).clone()
    doc = torch.arange(rows)[:, None].expand_as(ids).clone()
    return TokenizedDataset(input_ids=ids, attention_mask=mask, doc_ids=doc, positions=torch.arange(width).expand_as(ids).clone(),
                            domain_ids=domain, dataset_ids=torch.zeros_like(ids), domain_names=["math", "code"],
                            dataset_names=["toy"], documents=[], max_length=width, packed=False)


def test_lowest_removes_the_fraction_with_the_lowest_scores_in_every_layer():
    assert lowest(IMPORTANCE, LAYERS, 0.25) == {1: [1, 3], 3: [0, 2]}
    assert lowest(IMPORTANCE, LAYERS, 0.01) == {1: [1], 3: [2]}  # at least one expert
    assert len(lowest(IMPORTANCE, LAYERS, 0.99)[1]) == E - 1  # never all of them


# eight layers: random choices of 2 of 8 experts in only two layers spread too widely for any choice to be
# told from them with 8 seeds (the best possible one is about 3 of their sd below their mean)
LAYERS8, IMPORTANCE8 = list(range(8)), np.tile(IMPORTANCE, (4, 1))


def test_the_criterion_that_knows_the_cost_beats_random_and_the_inverted_one_does_not():
    scores = {"usage": IMPORTANCE8.copy(), "weight_mass": -IMPORTANCE8}  # one right, one exactly wrong
    res = pruning_study(KnownCostModel(IMPORTANCE8, LAYERS8), _tokens(), scores, LAYERS8, fractions=(0.25, 0.5),
                        random_seeds=8, causal=True, batch_size=4, resamples=50)
    assert res.criteria == ["usage", "weight_mass", "causal", "random"]
    u, wm, ca, rnd = (res.criteria.index(c) for c in ("usage", "weight_mass", "causal", "random"))
    # the loss change is exactly the cost of what was removed, on every domain
    want = [np.sort(IMPORTANCE8, 1)[:, :n].sum() for n in (2, 4)]
    np.testing.assert_allclose(res.delta[u], np.array(want)[:, None].repeat(2, 1), atol=1e-9)
    np.testing.assert_allclose(res.delta[ca], res.delta[u], atol=1e-9)  # single-expert ablations find the same experts
    assert res.removed["causal"] == res.removed["usage"]
    assert res.beats_random[u].all() and res.beats_random[ca].all() and not res.beats_random[wm].any()
    p = res.versus_random.p_adjusted  # one-sided, Holm over the 3 criteria x 2 fractions
    assert res.versus_random.family == 6 and (p[[u, ca]] < 0.05).all() and (p[wm] == 1).all()
    assert not res.beats_random[rnd].any() and res.best == ["usage", "usage"]
    assert (res.overall[wm] > res.overall[rnd]).all()  # removing the most important is worse than chance
    assert res.random_seed_overall.shape == (8, 2) and res.experts_pruned == [2, 4] and res.num_experts == E
    assert len(res.notes) == 1 and res.notes[0].startswith("overall: token-weighted")  # how the overall interval is made


def test_collaboration_share_weights_atoms_by_pattern_use():
    atoms = np.zeros((2, 2, 3))
    atoms[0, 0, 1], atoms[1, 1, 2], atoms[1, 0, 0] = 1.0, 0.5, -3.0  # negative weights do not count
    np.testing.assert_allclose(collaboration_share(atoms, np.array([0.2, 1.0])), [[0, 0.2, 0], [0, 0, 0.5]])


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        pruning_study(KnownCostModel(), _tokens(), {"usage": IMPORTANCE}, LAYERS, fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="at least 3 seeds"):
        pruning_study(KnownCostModel(), _tokens(), {"usage": IMPORTANCE}, LAYERS, random_seeds=0)


def test_one_document_per_domain_gives_no_interval_and_no_verdict():
    """One document per domain leaves nothing to resample: no interval, so nothing beats random (it did, from zero-width intervals)."""
    scores = {"usage": IMPORTANCE.copy()}
    res = pruning_study(KnownCostModel(), _tokens(rows=2), scores, LAYERS, fractions=(0.5,), random_seeds=8,
                        causal=False, batch_size=4, resamples=50)
    u = res.criteria.index("usage")
    assert np.isfinite(res.overall[u]).all() and np.isnan(res.overall_low[u]).all() and np.isnan(res.overall_high[u]).all()
    assert not res.beats_random.any() and sum("fewer than 6 document blocks" in n for n in res.notes) == 1
    with_docs = pruning_study(KnownCostModel(), _tokens(rows=24), scores, LAYERS, fractions=(0.5,), random_seeds=8,
                              causal=False, batch_size=4, resamples=50)
    assert with_docs.beats_random[u].all()  # the same costs with documents to resample: a verdict
