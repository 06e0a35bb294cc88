"""Which tokens of a sweep each process analyses: units from the manifests, contiguous shares, the same stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.analysis.streaming import feed, fold, merge_all, results_of
from core.store.cache import RoutingCacheWriter
from core.collection.checkpoints import Checkpoint
from core.distributed import Ranks
from core.collection.sweep import Sweep
from core.routing_data import RoutingData
from core.safe_io import to_jsonable
from core.pipeline.shares import owners, share_tokens, sweep_stream, sweep_units
from tests.compare import assert_same
from tests.test_analysis_merge import DOC_LEN, DOCS, _accumulators, _checkpoints
from tests.test_cache import header


def _cache(path: Path, rd: RoutingData, rows_per_shard: int):
    """One document per row, as the main run writes them, in shards of ``rows_per_shard`` rows."""
    w = RoutingCacheWriter(path, header(num_rows=DOCS, moe_layers=list(rd.moe_layers), num_experts=rd.num_experts,
                                        dataset="planted", domain_names=rd.domain_names, dataset_names=rd.dataset_names,
                                        settings={"storage": "full", "dtype": "float32", "batch_size": 2,
                                                  "hidden_layers": []}))
    for lo in range(0, DOCS, rows_per_shard):
        hi = min(DOCS, lo + rows_per_shard)
        w.write_shard(rd.select(slice(lo * DOC_LEN, hi * DOC_LEN)), lo, hi - lo)
    return w.finish()


def _sweep(tmp_path):
    early, final = _checkpoints()
    caches = [_cache(tmp_path / "early", early, 4), _cache(tmp_path / "final", final, 6)]  # common ends every 12 rows
    ckpts = [Checkpoint("early", step=10), Checkpoint("final", step=20)]
    return Sweep(tmp_path / "index.json", ckpts, {"planted": caches}), early, final


def test_units_end_where_every_checkpoint_ends_a_shard(tmp_path):
    sweep, _, _ = _sweep(tmp_path)
    units = sweep_units(sweep)
    assert [u.shards for u in units] == [((0, 1, 2), (0, 1)), ((3, 4, 5), (2, 3)), ((6, 7, 8), (4, 5)),
                                         ((9, 10, 11), (6, 7))]
    assert [u.tokens for u in units] == [12 * DOC_LEN] * 4
    assert owners(units, 3) == [0, 1, 1, 2] and owners(units, 1) == [0] * 4  # contiguous, in stream order
    assert share_tokens(sweep, 3) == [12 * DOC_LEN, 24 * DOC_LEN, 12 * DOC_LEN]
    assert share_tokens(sweep, 8)[:4] == [0, 12 * DOC_LEN, 0, 12 * DOC_LEN] and sum(share_tokens(sweep, 8)) == DOCS * DOC_LEN


def test_shares_stream_each_checkpoints_own_tokens_and_together_the_whole(tmp_path):
    sweep, early, final = _sweep(tmp_path)
    whole = list(sweep_stream(sweep))
    assert all(len(item) == 2 for item in whole)
    for c, want in enumerate((early, final)):  # each position of an item reads its own checkpoint's cache
        got = torch.cat([item[c].topk_idx for item in whole])
        assert torch.equal(got, want.topk_idx)
    shares = [list(sweep_stream(sweep, Ranks(r, 3))) for r in range(3)]
    assert [sum(i[-1].num_tokens for i in s) for s in shares] == share_tokens(sweep, 3)
    joined = [item for s in shares for item in s]
    assert len(joined) == len(whole)
    for a, b in zip(joined, whole):
        assert torch.equal(a[-1].topk_idx, b[-1].topk_idx) and torch.equal(a[0].doc_ids, b[0].doc_ids)


def test_the_analyses_of_three_shares_are_those_of_one_process(tmp_path):
    sweep, _, _ = _sweep(tmp_path)
    one = fold(sweep_stream(sweep), _accumulators())
    merged = results_of(merge_all([feed(sweep_stream(sweep, Ranks(r, 3)), _accumulators()) for r in range(3)]))
    for name in one:
        if name != "paths_pruned":
            assert_same(to_jsonable(one[name]), to_jsonable(merged[name]), name)
    assert np.isfinite(one["checkpoint_dynamics"].saturation).all()
