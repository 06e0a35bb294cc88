"""Co-activation as lift over independence (OLMoE's Fig. 21), against a null that keeps what documents share.

``lift[l, i, j] = P(i and j both in a token's top-k) / (P(i) P(j))`` at MoE layer l: 1 when the
two experts are picked independently. Independence over the pooled tokens is the wrong chance
level: two experts that both like one topic are picked together more often in the documents of
that topic with no link inside a token. The null therefore pairs each token's top-k with the
top-k of a random token of the same document (a within-document shuffle), computed exactly: for a
document of n tokens with counts c_i, the expected joint count is ``c_i c_j / n``. The verdict is
a jackknife over document blocks of lift - null lift, one-sided, Holm-corrected over every pair of
every layer (as :mod:`core.analysis.consistency` does per layer). A top-k of distinct experts
makes the real joint count fall below the shuffled one for unrelated experts (at k of E experts
routed uniformly the lift is (k-1)E / (k(E-1)) < 1), so the test is conservative there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.features import selection_np
from core.analysis.resampling import (DocumentRuns, Estimate, block_of, document_keys, jackknife_paired_estimate,
                                      no_verdict, too_few_documents)
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.routing_data import RoutingData

NULL_NAME = "within-document shuffle"


@dataclass
class CoactivationLift(ResultMixin):
    """Lift over independence per layer and expert pair, its within-document null, and the verdict per pair.

    ``lift`` and ``null_lift`` are ``[L, E, E]`` (diagonal and never-selected experts NaN);
    ``estimates["pair_lift"]`` holds the upper triangle (i < j; NaN elsewhere) with intervals over
    document blocks and Holm's correction over all pairs of all layers.
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    num_tokens: int
    counts: np.ndarray  # [L, E]
    joint: np.ndarray  # [L, E, E]
    lift: np.ndarray  # [L, E, E]
    null_lift: np.ndarray  # [L, E, E]
    estimates: dict[str, Estimate] = field(default_factory=dict)

    @property
    def uniform_lift(self) -> float:
        """The lift of two experts under uniform top-k routing (distinct experts): (k - 1) E / (k (E - 1))."""
        E, k = self.num_experts, self.top_k
        return (k - 1) * E / (k * (E - 1)) if E > 1 else float("nan")

    def top_pairs(self, n: int = 5) -> pd.DataFrame:
        """Each layer's ``n`` pairs (i < j) of highest lift, with interval, null and verdict."""
        est = self.estimates.get("pair_lift")
        rows = []
        iu = np.triu_indices(self.num_experts, k=1)
        for li, layer in enumerate(self.moe_layers):
            v = self.lift[li][iu]
            order = np.argsort(-np.nan_to_num(v, nan=-np.inf), kind="stable")[:n]
            for o in order:
                if not np.isfinite(v[o]):
                    continue
                i, j = int(iu[0][o]), int(iu[1][o])
                row = {"layer": layer, "expert_i": i, "expert_j": j, "lift": float(v[o]),
                       "null_lift": float(self.null_lift[li, i, j]), "both": int(self.joint[li, i, j])}
                if est is not None:
                    e = est.at((li, i, j))
                    row.update(low=float(e.low), high=float(e.high),
                               p_adjusted=float(np.nan if e.p_adjusted is None else e.p_adjusted),
                               beyond_null=bool(e.distinguishable))
                rows.append(row)
        return pd.DataFrame(rows)


