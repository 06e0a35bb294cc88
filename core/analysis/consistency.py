"""Routing consistency: do neighbouring tokens of a document share an expert more often than chance?

Chance is *within the document*: neighbours share a document, and so a topic and a domain, so
pooled utilization would credit domain preference to "stickiness". The null is the same
statistic after shuffling the tokens of each document, computed exactly: for a document of n
tokens whose top-1 counts are b_e and top-k counts a_e, a random ordered pair of distinct
tokens has the same top-1 with probability sum b_e (b_e - 1) / (n (n - 1)). The verdict is a
jackknife over document blocks of value - null (a percentile bootstrap flagged 13-15% of layers
of random routing at 8 documents), Holm-corrected across layers. Besides, the two columns of the
Mixtral paper's Table 5 per domain, against uniform routing as the paper has them: same top-1
("first choice") and top-k sets sharing an expert ("first or second choice" at k = 2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from math import comb

import numpy as np
import pandas as pd

from core.analysis.resampling import (BlockSums, DocumentRuns, Estimate, block_of, document_keys,
                                      jackknife_paired_estimate, jackknife_weights, no_verdict, sum_by,
                                      too_few_documents)
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.analysis.features import selection_np, top1_np
from core.routing_data import RoutingData

NULL_NAME = "within-document shuffle"
MEASURES = ("same_top1", "next_in_topk", "topk_overlap")


def uniform_same_top1(num_experts: int) -> float:
    """Chance that two independent uniformly routed tokens have the same top-1 expert: 1/E."""
    return 1.0 / num_experts


def uniform_any_overlap(num_experts: int, top_k: int) -> float:
    """Chance that two independent uniform top-k sets share an expert: 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - comb(num_experts - top_k, top_k) / comb(num_experts, top_k)


@dataclass
class RoutingConsistency(ResultMixin):
    """How often adjacent tokens (same document, positions p and p+1) keep their expert, per MoE layer.

    ``same_top1[l]``: pairs with the same top-1 expert; ``next_in_topk[l]``: pairs where the next
    token's top-1 is among this token's top-k; ``topk_overlap[l]``: mean |top-k(p) ∩ top-k(p+1)| / k.
    Each ``*_chance`` is the same rate with each document's tokens shuffled (exact expectation),
    and ``estimates[name]`` holds value, interval and verdict. ``topk_any_overlap[l]``: pairs whose
    top-k sets share an expert. ``domain_*`` (``[D, L]``, pairs counted in the domain of their
    document) are the Mixtral paper's two columns, with their uniform-routing chance in
    ``uniform_same_top1`` and ``uniform_any_overlap``: see :meth:`mixtral_table`.
    """

    moe_layers: list[int]
    num_pairs: int
    num_documents: int
    same_top1: np.ndarray  # [L]
    chance: np.ndarray  # [L] same_top1 under the within-document shuffle
    next_in_topk: np.ndarray  # [L]
    next_in_topk_chance: np.ndarray  # [L]
    topk_overlap: np.ndarray  # [L]
    topk_overlap_chance: np.ndarray  # [L]
    estimates: dict[str, Estimate] = field(default_factory=dict)
    topk_any_overlap: np.ndarray | None = None  # [L]
    domain_names: list[str] = field(default_factory=list)
    domain_pairs: np.ndarray | None = None  # [D]
    domain_same_top1: np.ndarray | None = None  # [D, L]
    domain_any_overlap: np.ndarray | None = None  # [D, L]
    uniform_same_top1: float = float("nan")
    uniform_any_overlap: float = float("nan")

    def mixtral_table(self) -> pd.DataFrame:
        """One row per (domain, layer) with pairs: Mixtral's Table 5 columns, each beside its uniform chance."""
        rows = []
        for d, name in enumerate(self.domain_names):
            if self.domain_pairs is None or not self.domain_pairs[d]:
                continue
            for i, layer in enumerate(self.moe_layers):
                rows.append({"domain": name, "layer": layer, "pairs": int(self.domain_pairs[d]),
                             "same_top1": self.domain_same_top1[d, i], "same_top1_uniform": self.uniform_same_top1,
                             "topk_any_overlap": self.domain_any_overlap[d, i],
                             "topk_any_overlap_uniform": self.uniform_any_overlap})
        return pd.DataFrame(rows, columns=["domain", "layer", "pairs", "same_top1", "same_top1_uniform",
                                           "topk_any_overlap", "topk_any_overlap_uniform"])


