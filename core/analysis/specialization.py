"""Domain specialization: does a domain send more of its tokens to an expert than the uniform k/E share?

(By token id: ``core.analysis.vocabulary``; along the sequence: ``core.analysis.consistency``.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.resampling import (BlockSums, Estimate, block_of, document_keys, jackknife_interval,
                                      jackknife_weights, no_verdict, permutation_estimate, too_few_documents)
from core.analysis.shuffles import permute_labels
from core.analysis.results import ResultMixin
from core.analysis.streaming import GroupBy, RoutingAccumulator, fold_one, group_ids
from core.analysis.features import selection_np
from core.routing_data import RoutingData


@dataclass
class DomainSpecialization(ResultMixin):
    """Share of each domain's tokens routed to each expert, against the uniform k/E baseline.

    ``share[l, d, e]`` = fraction of domain d's tokens that selected expert e at MoE layer
    position l (sums to k over experts). ``ratio = share / (k/E)`` (1 = no preference).
    ``score[l, e] = max_d ratio`` (how strongly the expert prefers its favourite domain).
    ``kl[l, d]`` (nats) = KL(domain d's utilization || all tokens' utilization).
    ``estimates``: ``layer_score`` and each group's top ``max_ratio`` with intervals over documents
    and their null, the same statistic with group labels shuffled between document blocks (a
    max over experts is far above 1 by chance alone).
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
    estimates: dict[str, Estimate] = field(default_factory=dict)  # "layer_score" [L], "max_ratio" [D]

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


