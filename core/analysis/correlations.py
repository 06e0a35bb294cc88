"""Cross-layer correlation of routing features over tokens, computed streaming.

Answers "does the expert a token picks in layer a predict the one it picks in layer b?".
Each token's feature vector is the concatenation over layers of either its router
probabilities or its top-k indicators (``[L*E]``); the Pearson correlation of all feature
pairs is accumulated chunk by chunk (running mean and co-moment, Chan et al.), so memory is
``O((L*E)^2)`` whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from core.analysis.layer_link import DocumentMeans, corr_from_cov, held_out_link
from core.analysis.resampling import (DocumentRuns, Estimate, block_of, document_keys, jackknife_interval,
                                      jackknife_paired_estimate, jackknife_t_p, no_verdict, too_few_documents)
from core.analysis.shuffles import WholeDocuments, shift_within_documents
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
)
from core.analysis.features import selection_np
from core.routing_data import RoutingData

Feature = Literal["probs", "topk"]
PERMUTATIONS = 2  # shifted copies of the data: the level mean |r| has without a link (a reference; the verdict is layer_link's)


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

    def merge(self, other: "StreamingCorrelation") -> "StreamingCorrelation":
        """Both sets of tokens' moments (Chan et al.'s pairwise update)."""
        if other.mean is None:
            return self
        if self.mean is None:
            self.n, self.mean, self.comoment = other.n, other.mean.copy(), other.comoment.copy()
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.comoment += other.comoment + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean += delta * (other.n / n)
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


class CountMoments:
    """Token count, sums and sums of products of 0/1 features (top-k indicators), kept as exact counts.

    The same interface as :class:`StreamingCorrelation`. Products of 0/1 values are counts: a
    float32 product (half float64's time) is exact to 2^24 tokens a chunk, and float64 totals add
    them exactly in any order, so shares merge to the bit of one pass.
    """

    def __init__(self) -> None:
        self.n = 0
        self.s: np.ndarray | None = None
        self.q: np.ndarray | None = None

    def update(self, x: np.ndarray) -> "CountMoments":
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"features must be [tokens, features], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        if self.s is None:
            self.s, self.q = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != len(self.s):
            raise ValueError(f"feature count changed from {len(self.s)} to {x.shape[1]}")
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.q += x.T @ x
        return self

    def merge(self, other: "CountMoments") -> "CountMoments":
        """Both sets of tokens' counts (sums of integers: the same in any order)."""
        if other.s is None:
            return self
        if self.s is None:
            self.n, self.s, self.q = other.n, other.s.copy(), other.q.copy()
            return self
        self.n, self.s, self.q = self.n + other.n, self.s + other.s, self.q + other.q
        return self

    def correlation(self) -> np.ndarray:
        """Correlation matrix; NaN on rows/columns of constant features."""
        if self.n < 2:
            raise ValueError("correlation needs at least two tokens")
        return _corr_from_moments(np.asarray(float(self.n)), self.s, self.q)


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
    over expert pairs whose correlation is defined (diagonal: excluding each feature with itself);
    ``layer_max_abs`` the max. A dead expert's NaN is left out of the means, never counted as 0.
    """

    feature: str
    moe_layers: list[int]
    num_experts: int
    num_tokens: int
    corr: np.ndarray  # [L*E, L*E]
    layer_mean_abs: np.ndarray  # [L, L]
    layer_max_abs: np.ndarray  # [L, L]
    group: str | None = None
    undefined_features: int = 0  # (layer, expert) features that never varied (dead or always-on experts)
    estimates: dict[str, Estimate] = field(default_factory=dict)  # "layer_mean_abs", "adjacent", "non_adjacent"

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
    """Mean and max |r| per layer pair over expert pairs; pairs with an undefined r (a feature that never varies) are left out."""
    a = np.abs(corr).reshape(corr.shape[:-2] + (L, E, L, E))
    a = np.moveaxis(a, -3, -2)  # [..., L, L, E, E]
    diag = np.eye(E, dtype=bool)
    same = np.eye(L, dtype=bool)[:, :, None, None] & diag[None, None]
    a = np.where(same, np.nan, a)  # a feature with itself is not a pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=(-2, -1)), np.nanmax(a, axis=(-2, -1))


def _corr_from_moments(n: np.ndarray, s: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Pearson correlation from token count, sums and sums of products (leading batch axes allowed)."""
    mean = s / n[..., None]
    cov = q / n[..., None, None]
    cov -= mean[..., :, None] * mean[..., None, :]  # in place: each pass over [F, F] counts at 16 x 64 (the null's draws)
    r = corr_from_cov(cov)
    return np.clip(r, -1.0, 1.0, out=r)


def adjacent_and_far(layer_mean_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over adjacent layer pairs and over non-adjacent ones of ``[..., L, L]`` (NaN where there are none)."""
    L = layer_mean_abs.shape[-1]
    i, j = np.triu_indices(L, k=1)
    adj, far = (j - i) == 1, (j - i) > 1
    vals = layer_mean_abs[..., i, j]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmean(vals[..., adj], -1) if adj.any() else np.full(vals.shape[:-1], np.nan),
                np.nanmean(vals[..., far], -1) if far.any() else np.full(vals.shape[:-1], np.nan))


class CorrelationAccumulator(RoutingAccumulator):
    """Streaming cross-layer correlation of one feature ("topk" indicators or "probs").

    With ``resamples`` > 0 it also keeps moments per document block (for jackknife intervals over
    documents) and ``permutations`` shadow correlations of data where each layer's tokens are
    circularly shifted within their document: cross-layer correlation that survives that shift comes
    from what a document is about, not from the token. That is the null of the summaries. A shift,
    not a shuffle: runs of tokens that keep their experts make |r| noisier than a shuffle would,
    and the shuffled null flagged every layer pair of routing with stickiness and no cross-layer link.
    """

    def __init__(self, feature: Feature = "topk", resamples: int = 0, permutations: int = PERMUTATIONS, seed: int = 0,
                 memory_floats: int = 16_000_000) -> None:
        if feature not in ("probs", "topk"):
            raise ValueError(f"feature must be 'probs' or 'topk', got {feature!r}")
        super().__init__()
        self.feature = feature
        self.name = f"the {feature} correlation analysis"
        self.needs = ("router_logits",) if feature == "probs" else ("topk_idx",)
        self.acc = CountMoments() if feature == "topk" else StreamingCorrelation()
        self.resamples, self.permutations, self.seed, self.memory = resamples, permutations, seed, memory_floats

    def _start(self) -> None:
        F = self.layout.num_layers * self.layout.num_experts
        self.blocks = int(min(64, max(16, self.memory // (F * F)))) if self.resamples else 0
        self.n, self.s, self.q = np.zeros(self.blocks), np.zeros((self.blocks, F)), np.zeros((self.blocks, F, F))
        moments = CountMoments if self.feature == "topk" else StreamingCorrelation
        self.null = [moments() for _ in range(self.permutations if self.resamples else 0)]
        self.pending = WholeDocuments()  # the last document, held back until it ends (for the null)
        self.means = DocumentMeans(self.blocks, F) if self.blocks else None

    def _add(self, chunk: RoutingData) -> None:
        x = _features(chunk, self.feature)
        if not self.blocks:
            self.acc.update(x)
            return
        keys = document_keys(chunk)
        b = block_of(keys, self.blocks)
        order = np.argsort(b, kind="stable")
        xs, bs = x[order], b[order]
        starts = np.r_[DocumentRuns.starts(bs), len(bs)]
        if self.feature == "topk":  # 0/1: the products and sums are counts, exact in float32 (half float64's time)
            xs = xs.astype(np.float32)
        for lo, hi in zip(starts[:-1], starts[1:]):
            xb, blk = xs[lo:hi], bs[lo]
            self.n[blk] += len(xb)
            self.s[blk] += xb.sum(0)
            self.q[blk] += xb.T @ xb
        if self.feature != "topk":  # top-k's total is the blocks' counts added up (:meth:`_total`)
            self.acc.update(x)
        self.means.add(keys, x)
        for docs in self.pending.push(chunk):
            self._add_null(docs)

    def _add_null(self, docs: RoutingData | None) -> None:
        """The shadow correlations of whole documents whose layers are shifted within each document.

        Whole documents (:class:`WholeDocuments`), each token's place drawn from where it is: the
        null is the same however the stream was cut into chunks or shares.
        """
        if docs is None or not self.null:
            return
        L, E = self.layout.num_layers, self.layout.num_experts
        xl = _features(docs, self.feature).reshape(docs.num_tokens, L, E)
        for p, acc in enumerate(self.null):
            idx = shift_within_documents(docs, self.seed, p, times=L - 1)  # layer 0 stays, the others move against it
            shuffled = np.stack([xl[:, 0]] + [xl[idx[li - 1], li] for li in range(1, L)], 1)
            acc.update(shuffled.reshape(docs.num_tokens, -1))

    def _merge(self, other: "CorrelationAccumulator") -> None:
        """Shares end on document boundaries (the run cuts them there): each share's last document is whole."""
        self._add_null(self.pending.flush())
        other._add_null(other.pending.flush())
        self.acc.merge(other.acc)
        self.n, self.s, self.q = self.n + other.n, self.s + other.s, self.q + other.q
        if self.means is not None:
            self.means.merge(other.means)
        for mine, theirs in zip(self.null, other.null):
            mine.merge(theirs)

    def _result(self) -> CrossLayerCorrelation:
        layers, E = list(self.layout.moe_layers), self.layout.num_experts
        self._add_null(self.pending.flush())
        total = self._total()
        corr = total.correlation()
        mean, mx = _summarize(corr, len(layers), E)
        est = self._estimates(mean) if self.blocks and total.n > 2 else {}
        undefined = int(np.isnan(np.diagonal(corr)).sum())
        return CrossLayerCorrelation(self.feature, layers, E, int(total.n), corr, mean, mx, None, undefined, est)

    def _total(self) -> CountMoments | StreamingCorrelation:
        """All tokens' moments: for top-k with document blocks, their exact counts added up (never kept twice)."""
        if self.feature != "topk" or not self.blocks:
            return self.acc
        total = CountMoments()
        total.n, total.s, total.q = int(self.n.sum()), self.s.sum(0), self.q.sum(0)
        return total

    def _estimates(self, mean: np.ndarray) -> dict[str, Estimate]:
        """Mean |r| per layer pair with jackknife intervals over document blocks and the shifted copies as reference;
        the verdicts are :mod:`core.analysis.layer_link`'s split-half test, corrected over the layer pairs."""
        L, E = self.layout.num_layers, self.layout.num_experts
        used = self.n > 0
        n, s, q = self.n.sum(), self.s.sum(0), self.q.sum(0)  # each block left out once: |r| grows with noise,
        loo = np.stack([_summarize(_corr_from_moments(np.asarray(n - self.n[b]), s - self.s[b], q - self.q[b]), L, E)[0]
                        for b in np.nonzero(used)[0]])  # so no bootstrap that repeats documents
        null = np.stack([_summarize(a.correlation(), L, E)[0] for a in self.null]) if self.null else np.full((1, L, L), np.nan)
        link = held_out_link(self.means.within(self.q), used, L, E)
        why = too_few_documents(used) or ("" if link is not None else "a half of the documents has under 2 blocks")
        upper = np.triu(np.ones((L, L), bool), 1)
        out = {"layer_mean_abs": _described(mean, loo, null, None, None)}
        if link is not None:
            u, u_loo, df = link
            est = jackknife_paired_estimate(np.where(upper, u, np.nan), np.zeros((L, L)), u_loo, np.zeros_like(u_loo),
                                            LINK_NULL, alternative="greater", df=df)
            out["layer_link"] = replace(est, value=u)
            out["layer_mean_abs"] = _described(mean, loo, null, est.p_value, est.p_adjusted, est.family)
        if L > 1:
            for key, pick in (("adjacent", 0), ("non_adjacent", 1)):
                v = adjacent_and_far(mean)[pick]
                if np.isfinite(v):
                    p = (jackknife_t_p(adjacent_and_far(link[0])[pick], adjacent_and_far(link[1])[pick], df=link[2])
                         if link else None)
                    out[key] = _described(v, adjacent_and_far(loo)[pick], adjacent_and_far(null)[pick], p, None)
        return {k: no_verdict(e, why) for k, e in out.items()} if why else out


LINK_NULL = "no link within documents (held-out documents)"


def _described(value: np.ndarray, loo: np.ndarray, null: np.ndarray, p: np.ndarray | None, p_adjusted: np.ndarray | None,
               family: int = 1) -> Estimate:
    """Mean |r| with its jackknife interval, the shifted copies' mean |r| as the null's level, and the link test's verdict."""
    lo, hi = jackknife_interval(value, loo, bounds=(0.0, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        nlo, nhi, nm = np.nanmin(null, 0), np.nanmax(null, 0), np.nanmean(null, 0)
    return Estimate(np.asarray(value), lo, hi, nm, nlo, nhi, "each layer shifted within documents", len(loo),
                    p_value=p, p_adjusted=p_adjusted, family=family)


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
    """``a - b`` of two groups' correlations; NaN where either is undefined, and left out of the means."""

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
    diff = a.corr - b.corr  # NaN where either group's correlation is undefined
    L, E = len(a.moe_layers), a.num_experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_abs = np.nanmean(np.abs(diff).reshape(L, E, L, E), axis=(1, 3))
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