class ConsistencyAccumulator(RoutingAccumulator):
    """Adjacent-pair counts per document (pairs may straddle chunks), with each document's shuffle expectation.

    ``resamples`` = 0 turns the verdict off; ``seed`` is kept for the run's uniform build (the jackknife draws nothing).
    """

    name = "the routing consistency analysis"
    needs = ("topk_idx", "positions")

    def __init__(self, resamples: int = 200, seed: int = 0) -> None:
        super().__init__()
        self.resamples, self.seed = resamples, seed

    def _start(self) -> None:
        self.prev = None  # last token of the previous chunk: (key, pos, top1 [L], mask [L, E])
        self.docs = DocumentRuns()
        self.sums = BlockSums()
        self.num_docs = 0
        self.by_domain: dict[int, np.ndarray] = {}  # domain id -> [pairs, same top-1 [L], any overlap [L]]

    def _add(self, chunk: RoutingData) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        key, pos = document_keys(chunk), chunk.positions.numpy()
        t1, m = top1_np(chunk), selection_np(chunk)
        b = np.zeros((len(t1), L, E))
        ok = t1 >= 0
        b[np.nonzero(ok)[0], np.nonzero(ok)[1], t1[ok]] = 1
        pair_feats = self._pairs(key, pos, t1, m)
        if chunk.domain_ids is not None:
            self._add_domains(chunk.domain_ids.numpy(), pair_feats)
        feats = np.concatenate([np.ones((len(t1), 1)), b.reshape(len(t1), -1), m.reshape(len(t1), -1), pair_feats], 1)
        self._close(*self.docs.add(key, feats))

    def _pairs(self, key, pos, t1, m) -> np.ndarray:
        """Per token, its pair with the previous token: [is pair, same top-1, next in top-k, overlap, any overlap] ([L] each)."""
        k = self.layout.top_k
        if self.prev is not None:
            pk, pp, pt, pm = self.prev
        else:
            pk, pp, pt, pm = -1, -10, np.full(t1.shape[1], -1), np.zeros(m.shape[1:])
        self.prev = (key[-1], pos[-1], t1[-1], m[-1])
        key_p, pos_p = np.r_[pk, key[:-1]], np.r_[pp, pos[:-1]]
        t1_p, m_p = np.concatenate([pt[None], t1[:-1]]), np.concatenate([pm[None], m[:-1]])
        ok = ((key_p == key) & (pos == pos_p + 1)).astype(np.float64)[:, None]
        same = (t1 == t1_p) & (t1 >= 0)
        cur = np.take_along_axis(m_p, np.clip(t1, 0, None)[..., None], -1)[..., 0] * (t1 >= 0)
        shared = (m * m_p).sum(-1)
        return np.concatenate([ok, ok * same, ok * cur, ok * shared / k, ok * (shared > 0)], 1)

    def _add_domains(self, dom: np.ndarray, pair_feats: np.ndarray) -> None:
        """Pair counts per domain (a pair's domain is its second token's): pairs, same top-1 and any overlap."""
        L = self.layout.num_layers
        cols = pair_feats[:, np.r_[0, 1 : 1 + L, 1 + 3 * L : 1 + 4 * L]]
        keep = dom >= 0
        if not keep.any():
            return
        ids, inv = np.unique(dom[keep], return_inverse=True)
        part = sum_by(inv, cols[keep], len(ids))
        for d, row in zip(ids.tolist(), part):
            self.by_domain[d] = self.by_domain[d] + row if d in self.by_domain else row

    def _close(self, keys: np.ndarray, totals: np.ndarray) -> None:
        """Add finished documents to the block sums, with their within-document shuffle expectations."""
        if not len(keys):
            return
        L, E, k = self.layout.num_layers, self.layout.num_experts, self.layout.top_k
        n = totals[:, 0]
        b = totals[:, 1 : 1 + L * E].reshape(-1, L, E)
        a = totals[:, 1 + L * E : 1 + 2 * L * E].reshape(-1, L, E)
        rest = totals[:, 1 + 2 * L * E :]
        pairs, same, nxt, ovl, anyo = rest[:, 0], *(rest[:, 1 + i * L : 1 + (i + 1) * L] for i in range(4))
        with np.errstate(divide="ignore", invalid="ignore"):
            per_pair = np.where(n > 1, pairs / (n * (n - 1)), 0.0)[:, None]
        units = block_of(keys, self.sums.num_units)
        values = {
            "pairs": pairs, "same_top1": same, "next_in_topk": nxt, "topk_overlap": ovl, "topk_any_overlap": anyo,
            "same_top1_null": per_pair * (b * (b - 1)).sum(-1),
            "next_in_topk_null": per_pair * ((a * b).sum(-1) - b.sum(-1)),
            "topk_overlap_null": per_pair * ((a * a).sum(-1) - a.sum(-1)) / k,
        }
        for name, v in values.items():
            self.sums.add(name, units, v)
        self.num_docs += len(keys)

    def _merge(self, other: "ConsistencyAccumulator") -> None:
        self._close(*self.docs.merge(other.docs))
        self.sums.merge(other.sums)
        self.num_docs += other.num_docs
        self.prev = other.prev
        for d, row in other.by_domain.items():
            self.by_domain[d] = self.by_domain[d] + row if d in self.by_domain else row

    def _estimate(self, name: str, used: np.ndarray) -> Estimate:
        """Value and exact shuffle expectation, each recomputed with every used document block left out once."""
        s = self.sums.sums
        w = np.concatenate([used[None].astype(np.float64), jackknife_weights(used)])  # all blocks, then leave-one-outs
        with np.errstate(divide="ignore", invalid="ignore"):
            pairs = (w @ s["pairs"])[:, None]
            value, null = (w @ s[name]) / pairs, (w @ s[name + "_null"]) / pairs
        est = jackknife_paired_estimate(value[0], null[0], value[1:], null[1:], NULL_NAME, bounds=(0.0, 1.0))
        why = too_few_documents(used) or ("" if self.resamples else "resampling turned off")
        return no_verdict(est, why) if why else est

    def _domains(self) -> dict:
        """Mixtral's two columns per domain (``[D, L]``), and their chance under uniform routing."""
        L, E, k = self.layout.num_layers, self.layout.num_experts, self.layout.top_k
        D = max([len(self.domain_names)] + [d + 1 for d in self.by_domain])
        rows = np.stack([self.by_domain.get(d, np.zeros(1 + 2 * L)) for d in range(D)]) if D else np.zeros((0, 1 + 2 * L))
        with np.errstate(divide="ignore", invalid="ignore"):
            rates = rows[:, 1:] / rows[:, :1]
        return dict(domain_names=[self.domain_names[d] if d < len(self.domain_names) else str(d) for d in range(D)],
                    domain_pairs=rows[:, 0].astype(np.int64), domain_same_top1=rates[:, :L],
                    domain_any_overlap=rates[:, L:], uniform_same_top1=uniform_same_top1(E),
                    uniform_any_overlap=uniform_any_overlap(E, k))

    def _result(self) -> RoutingConsistency:
        self._close(*self.docs.flush())
        sums = self.sums.sums
        pairs = int(round(sums["pairs"].sum()))
        if pairs == 0:
            raise ValueError("no adjacent token pairs (same document, consecutive positions) in this routing")
        used = sums["pairs"] > 0
        est = {name: self._estimate(name, used) for name in MEASURES}
        return RoutingConsistency(
            list(self.layout.moe_layers), pairs, self.num_docs,
            est["same_top1"].value, est["same_top1"].null, est["next_in_topk"].value, est["next_in_topk"].null,
            est["topk_overlap"].value, est["topk_overlap"].null, est,
            topk_any_overlap=sums["topk_any_overlap"].sum(0) / pairs, **self._domains(),
        )


def routing_consistency(routing: RoutingData | Iterable[RoutingData], resamples: int = 200,
                        seed: int = 0) -> RoutingConsistency:
    """Consecutive-token routing consistency against the within-document shuffle, with intervals over documents."""
    return fold_one(routing, ConsistencyAccumulator(resamples, seed))
