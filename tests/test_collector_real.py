"""The collector with the real MoEModelWrapper on a tiny random OLMoE (slow part: importing transformers' OLMoE)."""

from __future__ import annotations

import torch

from core.collection.collector import ActivationCollector, trimmed_batch
from core.model_access.wrapper import MoEModelWrapper
from core.routing_data import RoutingData
from tests.fakes import make_rows
from tests.tiny_models import build


def test_real_wrapper_on_tiny_olmoe(tmp_path):
    w = MoEModelWrapper(build("olmoe"))
    rows = make_rows(num_rows=6, width=12)
    rows.input_ids = rows.input_ids % 90
    cache = ActivationCollector(w, progress=False).collect(rows, tmp_path, batch_size=4, shard_tokens=16, hidden_layers=[1])
    rd = cache.load()
    assert rd.num_tokens == int(rows.attention_mask.sum())
    # the same batches traced directly (identical batches keep float results bit-identical)
    direct = RoutingData.concat(
        [w.trace_routing(*trimmed_batch(rows.input_ids, rows.attention_mask, a, b)[:2]) for a, b in [(0, 4), (4, 6)]]
    )
    assert torch.equal(rd.topk_idx, direct.topk_idx)
    assert torch.equal(rd.router_logits, direct.router_logits.half().float())
    assert rd.hidden[1].shape[0] == rd.num_tokens
