"""Vocabulary specialization: does a given token id keep going to the same expert?

The statistic (a token id's most-used expert share, averaged over token ids) is a maximum over
experts, so it sits well above k/E even under random routing when a token id is seen a few dozen
times. Its null is therefore the same statistic on shuffled data: token ids permuted among the
tokens of each chunk and domain (occurrence counts unchanged, any link between a token id and
its experts broken). Intervals leave one document block out at a time (jackknife): a bootstrap
would count documents twice, which makes every token id look more concentrated. The vocabulary is large
(50k for OLMoE), so counts are kept sparse (token id x (layer, expert)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from core.analysis.resampling import (Estimate, block_of, document_keys, jackknife_interval, jackknife_weights,
                                      permutation_estimate, permute_within)
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one, selection_np
from core.routing_data import RoutingData

NULL_NAME = "token ids shuffled within domain"
BLOCKS = 16  # document blocks for the interval (the counts are kept once per block)


@dataclass
class VocabularySpecialization(ResultMixin):
    """Per-token-id expert preference for token ids seen at least ``min_count`` times.

    ``concentration[t, l]`` = fraction of token t's occurrences that selected its most frequent
    expert at MoE layer position l. ``mean_concentration[l]`` averages over the kept token ids;
    ``null_concentration[l]`` is the same mean with token ids shuffled (``permutations`` times),
    and ``estimate`` holds the interval over documents, the null range and the p-value.
    ``floor`` = k/E is what the statistic would approach with infinitely many occurrences per id.
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
    null_concentration: np.ndarray  # [L]
    floor: float
    permutations: int
    estimate: Estimate | None


def _counts(rows: np.ndarray, sel: tuple[np.ndarray, np.ndarray, np.ndarray], shape: tuple[int, int]) -> sp.csr_matrix:
    """Sparse (row, layer x expert) counts of the selections ``sel`` = (token index, column, weight)."""
    r, c, v = sel
    return sp.csr_matrix((v, (rows[r], c)), shape=shape)


def _grow(acc: sp.csr_matrix | None, part: sp.csr_matrix) -> sp.csr_matrix:
    if acc is None:
        return part
    rows = max(acc.shape[0], part.shape[0])
    acc.resize((rows, part.shape[1]))
    part.resize((rows, part.shape[1]))
    return acc + part


class VocabularyAccumulator(RoutingAccumulator):
    """Sparse (token id x block, layer x expert) counts, and the same counts under ``permutations`` shuffles."""

    name = "the vocabulary specialization"
    needs = ("topk_idx", "token_ids")

    def __init__(self, min_count: int = 20, permutations: int = 20, seed: int = 0) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        super().__init__()
        self.min_count, self.permutations, self.seed = min_count, permutations, seed
        self.acc: sp.csr_matrix | None = None  # rows token_id * BLOCKS + block
        self.null: list[sp.csr_matrix | None] = [None] * permutations
        self.occ = np.zeros((0, BLOCKS))  # occurrences per (token id, block)
        self.chunks = 0

    def _add(self, chunk: RoutingData) -> None:
        tok = chunk.token_ids.numpy().astype(np.int64)
        m = selection_np(chunk).reshape(chunk.num_tokens, -1)
        V = int(tok.max()) + 1
        blocks = block_of(document_keys(chunk), BLOCKS)
        r, c = np.nonzero(m)
        sel = (r, c, m[r, c])
        self.acc = _grow(self.acc, _counts(tok * BLOCKS + blocks, sel, (V * BLOCKS, m.shape[1])))
        if self.occ.shape[0] < V:
            self.occ = np.concatenate([self.occ, np.zeros((V - self.occ.shape[0], BLOCKS))])
        np.add.at(self.occ, (tok, blocks), 1)
        groups = chunk.domain_ids.numpy() if chunk.domain_ids is not None else np.zeros(len(tok), np.int64)
        for p in range(self.permutations):
            rng = np.random.default_rng([self.seed, p, self.chunks])
            shuffled = tok[permute_within(groups, rng)]
            self.null[p] = _grow(self.null[p], _counts(shuffled, sel, (V, m.shape[1])))
        self.chunks += 1

    def _result(self) -> VocabularySpecialization:
        layers, E, k = list(self.layout.moe_layers), self.layout.num_experts, self.layout.top_k
        L, V = len(layers), self.occ.shape[0]
        coo = self.acc.tocoo()
        totals = sp.csr_matrix((coo.data, (coo.row // BLOCKS, coo.col)), shape=(V, L * E))
        occ_all = self.occ.sum(1)
        keep = np.nonzero(occ_all >= self.min_count)[0]
        occ = occ_all[keep]
        dense = totals[keep].toarray().reshape(len(keep), L, E)
        pref, conc = dense.argmax(-1), dense.max(-1) / np.clip(occ[:, None], 1, None)
        if not len(keep):
            nan = np.full(L, np.nan)
            return VocabularySpecialization(layers, E, k, self.min_count, keep, occ, pref, conc, nan, nan, k / E,
                                            self.permutations, None)
        est, null_mean = None, np.full(L, np.nan)
        if self.permutations:
            null = np.stack([self._null_mean(p, keep, occ) for p in range(self.permutations)])
            value, loo = self._replicates(keep)
            est = permutation_estimate(value, jackknife_interval(value, loo), null, NULL_NAME, len(loo))
            null_mean = null.mean(0)
        return VocabularySpecialization(layers, E, k, self.min_count, keep, occ, pref, conc, conc.mean(0), null_mean,
                                        k / E, self.permutations, est)

    def _null_mean(self, p: int, keep: np.ndarray, occ: np.ndarray) -> np.ndarray:
        L, E = self.layout.num_layers, self.layout.num_experts
        c = self.null[p]
        c.resize((self.occ.shape[0], c.shape[1]))
        dense = c[keep].toarray().reshape(len(keep), L, E)
        return (dense.max(-1) / occ[:, None]).mean(0)

    def _replicates(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean concentration on all document blocks and with each block left out once, over the kept token ids."""
        L, E = self.layout.num_layers, self.layout.num_experts
        self.acc.resize((self.occ.shape[0] * BLOCKS, L * E))
        used = self.occ.sum(0) > 0
        w = np.concatenate([used[None].astype(float), jackknife_weights(used)])  # [1 + B_used, B]
        num, den = np.zeros((len(w), L)), np.zeros(len(w))
        step = max(1, 4_000_000 // (BLOCKS * L * E + len(w) * L * E))
        for s in range(0, len(keep), step):
            ids = keep[s : s + step]
            part = self.acc[(ids[:, None] * BLOCKS + np.arange(BLOCKS)).ravel()].toarray().reshape(len(ids), BLOCKS, L, E)
            occ = w @ self.occ[ids].T  # [R+1, T]
            sel = np.einsum("rb,tble->rtle", w, part, optimize=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                conc = sel.max(-1) / occ[..., None]  # [R+1, T, L]
            ok = occ > 0  # a resample may draw none of an id's blocks: that id sits out of that draw
            num += np.where(ok[..., None], conc, 0).sum(1)
            den += ok.sum(1)
        mean = num / np.clip(den, 1, None)[:, None]
        return mean[0], mean[1:]


def vocabulary_specialization(routing: RoutingData | Iterable[RoutingData], min_count: int = 20,
                              permutations: int = 20) -> VocabularySpecialization:
    """Which token ids are routed consistently to one expert, against the same statistic with token ids shuffled."""
    return fold_one(routing, VocabularyAccumulator(min_count, permutations))
