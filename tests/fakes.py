"""Shared test doubles: a deterministic stand-in for MoEModelWrapper, token rows, and routing built from indices.

The fake wrapper's routing is a pure function of (token id, position in row), so an
interrupted and resumed collection must reproduce an uninterrupted one bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from core.routing_data import RoutingData


class Killed(RuntimeError):
    """Raised by the fake to simulate a run stopped between batches."""


class FakeTokenizer:
    name_or_path = "fake-tokenizer"
    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=512, add_special_tokens=True):
        ids = [[1 + (ord(ch) % 60) for ch in t][:max_length] for t in texts]
        return {"input_ids": ids}


class FakeWrapper:
    model_name = "fake/moe"
    revision = "r1"
    moe_layers = [0, 2]
    num_experts = 8
    top_k = 2
    score_fn = "softmax"
    hidden_size = 4

    def __init__(self, fail_on_call: int | None = None, tokenizer=None):
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.tokenizer = tokenizer

    def logits(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        L, E = len(self.moe_layers), self.num_experts
        layer = torch.arange(1, L + 1, dtype=torch.float32).view(1, L, 1)
        expert = torch.arange(E, dtype=torch.float32).view(1, 1, E)
        x = ids.float().view(-1, 1, 1) * 0.37 * layer + pos.float().view(-1, 1, 1) * 0.11 + expert * 1.3
        return torch.sin(x) * 3

    def trace_routing(self, input_ids, attention_mask=None, hidden_layers=()):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise Killed(f"simulated kill at batch {self.calls}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B, T = input_ids.shape
        sel = attention_mask.bool()
        pos = torch.arange(T).expand(B, T)[sel]
        ids = input_ids[sel]
        logits = self.logits(ids, pos)
        probs = torch.softmax(logits, -1)
        w, idx = probs.topk(self.top_k, dim=-1)
        hidden = {h: torch.cos(ids.float().view(-1, 1) * (h + 1) + torch.arange(self.hidden_size)) for h in hidden_layers}
        return RoutingData(
            moe_layers=list(self.moe_layers), num_experts=self.num_experts, top_k=self.top_k,
            router_logits=logits, topk_idx=idx, topk_weight=w, token_ids=ids.clone(), positions=pos.clone(),
            score_fn=self.score_fn, hidden=hidden,
        )


def make_rows(num_rows: int = 13, width: int = 9, seed: int = 0, vocab: int = 100):
    """Right-padded rows of varying length (some fully padded), with doc/domain/dataset labels; ids in [1, vocab)."""
    from core.collection.collector import TokenRows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (num_rows, width), generator=g)
    lengths = torch.randint(0, width + 1, (num_rows,), generator=g)
    lengths[0] = width
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids = ids * mask  # pad id 0
    doc = torch.arange(num_rows).unsqueeze(1).expand(-1, width).masked_fill(mask == 0, -1)
    pos = torch.arange(width).expand(num_rows, width).masked_fill(mask == 0, -1)
    dom = (torch.arange(num_rows) % 2).unsqueeze(1).expand(-1, width).masked_fill(mask == 0, -1)
    dset = torch.zeros(num_rows, width, dtype=torch.long).masked_fill(mask == 0, -1)
    return TokenRows(
        ids, mask, doc_ids=doc.clone(), positions=pos.clone(), domain_ids=dom.clone(), dataset_ids=dset,
        domain_names=["general", "math"], dataset_names=["toy"],
    )


def routing(idx, num_experts: int, *, weights=None, logits=None, **fields) -> RoutingData:
    """RoutingData whose selections are ``idx [N, L, k]`` (weights 1 unless given); other fields as keywords.

    Label fields (``token_ids``, ``doc_ids``, ...) may be lists or arrays; ``*_names`` pass through.
    """
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    w = torch.ones(idx.shape) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    labels = {k: v if k.endswith("names") else torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in fields.items()}
    return RoutingData(
        moe_layers=list(range(idx.shape[1])), num_experts=num_experts, top_k=idx.shape[2], topk_idx=idx, topk_weight=w,
        router_logits=None if logits is None else torch.as_tensor(np.asarray(logits), dtype=torch.float32), **labels,
    )
