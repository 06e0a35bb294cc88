"""Vocabulary specialization: does a given token id keep going to the same expert?

The vocabulary is large (50k for OLMoE), so counts are kept sparse (token id x (layer, expert)).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one, selection_np
from core.routing_data import RoutingData


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


class VocabularyAccumulator(RoutingAccumulator):
    """Streaming sparse counts of (token id, layer x expert) selections and token-id occurrences."""

    name = "the vocabulary specialization"
    needs = ("topk_idx", "token_ids")

    def __init__(self, min_count: int = 20) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        super().__init__()
        self.min_count = min_count
        self.acc: sp.csr_matrix | None = None
        self.occ = np.zeros(0)

    def _add(self, chunk: RoutingData) -> None:
        tok = chunk.token_ids.numpy().astype(np.int64)
        m = selection_np(chunk).reshape(chunk.num_tokens, -1)
        V = int(tok.max()) + 1
        rows, cols = np.nonzero(m)
        part = sp.csr_matrix((m[rows, cols], (tok[rows], cols)), shape=(V, m.shape[1]))
        if self.acc is None:
            self.acc = part
        else:
            V = max(V, self.acc.shape[0])
            self.acc.resize((V, m.shape[1]))
            part.resize((V, m.shape[1]))
            self.acc = self.acc + part
        if self.occ.shape[0] < V:
            self.occ = np.concatenate([self.occ, np.zeros(V - self.occ.shape[0])])
        self.occ += np.bincount(tok, minlength=V)[: self.occ.shape[0]]

    def _result(self) -> VocabularySpecialization:
        layers, E, k = list(self.layout.moe_layers), self.layout.num_experts, self.layout.top_k
        keep = np.nonzero(self.occ >= self.min_count)[0]
        dense = self.acc[keep].toarray().reshape(len(keep), len(layers), E)
        pref = dense.argmax(-1)
        conc = dense.max(-1) / np.clip(self.occ[keep][:, None], 1, None)
        mean_conc = conc.mean(0) if len(keep) else np.full(len(layers), np.nan)
        return VocabularySpecialization(layers, E, k, self.min_count, keep, self.occ[keep], pref, conc, mean_conc, k / E)


def vocabulary_specialization(
    routing: RoutingData | Iterable[RoutingData], min_count: int = 20
) -> VocabularySpecialization:
    """Which token ids are routed consistently to one expert (sparse accumulation over the vocabulary)."""
    return fold_one(routing, VocabularyAccumulator(min_count))
