"""Shares of a stream, folded apart and merged, give the results of one fold over all of it.

This is what lets several torchrun processes analyse the caches: each folds its shard range,
the states are merged in stream order, and the report must not depend on how many there were.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.analysis.coactivation import RoutingPathsAccumulator
from core.analysis.collaboration import CollaborationMiner
from core.analysis.correlations import CorrelationAccumulator
from core.analysis.resampling import DocumentRuns
from core.analysis.routing_stats import RoutingStatsAccumulator
from core.analysis.streaming import feed, fold, merge_all, results_of
from core.analysis.vocabulary import VocabularyAccumulator
from core.safe_io import to_jsonable
from core.pipeline.context import RunContext
from core.pipeline.options import make_options
from core.pipeline.suite import pass_accumulators
from tests.compare import assert_same
from tests.planted import planted

DOCS, DOC_LEN = 48, 30


def _checkpoints():
    """The same tokens at two checkpoints, two datasets, router logits and weights: every analysis applies."""
    final = planted(num_docs=DOCS, doc_len=DOC_LEN, stickiness=0.3, vocab=25, token_pref=2.0, seed=0)
    early = planted(num_docs=DOCS, doc_len=DOC_LEN, seed=1)
    rng = np.random.default_rng(2)
    out = []
    for rd in (early, final):
        rd = replace(rd, token_ids=final.token_ids, dataset_ids=(final.doc_ids >= DOCS // 2).long(),
                     dataset_names=["x", "y"])
        logits = torch.as_tensor(rng.normal(size=(rd.num_tokens, rd.num_layers, rd.num_experts)), dtype=torch.float32)
        weights = torch.softmax(logits, -1).gather(-1, rd.topk_idx)
        out.append(replace(rd, router_logits=logits, topk_weight=weights))
    return out


def _shards(cks, docs_per_shard=5):
    """Aligned items as the run streams them: shards of whole documents, cut into chunks of 64 tokens."""
    items = []
    for lo in range(0, DOCS, docs_per_shard):
        part = slice(lo * DOC_LEN, min(DOCS, lo + docs_per_shard) * DOC_LEN)
        shard = [c.select(part) for c in cks]
        items.append([[c.select(slice(a, a + 64)) for c in shard] for a in range(0, shard[-1].num_tokens, 64)])
    return items


def _accumulators():
    sweep = SimpleNamespace(checkpoints=[SimpleNamespace(name="early", step=10), SimpleNamespace(name="final", step=20)])
    accs, _ = pass_accumulators(RunContext(make_options(micro=True, resamples=50, seed=3), None, sweep, {}))
    accs["paths_pruned"] = _PickFinal(RoutingPathsAccumulator(top_n=5, max_paths=5))
    accs["vocab_fixed"] = _PickFinal(VocabularyAccumulator(min_count=3, permutations=5, token_ids=[3, 1, 4, 15, 9, 2, 6, 90]))
    return accs


class _PickFinal:
    def __init__(self, acc):
        self.acc = acc

    def update(self, item):
        self.acc.update(item[-1])

    def result(self):
        return self.acc.result()

    def merge(self, other):
        self.acc = self.acc.merge(other.acc)
        return self


@pytest.mark.parametrize("cuts", [(1, 2), (3, 7), (5,)])
def test_merged_shares_give_the_results_of_one_fold(cuts):
    cks = _checkpoints()
    shards = _shards(cks)
    whole = fold((c for s in shards for c in s), _accumulators())
    bounds = [0, *cuts, len(shards)]
    parts = [feed((c for s in shards[a:b] for c in s), _accumulators()) for a, b in zip(bounds, bounds[1:])]
    merged = results_of(merge_all(parts))
    assert set(merged) == set(whole)
    for name in whole:
        if name != "paths_pruned":
            assert_same(to_jsonable(whole[name]), to_jsonable(merged[name]), name)
    assert merged["vocab_fixed"].tracked_token_ids == 8  # id 90 is in no share's data: still merges
    # a path counter that had to prune is approximate in one process and in shares alike, and says so
    assert not whole["paths_pruned"].exact and not merged["paths_pruned"].exact
    assert merged["paths_pruned"].num_tokens == whole["paths_pruned"].num_tokens


def test_a_share_with_no_tokens_merges_as_nothing():
    cks = _checkpoints()
    items = [c for s in _shards(cks) for c in s]
    whole = fold(items, _accumulators())
    merged = results_of(merge_all([feed([], _accumulators()), feed(items, _accumulators()), feed([], _accumulators())]))
    for name in whole:
        if name != "paths_pruned":
            assert_same(to_jsonable(whole[name]), to_jsonable(merged[name]), name)


def test_vocabulary_without_fixed_ids_that_fills_its_slots_merges_approximately_and_says_so():
    chunks = [c[-1] for s in _shards(_checkpoints()) for c in s]
    parts = [feed(part, {"v": VocabularyAccumulator(min_count=3, permutations=2, max_token_ids=12)})
             for part in (chunks[:3], chunks[3:])]
    with pytest.warns(UserWarning, match="tracked token ids were not counted"):
        merge_all(parts)
    roomy = [feed(part, {"v": VocabularyAccumulator(min_count=3, permutations=2)}) for part in (chunks[:3], chunks[3:])]
    whole = fold(chunks, {"v": VocabularyAccumulator(min_count=3, permutations=2)})
    assert_same(to_jsonable(whole["v"]), to_jsonable(results_of(merge_all(roomy))["v"]))


def test_shares_that_split_a_document_say_so():
    runs, later = DocumentRuns(), DocumentRuns()
    runs.add(np.array([1, 1, 2]), np.ones((3, 1)))
    later.add(np.array([2, 3]), np.ones((2, 1)))
    with pytest.warns(UserWarning, match="split between two shares"):
        keys, _ = runs.merge(later)
    assert keys.tolist() == [2] and runs.key == 3


def test_merge_refuses_another_analysis_or_layout():
    cks = _checkpoints()
    a = RoutingStatsAccumulator().update(cks[-1])
    with pytest.raises(TypeError, match="cannot merge"):
        a.merge(CorrelationAccumulator("topk").update(cks[-1]))
    other = RoutingStatsAccumulator().update(planted(num_docs=2, doc_len=5, num_experts=16))
    with pytest.raises(ValueError, match="E=16"):
        a.merge(other)


def test_collaboration_sample_is_the_same_whichever_shares_read_it():
    cks = _checkpoints()
    chunks = [c[-1] for s in _shards(cks) for c in s]
    miner = CollaborationMiner(sample_ratio=0.5, n_components=3, n_meta_components=2, batch_threshold=100, max_rows=120)
    one = feed(chunks, {"c": miner.accumulator()})["c"]
    halves = [feed(chunks[:9], {"c": miner.accumulator()}), feed(chunks[9:], {"c": miner.accumulator()})]
    two = merge_all(halves)["c"]
    assert one.sampled == two.sampled and len(one.rows) == 120
    np.testing.assert_array_equal(one.rows, two.rows)
    np.testing.assert_array_equal(one.groups, two.groups)
