"""Expert specialization: by domain, by token id, and along the sequence.

Three questions a specialization claim needs answered against a baseline: does a domain
send more of its tokens to an expert than the uniform k/E share (domain specialization)?
does a given token id keep going to the same expert (vocabulary specialization)? and do
neighbouring tokens share an expert more often than chance (routing consistency)?
All three stream over chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.analysis_utils import ResultMixin, as_chunks, check_same_layout, require, selection_np, top1_np
from core.routing_data import RoutingData


# ---------------------------------------------------------------- domain specialization
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


class DomainSpecializationAccumulator:
    """Streaming domain x expert assignment counts."""

    def __init__(self, by: Literal["domain", "dataset"] = "domain") -> None:
        if by not in ("domain", "dataset"):
            raise ValueError(f"by must be 'domain' or 'dataset', got {by!r}")
        self.by = by
        self.layout = None
        self.names: list[str] = []
        self.counts: dict[int, np.ndarray] = {}
        self.tokens: dict[int, int] = {}

    def update(self, chunk: RoutingData) -> DomainSpecializationAccumulator:
        ids_name = f"{self.by}_ids"
        if self.layout is None:
            self.layout = (list(chunk.moe_layers), chunk.num_experts, chunk.top_k)
            self.names = list(chunk.domain_names if self.by == "domain" else chunk.dataset_names)
        check_same_layout(chunk, *self.layout)
        if chunk.num_tokens == 0:
            return self
        require(chunk, ids_name, why=f"{self.by} specialization")
        ids = getattr(chunk, ids_name).numpy()
        m = selection_np(chunk)
        for g in np.unique(ids):
            sel = ids == g
            g = int(g)
            self.counts[g] = self.counts.get(g, 0) + m[sel].sum(0)
            self.tokens[g] = self.tokens.get(g, 0) + int(sel.sum())
        return self

    def result(self) -> DomainSpecialization:
        if not self.counts:
            raise ValueError(f"no tokens were given to the {self.by} specialization")
        layers, E, k = self.layout
        D = max(max(self.counts) + 1, len(self.names))
        names = [self.names[d] if d < len(self.names) else str(d) for d in range(D)]
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
    routing: RoutingData | Iterable[RoutingData], by: Literal["domain", "dataset"] = "domain"
) -> DomainSpecialization:
    """Domain (or dataset) x expert share table per layer, with its k/E baseline."""
    acc = DomainSpecializationAccumulator(by)
    for chunk in as_chunks(routing):
        acc.update(chunk)
    return acc.result()


# ------------------------------------------------------------ vocabulary specialization
@dataclass
class VocabularySpecialization(ResultMixin):
    """Per-token-id expert preference for token ids seen at least ``min_count`` times.

    ``concentration[t, l]`` = fraction of token t's occurrences that selected its most
    frequent expert at MoE layer position l; baseline ``k/E`` (no preference) and 1 (always
    the same expert). ``mean_concentration[l]`` averages over the kept token ids.
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    min_count: int
    token_ids: np.ndarray  # [T]
    occurrences: np.ndarray  # [T]
    preferred_expert: np.ndarray  # [T, L]
    concentration: np.ndarray  # [T, L]
    mean_concentration: np.ndarray  # [L]
    baseline: float


def vocabulary_specialization(
    routing: RoutingData | Iterable[RoutingData], min_count: int = 20
) -> VocabularySpecialization:
    """Which token ids are routed consistently to one expert (sparse accumulation over the vocabulary)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    layout = None
    acc = None
    occ = np.zeros(0)
    for chunk in as_chunks(routing):
        if layout is None:
            layout = (list(chunk.moe_layers), chunk.num_experts, chunk.top_k)
        check_same_layout(chunk, *layout)
        if chunk.num_tokens == 0:
            continue
        require(chunk, "token_ids", why="vocabulary specialization")
        tok = chunk.token_ids.numpy().astype(np.int64)
        m = selection_np(chunk).reshape(chunk.num_tokens, -1)
        V = int(tok.max()) + 1
        rows, cols = np.nonzero(m)
        part = sp.csr_matrix((m[rows, cols], (tok[rows], cols)), shape=(V, m.shape[1]))
        if acc is None:
            acc = part
        else:
            V = max(V, acc.shape[0])
            acc.resize((V, m.shape[1]))
            part.resize((V, m.shape[1]))
            acc = acc + part
        if occ.shape[0] < V:
            occ = np.concatenate([occ, np.zeros(V - occ.shape[0])])
        occ += np.bincount(tok, minlength=V)[: occ.shape[0]]
    if layout is None or acc is None:
        raise ValueError("no tokens were given to the vocabulary specialization")
    layers, E, k = layout
    keep = np.nonzero(occ >= min_count)[0]
    dense = acc[keep].toarray().reshape(len(keep), len(layers), E)
    pref = dense.argmax(-1)
    conc = dense.max(-1) / np.clip(occ[keep][:, None], 1, None)
    mean_conc = conc.mean(0) if len(keep) else np.full(len(layers), np.nan)
    return VocabularySpecialization(layers, E, k, min_count, keep, occ[keep], pref, conc, mean_conc, k / E)


# ------------------------------------------------------------------ routing consistency
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


def routing_consistency(routing: RoutingData | Iterable[RoutingData]) -> RoutingConsistency:
    """Consecutive-token routing consistency against its chance baseline (pairs may straddle chunks)."""
    layout = None
    prev = None  # last token of previous chunk: (doc, pos, top1 [L], mask [L, E])
    pairs = 0
    same = overlap = top1_counts = None
    for chunk in as_chunks(routing):
        if layout is None:
            layout = (list(chunk.moe_layers), chunk.num_experts, chunk.top_k)
            L, E = chunk.num_layers, chunk.num_experts
            same, overlap, top1_counts = np.zeros(L), np.zeros(L), np.zeros((L, E))
        check_same_layout(chunk, *layout)
        if chunk.num_tokens == 0:
            continue
        require(chunk, "positions", why="routing consistency")
        pos = chunk.positions.numpy()
        doc = chunk.doc_ids.numpy() if chunk.doc_ids is not None else np.zeros_like(pos)
        t1 = top1_np(chunk)
        m = selection_np(chunk)
        for li in range(t1.shape[1]):
            v = t1[:, li]
            top1_counts[li] += np.bincount(v[v >= 0], minlength=layout[1])
        if prev is not None:
            doc = np.concatenate([[prev[0]], doc])
            pos = np.concatenate([[prev[1]], pos])
            t1 = np.concatenate([prev[2][None], t1])
            m = np.concatenate([prev[3][None], m])
        ok = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
        pairs += int(ok.sum())
        same += (t1[1:][ok] == t1[:-1][ok]).sum(0)
        overlap += (m[1:][ok] * m[:-1][ok]).sum((0, 2)) / layout[2]
        prev = (doc[-1], pos[-1], t1[-1], m[-1])
    if layout is None:
        raise ValueError("no tokens were given to the routing consistency analysis")
    if pairs == 0:
        raise ValueError("no adjacent token pairs (same document, consecutive positions) in this routing")
    u = top1_counts / top1_counts.sum(-1, keepdims=True)
    return RoutingConsistency(layout[0], pairs, same / pairs, (u**2).sum(-1), overlap / pairs)