def _spec_stats(counts: np.ndarray, tokens: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Shares, ratios and divergences from counts ``[..., D, L, E]`` and tokens ``[..., D]`` (leading batch axes allowed)."""
    E = counts.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = counts / tokens[..., :, None, None]
    return {"share": share, "ratio": share / (k / E), **_scores(counts, tokens, k)}


def _scores(counts: np.ndarray, tokens: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Each group's divergence per layer ``kl``, ``layer_score`` and ``max_ratio``: all the nulls and intervals use,
    without the shares and ratios of every expert (``[..., D, L, E]`` each, most of a draw's cost)."""
    E = counts.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        overall = counts.sum(-3, keepdims=True)
        overall = overall / overall.sum(-1, keepdims=True)
        du = counts / np.clip(counts.sum(-1, keepdims=True), 1e-300, None)
        kl = np.where(du > 0, du * np.log(du / overall), 0.0).sum(-1)  # [..., D, L]
        w = tokens / tokens.sum(-1, keepdims=True)
        top = (counts.max(axis=(-2, -1)) / tokens) / (k / E)  # the largest share over k/E: the top ratio
    present = tokens > 0
    return {"kl": np.where(present[..., None], kl, np.nan), "max_ratio": np.where(present, top, np.nan),
            "layer_score": (np.where(present[..., None], kl, 0.0) * w[..., None]).sum(-2)}


class DomainSpecializationAccumulator(RoutingAccumulator):
    """Domain (or dataset) x expert assignment counts per document block; tokens with no label (id < 0) are left out.

    Nulls: the same statistics with the group labels shuffled between (group, document block)
    cells (``permutations`` times); intervals: a jackknife over cells (a maximum and a divergence
    grow with noise, so a bootstrap that repeats documents would shift them up).
    """

    needs = ("topk_idx",)

    def __init__(self, by: GroupBy = "domain", permutations: int = 200, resamples: int = 200, seed: int = 0) -> None:
        if by not in ("domain", "dataset"):
            raise ValueError(f"by must be 'domain' or 'dataset', got {by!r}")
        super().__init__()
        self.by, self.permutations, self.resamples, self.seed = by, permutations, resamples, seed
        self.name = f"the {by} specialization"
        self.cells: dict[int, BlockSums] = {}
        self.unlabelled = 0

    def _add(self, chunk: RoutingData) -> None:
        ids = group_ids(chunk, self.by)
        m = selection_np(chunk)
        blocks = block_of(document_keys(chunk))
        self.unlabelled += int((ids < 0).sum())
        for g in np.unique(ids[ids >= 0]):
            sel = ids == g
            cells = self.cells.setdefault(int(g), BlockSums())
            cells.add("counts", blocks[sel], m[sel])
            cells.add("tokens", blocks[sel], np.ones(int(sel.sum())))

    def _merge(self, other: "DomainSpecializationAccumulator") -> None:
        self.unlabelled += other.unlabelled
        for g, cells in other.cells.items():
            self.cells[g] = self.cells[g].merge(cells) if g in self.cells else cells

    def _cell_table(self, D: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Non-empty (group, block) cells: their group label, counts ``[C, L, E]`` and tokens ``[C]``."""
        labels, counts, tokens = [], [], []
        for g in range(D):
            if g not in self.cells:
                continue
            used = self.cells[g]["tokens"] > 0
            labels.append(np.full(int(used.sum()), g))
            counts.append(self.cells[g]["counts"][used])
            tokens.append(self.cells[g]["tokens"][used])
        return np.concatenate(labels), np.concatenate(counts), np.concatenate(tokens)

    def _result(self) -> DomainSpecialization:
        if not self.cells:
            raise ValueError(f"no {self.by}-labelled tokens were given to the {self.by} specialization")
        layers, E, k = list(self.layout.moe_layers), self.layout.num_experts, self.layout.top_k
        table = self.domain_names if self.by == "domain" else self.dataset_names
        D = max(max(self.cells) + 1, len(table))
        names = [table[d] if d < len(table) else str(d) for d in range(D)]
        labels, cell_counts, cell_tokens = self._cell_table(D)
        onehot = np.eye(D)[labels]  # [C, D]
        counts = np.einsum("cd,cle->dle", onehot, cell_counts)
        tokens = onehot.T @ cell_tokens
        obs = _spec_stats(counts, tokens, k)
        present = tokens > 0
        pref = np.argmax(np.where(present[None, :, None], obs["ratio"].transpose(1, 0, 2), -np.inf), axis=1)
        score = np.nanmax(np.where(present[None, :, None], obs["ratio"].transpose(1, 0, 2), np.nan), axis=1)
        ok = present.sum() > 1 and self.permutations > 0 and self.resamples > 0
        est = self._estimates(labels, cell_counts, cell_tokens, D, k) if ok else {}
        return DomainSpecialization(
            layers, E, k, self.by, names, tokens, counts.transpose(1, 0, 2), obs["share"].transpose(1, 0, 2), k / E,
            obs["ratio"].transpose(1, 0, 2), score, pref, obs["kl"].T, obs["layer_score"], est,
        )

    def _estimates(self, labels, cell_counts, cell_tokens, D: int, k: int) -> dict[str, Estimate]:
        """Label-shuffle nulls and jackknife intervals (over cells) of the layer divergence and each group's top ratio."""
        rng = np.random.default_rng(self.seed)

        def stats(lab_weights: np.ndarray) -> dict[str, np.ndarray]:  # [R, C, D] cell weights per group
            parts = [_scores(np.einsum("rcd,cle->rdle", w, cell_counts, optimize=True),
                             np.einsum("rcd,c->rd", w, cell_tokens), k) for w in np.array_split(lab_weights, chunks(lab_weights))]
            return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

        def chunks(lab_weights: np.ndarray) -> int:  # about 2M counts a chunk: its passes stay in the processor's cache
            return max(1, int(np.ceil(lab_weights.shape[0] * D * cell_counts[0].size / 2_000_000)))

        onehot = np.eye(D)[labels]
        draws = max(self.permutations, int(np.ceil(20 * max(D, cell_counts.shape[1]))))  # a corrected permutation p
        null = stats(np.stack([np.eye(D)[permute_labels(labels, rng)] for _ in range(draws)]))
        w = jackknife_weights(np.ones(len(labels), bool))  # each (group, block) cell left out once
        obs, loo = stats(onehot[None]), stats(w[:, :, None] * onehot[None])
        out = {}
        alone = np.bincount(labels, minlength=D) < 2  # a group in one cell: nothing to leave out (it read as zero width)
        for name in ("layer_score", "max_ratio"):
            ci = jackknife_interval(obs[name][0], loo[name], bounds=(0.0, np.inf))  # a divergence and a ratio: never below 0
            if name == "max_ratio" and alone.any():
                ci = tuple(np.where(alone, np.nan, bound) for bound in ci)
            out[name] = permutation_estimate(obs[name][0], ci, null[name], f"{self.by} labels shuffled", len(w))
        blocks = np.unique(np.concatenate([np.nonzero(c["tokens"] > 0)[0] for c in self.cells.values()]))
        why = too_few_documents(np.ones(len(blocks), bool))
        return {k: no_verdict(e, why) for k, e in out.items()} if why else out


def domain_specialization(
    routing: RoutingData | Iterable[RoutingData], by: GroupBy = "domain"
) -> DomainSpecialization:
    """Domain (or dataset) x expert share table per layer, with its k/E baseline."""
    return fold_one(routing, DomainSpecializationAccumulator(by))
