"""Cross-layer correlation of routing features over tokens, computed streaming.

Answers "does the expert a token picks in layer a predict the one it picks in layer b?".
Each token's feature vector is the concatenation over layers of either its router
probabilities or its top-k indicators (``[L*E]``); the Pearson correlation of all feature
pairs is accumulated chunk by chunk (running mean and co-moment, Chan et al.), so memory is
``O((L*E)^2)`` whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from core.analysis.results import ResultMixin
from core.analysis.streaming import (
    GroupBy,
    GroupedResults,
    PerGroup,
    RoutingAccumulator,
    WhenRecorded,
    as_chunks,
    fold,
    fold_one,
    require,
    selection_np,
)
from core.routing_data import RoutingData

Feature = Literal["probs", "topk"]


class StreamingCorrelation:
    """Pearson correlation of feature columns, merged batch by batch in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.comoment: np.ndarray | None = None

    def update(self, x: np.ndarray) -> StreamingCorrelation:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [tokens, features], got shape {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(0)
        xc = x - mb
        cb = xc.T @ xc
        if self.mean is None:
            self.n, self.mean, self.comoment = nb, mb, cb
            return self
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature count changed from {self.mean.shape[0]} to {x.shape[1]}")
        n = self.n + nb
        delta = mb - self.mean
        self.comoment += cb + np.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n
        return self

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("correlation needs at least two tokens")
        return self.comoment / (self.n - 1)

    def correlation(self) -> np.ndarray:
        """Correlation matrix; NaN on rows/columns of constant features (zero variance)."""
        cov = self.covariance()
        sd = np.sqrt(np.clip(np.diag(cov), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = cov / np.outer(sd, sd)
        corr[:, sd == 0] = np.nan
        corr[sd == 0, :] = np.nan
        return np.clip(corr, -1.0, 1.0)


def _features(rd: RoutingData, feature: Feature) -> np.ndarray:
    if feature == "probs":
        require(rd, "router_logits", why="probability correlations")
        x = rd.probs().double().numpy()
    elif feature == "topk":
        x = selection_np(rd)
    else:
        raise ValueError(f"feature must be 'probs' or 'topk', got {feature!r}")
    return x.reshape(x.shape[0], -1)


@dataclass
class CrossLayerCorrelation(ResultMixin):
    """Correlation of routing features over tokens.

    ``corr[a*E + i, b*E + j]`` is the correlation between expert i of MoE layer a and expert j
    of layer b (NaN where a feature never varies). ``layer_mean_abs[a, b]`` is the mean |corr|
    over expert pairs (diagonal: excluding each feature with itself); ``layer_max_abs`` the max.
    """

    feature: str
    moe_layers: list[int]
    num_experts: int
    num_tokens: int
    corr: np.ndarray  # [L*E, L*E]
    layer_mean_abs: np.ndarray  # [L, L]
    layer_max_abs: np.ndarray  # [L, L]
    group: str | None = None

    def pair(self, layer_a: int, expert_a: int, layer_b: int, expert_b: int) -> float:
        """Correlation of two (MoE layer position, expert) features."""
        E = self.num_experts
        return float(self.corr[layer_a * E + expert_a, layer_b * E + expert_b])

    def block(self, layer_a: int, layer_b: int) -> np.ndarray:
        """``[E, E]`` block between MoE layer positions a and b."""
        E = self.num_experts
        return self.corr[layer_a * E : (layer_a + 1) * E, layer_b * E : (layer_b + 1) * E]

    def top_pairs(self, n: int = 20, cross_layer_only: bool = True) -> pd.DataFrame:
        """The ``n`` strongest feature pairs by |corr| (each unordered pair once)."""
        E = self.num_experts
        c = np.nan_to_num(self.corr, nan=0.0)
        iu, ju = np.triu_indices(c.shape[0], k=1)
        la, lb = iu // E, ju // E
        keep = la != lb if cross_layer_only else np.ones_like(la, dtype=bool)
        iu, ju, vals = iu[keep], ju[keep], c[iu[keep], ju[keep]]
        order = np.argsort(-np.abs(vals))[:n]
        return pd.DataFrame(
            {
                "layer_a": np.asarray(self.moe_layers)[iu[order] // E],
                "expert_a": iu[order] % E,
                "layer_b": np.asarray(self.moe_layers)[ju[order] // E],
                "expert_b": ju[order] % E,
                "corr": vals[order],
            }
        )


def _summarize(corr: np.ndarray, L: int, E: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(np.nan_to_num(corr, nan=0.0)).reshape(L, E, L, E).transpose(0, 2, 1, 3).copy()
    mean = np.zeros((L, L))
    mx = np.zeros((L, L))
    off = ~np.eye(E, dtype=bool)
    for i in range(L):
        for j in range(L):
            blk = a[i, j]
            vals = blk[off] if i == j else blk.ravel()
            mean[i, j] = vals.mean() if vals.size else 0.0
            mx[i, j] = vals.max() if vals.size else 0.0
    return mean, mx


class CorrelationAccumulator(RoutingAccumulator):
    """Streaming cross-layer correlation of one feature ("topk" indicators or "probs")."""

    def __init__(self, feature: Feature = "topk") -> None:
        if feature not in ("probs", "topk"):
            raise ValueError(f"feature must be 'probs' or 'topk', got {feature!r}")
        super().__init__()
        self.feature = feature
        self.name = f"the {feature} correlation analysis"
        self.needs = ("router_logits",) if feature == "probs" else ("topk_idx",)
        self.acc = StreamingCorrelation()

    def _add(self, chunk: RoutingData) -> None:
        self.acc.update(_features(chunk, self.feature))

    def _result(self) -> CrossLayerCorrelation:
        layers, E = list(self.layout.moe_layers), self.layout.num_experts
        corr = self.acc.correlation()
        mean, mx = _summarize(corr, len(layers), E)
        return CrossLayerCorrelation(self.feature, layers, E, self.acc.n, corr, mean, mx, None)


def cross_layer_correlation(
    routing: RoutingData | Iterable[RoutingData], feature: Feature = "topk"
) -> CrossLayerCorrelation:
    """Correlation of routing features across all layers, over all tokens."""
    return fold_one(routing, CorrelationAccumulator(feature))


def correlations_by_group(
    routing: RoutingData | Iterable[RoutingData], by: GroupBy = "dataset", feature: Feature = "topk"
) -> GroupedResults:
    """One cross-layer correlation per dataset (or domain), in a single streaming pass."""
    return fold_one(routing, PerGroup(lambda: CorrelationAccumulator(feature), by=by))


@dataclass
class CorrelationDifference(ResultMixin):
    """``a - b`` of two groups' correlations (NaN-safe: NaN treated as 0)."""

    group_a: str | None
    group_b: str | None
    feature: str
    moe_layers: list[int]
    num_experts: int
    diff: np.ndarray  # [L*E, L*E]
    layer_mean_abs_diff: np.ndarray  # [L, L] mean |diff| per layer pair
    layer_summary_diff: np.ndarray  # [L, L] a.layer_mean_abs - b.layer_mean_abs


def correlation_difference(a: CrossLayerCorrelation, b: CrossLayerCorrelation) -> CorrelationDifference:
    """Where two datasets' routing correlations differ."""
    if (a.moe_layers, a.num_experts, a.feature) != (b.moe_layers, b.num_experts, b.feature):
        raise ValueError("can only compare correlations of the same layers, experts and feature")
    diff = np.nan_to_num(a.corr, nan=0.0) - np.nan_to_num(b.corr, nan=0.0)
    L, E = len(a.moe_layers), a.num_experts
    mean_abs = np.abs(diff).reshape(L, E, L, E).mean(axis=(1, 3))
    return CorrelationDifference(
        a.group, b.group, a.feature, a.moe_layers, E, diff, mean_abs, a.layer_mean_abs - b.layer_mean_abs
    )


@dataclass
class ActivationCorrelations(ResultMixin):
    """The seed's ``compute_activation_correlations``: top-k correlations, and probability ones when logits exist."""

    topk: CrossLayerCorrelation
    probs: CrossLayerCorrelation | None = None

    def __getitem__(self, key: str) -> CrossLayerCorrelation:
        value = getattr(self, key) if key in ("topk", "probs") else None
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return key in ("topk", "probs") and getattr(self, str(key)) is not None

    def keys(self) -> list[str]:
        """The features present, as the seed's dict had them."""
        return [k for k in ("topk", "probs") if getattr(self, k) is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def items(self) -> list[tuple[str, CrossLayerCorrelation]]:
        return [(k, self[k]) for k in self.keys()]

    def values(self) -> list[CrossLayerCorrelation]:
        return [self[k] for k in self.keys()]


def activation_correlations(routing: RoutingData | Iterable[RoutingData]) -> ActivationCorrelations:
    """Top-k and (when every chunk has logits) probability correlations, in one pass over the chunks."""
    out = fold(as_chunks(routing), {"topk": CorrelationAccumulator("topk"),
                                     "probs": WhenRecorded(CorrelationAccumulator("probs"), "router_logits")})
    return ActivationCorrelations(out["topk"], out["probs"])
