"""Routing consistency: do neighbouring tokens of a document share an expert more often than chance?"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one, selection_np, top1_np
from core.routing_data import RoutingData


@dataclass
class RoutingConsistency(ResultMixin):
    """How often adjacent tokens (same document, positions p and p+1) keep the same expert.

    ``same_top1[l]``: fraction of pairs with the same top-1 expert; ``chance[l]`` = sum of
    squared top-1 utilization (the rate if top-1 choices were independent);
    ``topk_overlap[l]``: mean |top-k(p) ∩ top-k(p+1)| / k.
    """

    moe_layers: list[int]
    num_pairs: int
    same_top1: np.ndarray  # [L]
    chance: np.ndarray  # [L]
    topk_overlap: np.ndarray  # [L]


class ConsistencyAccumulator(RoutingAccumulator):
    """Streaming counts over adjacent token pairs (same document, consecutive positions); pairs may straddle chunks."""

    name = "the routing consistency analysis"
    needs = ("topk_idx", "positions")

    def _start(self) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        self.prev = None  # last token of the previous chunk: (doc, pos, top1 [L], mask [L, E])
        self.pairs = 0
        self.same, self.overlap, self.top1_counts = np.zeros(L), np.zeros(L), np.zeros((L, E))

    def _add(self, chunk: RoutingData) -> None:
        pos = chunk.positions.numpy()
        doc = chunk.doc_ids.numpy() if chunk.doc_ids is not None else np.zeros_like(pos)
        t1 = top1_np(chunk)
        m = selection_np(chunk)
        for li in range(t1.shape[1]):
            v = t1[:, li]
            self.top1_counts[li] += np.bincount(v[v >= 0], minlength=self.layout.num_experts)
        if self.prev is not None:
            doc = np.concatenate([[self.prev[0]], doc])
            pos = np.concatenate([[self.prev[1]], pos])
            t1 = np.concatenate([self.prev[2][None], t1])
            m = np.concatenate([self.prev[3][None], m])
        ok = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
        self.pairs += int(ok.sum())
        self.same += (t1[1:][ok] == t1[:-1][ok]).sum(0)
        self.overlap += (m[1:][ok] * m[:-1][ok]).sum((0, 2)) / self.layout.top_k
        self.prev = (doc[-1], pos[-1], t1[-1], m[-1])

    def _result(self) -> RoutingConsistency:
        if self.pairs == 0:
            raise ValueError("no adjacent token pairs (same document, consecutive positions) in this routing")
        u = self.top1_counts / self.top1_counts.sum(-1, keepdims=True)
        return RoutingConsistency(list(self.layout.moe_layers), self.pairs, self.same / self.pairs, (u**2).sum(-1),
                                  self.overlap / self.pairs)


def routing_consistency(routing: RoutingData | Iterable[RoutingData]) -> RoutingConsistency:
    """Consecutive-token routing consistency against its chance baseline (pairs may straddle chunks)."""
    return fold_one(routing, ConsistencyAccumulator())
