"""Cross-layer correlation of routing features over tokens, computed streaming.

Answers "does the expert a token picks in layer a predict the one it picks in layer b?".
Each token's feature vector is the concatenation over layers of either its router
probabilities or its top-k indicators (``[L*E]``); the Pearson correlation of all feature
pairs is accumulated chunk by chunk (running mean and co-moment, Chan et al.), so memory is
``O((L*E)^2)`` whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from core.analysis_utils import ResultMixin, as_chunks, check_same_layout, require, selection_np
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


class CorrelationAccumulator:
    """Streaming cross-layer correlation, optionally one accumulator per group of tokens."""

    def __init__(self, feature: Feature = "topk", group_by: Literal["dataset", "domain"] | None = None) -> None:
        if feature not in ("probs", "topk"):
            raise ValueError(f"feature must be 'probs' or 'topk', got {feature!r}")
        if group_by not in (None, "dataset", "domain"):
            raise ValueError(f"group_by must be None, 'dataset' or 'domain', got {group_by!r}")
        self.feature, self.group_by = feature, group_by
        self.layout: tuple[list[int], int, int] | None = None
        self.names: list[str] = []
        self.acc: dict[int, StreamingCorrelation] = {}

    def update(self, chunk: RoutingData) -> CorrelationAccumulator:
        if self.layout is None:
            self.layout = (list(chunk.moe_layers), chunk.num_experts, chunk.top_k)
            self.names = list(chunk.dataset_names if self.group_by == "dataset" else chunk.domain_names)
        check_same_layout(chunk, *self.layout)
        x = _features(chunk, self.feature)
        if self.group_by is None:
            self.acc.setdefault(-1, StreamingCorrelation()).update(x)
            return self
        ids_name = "dataset_ids" if self.group_by == "dataset" else "domain_ids"
        require(chunk, ids_name, why=f"correlations per {self.group_by}")
        ids = getattr(chunk, ids_name).numpy()
        for g in np.unique(ids):
            self.acc.setdefault(int(g), StreamingCorrelation()).update(x[ids == g])
        return self

    def _result(self, key: int) -> CrossLayerCorrelation:
        layers, E, _ = self.layout
        sc = self.acc[key]
        corr = sc.correlation()
        mean, mx = _summarize(corr, len(layers), E)
        name = None if key == -1 else (self.names[key] if 0 <= key < len(self.names) else str(key))
        return CrossLayerCorrelation(self.feature, layers, E, sc.n, corr, mean, mx, name)

    def result(self) -> CrossLayerCorrelation | dict[str, CrossLayerCorrelation]:
        """One result, or ``{group name: result}`` when grouping."""
        if self.layout is None:
            raise ValueError("no tokens were given to the correlation analysis")
        if self.group_by is None:
            return self._result(-1)
        return {r.group: r for r in (self._result(k) for k in sorted(self.acc))}


def cross_layer_correlation(
    routing: RoutingData | Iterable[RoutingData], feature: Feature = "topk"
) -> CrossLayerCorrelation:
    """Correlation of routing features across all layers, over all tokens."""
    acc = CorrelationAccumulator(feature)
    for chunk in as_chunks(routing):
        acc.update(chunk)
    return acc.result()


def correlations_by_group(
    routing: RoutingData | Iterable[RoutingData],
    by: Literal["dataset", "domain"] = "dataset",
    feature: Feature = "topk",
) -> dict[str, CrossLayerCorrelation]:
    """One cross-layer correlation per dataset (or domain), in a single streaming pass."""
    acc = CorrelationAccumulator(feature, group_by=by)
    for chunk in as_chunks(routing):
        acc.update(chunk)
    return acc.result()


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


def activation_correlations(routing: RoutingData | Iterable[RoutingData]) -> dict[str, CrossLayerCorrelation]:
    """The seed's ``compute_activation_correlations``: top-k and (when logits exist) probability correlations.

    Returns ``{"topk": CrossLayerCorrelation, "probs": CrossLayerCorrelation}`` ("probs" only
    when the routing carries logits), in one pass over the chunks.
    """
    top = CorrelationAccumulator("topk")
    prob = CorrelationAccumulator("probs")
    has_logits = True
    for chunk in as_chunks(routing):
        top.update(chunk)
        if chunk.router_logits is None:
            has_logits = False
        elif has_logits:
            prob.update(chunk)
    out = {"topk": top.result()}
    if has_logits and prob.layout is not None:
        out["probs"] = prob.result()
    return out
