"""Which experts fire together: within a layer (co-selection) and across layers (routing paths).

Within a layer: ``P(j selected | i selected)``, the structure that tells whether the top-k
experts act as fixed teams. Across layers: each token's path of top-1 experts, how diverse
the paths are (entropy), the most common ones, and layer-to-layer transition matrices
(what a Sankey diagram draws). Streaming; paths are counted in a dictionary whose size is
the number of distinct paths seen (bounded by the token count; restrict ``layers`` to keep
it small on deep models).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.analysis.measures import entropy
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.analysis.features import selection_np, top1_np
from core.routing_data import RoutingData


@dataclass
class Coactivation(ResultMixin):
    """Co-selection within each layer and top-1 transitions between consecutive layers.

    ``conditional[l, i, j] = P(j selected | i selected)`` at MoE layer position l (diagonal 1,
    NaN for never-selected i). ``lift = conditional / P(j selected)`` (1 = independent).
    ``transition_probs[l, i, j] = P(top-1 = j at layer l+1 | top-1 = i at layer l)``.
    """

    moe_layers: list[int]
    num_experts: int
    num_tokens: int
    counts: np.ndarray  # [L, E] tokens that selected each expert
    joint: np.ndarray  # [L, E, E] tokens that selected both i and j
    conditional: np.ndarray  # [L, E, E]
    lift: np.ndarray  # [L, E, E]
    transitions: np.ndarray  # [L-1, E, E] top-1 counts
    transition_probs: np.ndarray  # [L-1, E, E] rows sum to 1 (NaN for unused i)


class CoactivationAccumulator(RoutingAccumulator):
    """Streaming co-selection counts; ``update(chunk)`` then ``result()``."""

    name = "the co-activation analysis"
    needs = ("topk_idx",)

    def _start(self) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        self.joint = np.zeros((L, E, E))
        self.trans = np.zeros((max(L - 1, 0), E, E))

    def _add(self, chunk: RoutingData) -> None:
        m = selection_np(chunk)
        self.joint += np.matmul(m.transpose(1, 2, 0), m.transpose(1, 0, 2))  # [L, E, E]
        t1 = top1_np(chunk)
        E = self.layout.num_experts
        for li in range(t1.shape[1] - 1):
            a, b = t1[:, li], t1[:, li + 1]
            ok = (a >= 0) & (b >= 0)
            self.trans[li] += np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E)

    def _merge(self, other: "CoactivationAccumulator") -> None:
        self.joint += other.joint
        self.trans += other.trans

    def _result(self) -> Coactivation:
        counts = np.diagonal(self.joint, axis1=1, axis2=2).copy()
        with np.errstate(divide="ignore", invalid="ignore"):
            cond = self.joint / counts[:, :, None]
            lift = cond / (counts / self.num_tokens)[:, None, :]
            tp = self.trans / self.trans.sum(-1, keepdims=True)
        return Coactivation(list(self.layout.moe_layers), self.layout.num_experts, self.num_tokens, counts,
                            self.joint.copy(), cond, lift, self.trans.copy(), tp)


def coactivation(routing: RoutingData | Iterable[RoutingData]) -> Coactivation:
    """Within-layer co-selection and cross-layer top-1 transitions."""
    return fold_one(routing, CoactivationAccumulator())


@dataclass
class RoutingPaths(ResultMixin):
    """Distribution of top-1 routing paths through the chosen MoE layers.

    ``entropy`` is in nats; ``entropy_norm`` divides it by ``log(min(E**L, num_tokens))``, the
    largest entropy the sample could show (all paths distinct, or all possible paths equally
    often), so 1 means as diverse as possible and 0 means every token takes one path.
    ``exact`` is False when more than ``max_paths`` distinct paths were seen: the rarest were then
    dropped as the counts streamed (``pruned_tokens`` tokens), each counted as a path of its own,
    so ``entropy`` is an upper bound and ``num_unique`` approximate; the top paths stay counted.
    """

    layers: list[int]  # model layer indices of the path's steps
    num_experts: int
    num_tokens: int
    num_unique: int
    entropy: float
    entropy_norm: float
    top_paths: list[tuple[int, ...]]
    top_counts: list[int]
    top_shares: list[float]
    exact: bool = True
    pruned_tokens: int = 0

    def table(self) -> pd.DataFrame:
        """The most common paths as a table: path, count, share."""
        return pd.DataFrame(
            {"path": [list(p) for p in self.top_paths], "count": self.top_counts, "share": self.top_shares}
        )


class RoutingPathsAccumulator(RoutingAccumulator):
    """Streaming count of top-1 paths over ``layers`` (positions into ``moe_layers``; default all).

    At OLMoE's 16 layers x 64 experts nearly every token takes a path of its own, so an exact
    count grows with the tokens; past ``max_paths`` distinct paths the counter keeps the
    ``max_paths`` most frequent and drops the rest (see :class:`RoutingPaths`). Memory: at most
    ``2 x max_paths`` paths (about 60 MB at 16 layers with the default).
    """

    name = "the routing-path analysis"
    needs = ("topk_idx",)

    def __init__(self, layers: Sequence[int] | None = None, top_n: int = 20, max_paths: int = 100_000) -> None:
        super().__init__()
        if max_paths < top_n:
            raise ValueError(f"max_paths ({max_paths}) must be at least top_n ({top_n})")
        self.layers, self.top_n, self.max_paths = layers, top_n, max_paths
        self.counter: Counter = Counter()
        self.pruned_tokens = self.pruned_paths = 0

    def _start(self) -> None:
        L = self.layout.num_layers
        self.sel = list(range(L)) if self.layers is None else list(self.layers)
        bad = [i for i in self.sel if not 0 <= i < L]
        if bad or not self.sel:
            raise ValueError(f"layers must be non-empty positions in 0..{L - 1}, got {self.sel}")

    def _add(self, chunk: RoutingData) -> None:
        uniq, cnt = np.unique(top1_np(chunk)[:, self.sel], axis=0, return_counts=True)
        for row, c in zip(uniq.tolist(), cnt.tolist()):
            self.counter[tuple(row)] += c
        self._prune()

    def _merge(self, other: "RoutingPathsAccumulator") -> None:
        """Counts added; exact while neither share pruned (``exact`` in the result says so)."""
        self.counter.update(other.counter)
        self.pruned_tokens += other.pruned_tokens
        self.pruned_paths += other.pruned_paths
        self._prune()

    def _most_common(self, n: int) -> list[tuple[tuple[int, ...], int]]:
        """The ``n`` most frequent paths, ties broken by the path itself: the same whatever the chunks or their order."""
        return sorted(self.counter.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def _prune(self) -> None:
        if len(self.counter) > 2 * self.max_paths:
            kept = dict(self._most_common(self.max_paths))
            self.pruned_tokens += sum(self.counter.values()) - sum(kept.values())
            self.pruned_paths += len(self.counter) - len(kept)
            self.counter = Counter(kept)

    def _result(self) -> RoutingPaths:
        E, n = self.layout.num_experts, self.num_tokens
        p = np.array(list(self.counter.values()) + [1] * self.pruned_tokens, dtype=np.float64) / n
        ent = float(entropy(p))
        max_ent = min(len(self.sel) * np.log(E), np.log(n)) if E > 1 else 0.0
        top = self._most_common(self.top_n)
        return RoutingPaths(
            layers=[self.layout.moe_layers[i] for i in self.sel],
            num_experts=E,
            num_tokens=n,
            num_unique=len(self.counter) + self.pruned_paths,
            entropy=ent,
            entropy_norm=ent / max_ent if max_ent > 0 else 0.0,
            top_paths=[k for k, _ in top],
            top_counts=[v for _, v in top],
            top_shares=[v / n for _, v in top],
            exact=self.pruned_tokens == 0,
            pruned_tokens=self.pruned_tokens,
        )


def routing_paths(
    routing: RoutingData | Iterable[RoutingData], layers: Sequence[int] | None = None, top_n: int = 20
) -> RoutingPaths:
    """Count each token's sequence of top-1 experts over ``layers`` (positions into ``moe_layers``; default all)."""
    return fold_one(routing, RoutingPathsAccumulator(layers, top_n))