class CoactivationLiftAccumulator(RoutingAccumulator):
    """Joint and single counts per document block, and each finished document's shuffle expectation.

    Memory: ``blocks x L x E x E`` joint counts in float32 (exact to 16M tokens a block) and as many shuffle
    expectations in float64; ``blocks`` is 8 to 64, fewer where ``memory_floats`` (4-byte units) would be
    exceeded (16 x 64 experts: 64 blocks, 50 MB; 60 x 256: 8 blocks, 377 MB, and the interval's leave-one-out
    copies besides). ``resamples`` = 0 turns the verdict off.
    """

    name = "the co-activation lift analysis"
    needs = ("topk_idx",)

    def __init__(self, resamples: int = 200, seed: int = 0, memory_floats: int = 16_000_000) -> None:
        super().__init__()
        self.resamples, self.seed, self.memory = resamples, seed, memory_floats

    def _start(self) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        self.blocks = int(min(64, max(8, self.memory // max(1, 3 * L * E * E))))  # joint float32, null float64
        self.n = np.zeros(self.blocks)
        self.counts = np.zeros((self.blocks, L, E))
        self.joint = np.zeros((self.blocks, L, E, E), np.float32)
        self.null = np.zeros((self.blocks, L, E, E))  # sums of fractions: float64, so shares merge to one process's bits
        self.docs = DocumentRuns()

    def _add(self, chunk: RoutingData) -> None:
        m = selection_np(chunk).astype(np.float64)  # [N, L, E]
        keys = document_keys(chunk)
        b = block_of(keys, self.blocks)
        for blk in np.unique(b):
            mb = m[b == blk]
            self.n[blk] += len(mb)
            self.counts[blk] += mb.sum(0)
            self.joint[blk] += np.matmul(mb.transpose(1, 2, 0), mb.transpose(1, 0, 2))
        feats = np.concatenate([np.ones((len(m), 1)), m.reshape(len(m), -1)], 1)
        self._close(*self.docs.add(keys, feats))

    def _close(self, keys: np.ndarray, totals: np.ndarray) -> None:
        """Add finished documents' expected joint counts under a within-document shuffle: c_i c_j / n."""
        if not len(keys):
            return
        L, E = self.layout.num_layers, self.layout.num_experts
        c = totals[:, 1:].reshape(-1, L, E) / np.sqrt(totals[:, :1, None])
        b = block_of(keys, self.blocks)
        for blk in np.unique(b):
            cb = c[b == blk]
            self.null[blk] += np.einsum("dli,dlj->lij", cb, cb)

    def _merge(self, other: "CoactivationLiftAccumulator") -> None:
        self._close(*self.docs.merge(other.docs))
        self.n += other.n
        self.counts += other.counts
        self.joint += other.joint
        self.null += other.null

    @staticmethod
    def _lift(n: np.ndarray, counts: np.ndarray, joint: np.ndarray) -> np.ndarray:
        """``joint n / (c_i c_j)`` with a leading axis of resamples; NaN where an expert was never selected."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = joint * n[:, None, None, None] / (counts[..., :, None] * counts[..., None, :])
        return np.where(np.isfinite(out), out, np.nan)

    def _result(self) -> CoactivationLift:
        self._close(*self.docs.flush())
        E = self.layout.num_experts
        used = self.n > 0
        keep = np.nonzero(used)[0]
        tot = lambda a: a.sum(0, dtype=np.float64)  # noqa: E731
        n = np.r_[tot(self.n), tot(self.n) - self.n[keep]]  # all blocks, then each used block left out
        counts = np.concatenate([tot(self.counts)[None], tot(self.counts)[None] - self.counts[keep]])
        lift = self._lift(n, counts, np.concatenate([tot(self.joint)[None], tot(self.joint)[None] - self.joint[keep]]))
        null = self._lift(n, counts, np.concatenate([tot(self.null)[None], tot(self.null)[None] - self.null[keep]]))
        upper = np.triu(np.ones((E, E), bool), 1)[None]
        pick = lambda a: np.where(upper, a, np.nan)  # noqa: E731
        est = jackknife_paired_estimate(pick(lift[0]), pick(null[0]), pick(lift[1:]), pick(null[1:]), NULL_NAME,
                                        bounds=(0.0, np.inf))
        why = too_few_documents(used) or ("" if self.resamples else "resampling turned off")
        diag = np.eye(E, dtype=bool)[None]
        return CoactivationLift(list(self.layout.moe_layers), E, self.layout.top_k, int(tot(self.n)), tot(self.counts),
                                tot(self.joint), np.where(diag, np.nan, lift[0]), np.where(diag, np.nan, null[0]),
                                {"pair_lift": no_verdict(est, why) if why else est})


def coactivation_lift(routing: RoutingData | Iterable[RoutingData], resamples: int = 200) -> CoactivationLift:
    """Lift over independence of every expert pair per layer, against the within-document shuffle."""
    return fold_one(routing, CoactivationLiftAccumulator(resamples))
