"""Domain specialization: does a domain send more of its tokens to an expert than the uniform k/E share?

(By token id: ``core.analysis.vocabulary``; along the sequence: ``core.analysis.consistency``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.results import ResultMixin
from core.analysis.streaming import GroupBy, RoutingAccumulator, fold_one, group_ids, selection_np
from core.routing_data import RoutingData


@dataclass
class DomainSpecialization(ResultMixin):
    """Share of each domain's tokens routed to each expert, against the uniform k/E baseline.

    ``share[l, d, e]`` = fraction of domain d's tokens that selected expert e at MoE layer
    position l (sums to k over experts). ``ratio = share / (k/E)`` (1 = no preference).
    ``score[l, e] = max_d ratio`` (how strongly the expert prefers its favourite domain).
    ``kl[l, d]`` (nats) = KL(domain d's utilization || all tokens' utilization).
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    group_by: str
    group_names: list[str]
    tokens: np.ndarray  # [D] tokens per group
    counts: np.ndarray  # [L, D, E]
    share: np.ndarray  # [L, D, E]
    baseline: float  # k / E
    ratio: np.ndarray  # [L, D, E]
    score: np.ndarray  # [L, E]
    preferred_group: np.ndarray  # [L, E] argmax_d ratio
    kl: np.ndarray  # [L, D] nats
    layer_score: np.ndarray  # [L] token-weighted mean over groups of kl

    def top_experts(self, group: int | str, n: int = 10) -> pd.DataFrame:
        """The ``n`` (layer, expert) units with the highest ratio for one group."""
        d = self.group_names.index(group) if isinstance(group, str) else int(group)
        r = self.ratio[:, d, :]
        order = np.argsort(-r, axis=None)[:n]
        li, ei = np.unravel_index(order, r.shape)
        return pd.DataFrame(
            {
                "layer": np.asarray(self.moe_layers)[li],
                "expert": ei,
                "share": self.share[li, d, ei],
                "ratio": r[li, ei],
            }
        )


class DomainSpecializationAccumulator(RoutingAccumulator):
    """Streaming domain (or dataset) x expert assignment counts; tokens with no label (id < 0) are left out."""

    needs = ("topk_idx",)

    def __init__(self, by: GroupBy = "domain") -> None:
        if by not in ("domain", "dataset"):
            raise ValueError(f"by must be 'domain' or 'dataset', got {by!r}")
        super().__init__()
        self.by = by
        self.name = f"the {by} specialization"
        self.counts: dict[int, np.ndarray] = {}
        self.tokens: dict[int, int] = {}
        self.unlabelled = 0

    def _add(self, chunk: RoutingData) -> None:
        ids = group_ids(chunk, self.by)
        m = selection_np(chunk)
        self.unlabelled += int((ids < 0).sum())
        for g in np.unique(ids[ids >= 0]):
            sel = ids == g
            g = int(g)
            self.counts[g] = self.counts.get(g, 0) + m[sel].sum(0)
            self.tokens[g] = self.tokens.get(g, 0) + int(sel.sum())

    def _result(self) -> DomainSpecialization:
        if not self.counts:
            raise ValueError(f"no {self.by}-labelled tokens were given to the {self.by} specialization")
        layers, E, k = list(self.layout.moe_layers), self.layout.num_experts, self.layout.top_k
        table = self.domain_names if self.by == "domain" else self.dataset_names
        D = max(max(self.counts) + 1, len(table))
        names = [table[d] if d < len(table) else str(d) for d in range(D)]
        counts = np.zeros((len(layers), D, E))
        tokens = np.zeros(D)
        for d, c in self.counts.items():
            counts[:, d, :] = c
            tokens[d] = self.tokens[d]
        with np.errstate(divide="ignore", invalid="ignore"):
            share = counts / tokens[None, :, None]
        base = k / E
        ratio = share / base
        present = tokens > 0
        score = np.nanmax(np.where(present[None, :, None], ratio, np.nan), axis=1)
        pref = np.argmax(np.where(present[None, :, None], ratio, -np.inf), axis=1)
        overall = counts.sum(1)
        overall = overall / overall.sum(-1, keepdims=True)
        du = counts / np.clip(counts.sum(-1, keepdims=True), 1e-300, None)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(du > 0, du * np.log(du / overall[:, None, :]), 0.0)
        kl = terms.sum(-1)
        kl[:, ~present] = np.nan
        w = tokens / tokens.sum()
        layer_score = np.nansum(kl * w[None, :], axis=1)
        return DomainSpecialization(
            layers, E, k, self.by, names, tokens, counts, share, base, ratio, score, pref, kl, layer_score
        )


def domain_specialization(
    routing: RoutingData | Iterable[RoutingData], by: GroupBy = "domain"
) -> DomainSpecialization:
    """Domain (or dataset) x expert share table per layer, with its k/E baseline."""
    return fold_one(routing, DomainSpecializationAccumulator(by))
