"""Do two datasets' cross-layer routing correlations really differ? Mean |Δr| against a null of exchangeable documents.

The mean |Δr| between two datasets' correlation matrices is never 0: each matrix carries
sampling noise, so |r_a - r_b| sits near the noise's size (about 0.1 at a few thousand tokens,
as large as |r| itself). The null keeps what a document shares: the document blocks of the two
datasets (each block a fixed hash of whole documents, :func:`core.analysis.resampling.block_of`)
are pooled and dealt out again between two pseudo-datasets of the same numbers of blocks, and the
mean |Δr| recomputed. Datasets whose routing correlations agree sit inside that null; the
verdict is the permutation p, Holm-corrected over the dataset pairs. The interval leaves one
block out at a time (jackknife).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from core.analysis.correlations import _corr_from_moments, _summarize
from core.analysis.features import selection_np
from core.analysis.measures import draws_for_holm, layer_rng
from core.analysis.resampling import (Estimate, MIN_DOCUMENTS, block_of, document_keys, jackknife_interval, no_verdict,
                                      permutation_estimate)
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.routing_data import RoutingData

NULL_NAME = "document blocks dealt between the two datasets"


@dataclass
class DatasetDifference(ResultMixin):
    """Mean |Δr| of consecutive dataset pairs (``pairs``: "a - b"), per layer pair and overall, against their null.

    ``layer_diff[p]`` and ``layer_null[p]`` are ``[L, L]`` (mean |Δr| per layer pair, and its mean
    under the null); ``estimates[p]`` the overall mean |Δr| (cross-layer pairs; within the layer
    when there is one) with interval and verdict; ``layer_estimates[p]`` each layer pair's, Holm over
    the layer pairs (a difference confined to one layer pair is diluted in the overall mean).
    """

    moe_layers: list[int]
    num_experts: int
    pairs: list[str]
    layer_diff: dict[str, np.ndarray] = field(default_factory=dict)
    layer_null: dict[str, np.ndarray] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)
    layer_estimates: dict[str, Estimate] = field(default_factory=dict)  # [L, L] per layer pair (i < j), Holm over them


def overall(layer_mean: np.ndarray) -> np.ndarray:
    """One number of ``[..., L, L]``: the mean over layer pairs i < j (the diagonal block when L = 1)."""
    L = layer_mean.shape[-1]
    i, j = np.triu_indices(L, k=1 if L > 1 else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(layer_mean[..., i, j], -1)


class DatasetDifferenceAccumulator(RoutingAccumulator):
    """Selection moments per (dataset, document block); at the end, the permutation null over blocks.

    Memory: ``datasets x blocks x (L E)²`` floats, ``blocks`` 8 to 32 per dataset within
    ``memory_floats`` (16 x 64 experts, three datasets: 8 blocks, 200 MB). ``permutations``: null draws
    (more when Holm over the dataset pairs needs them); 0 turns the verdict off.
    """

    name = "the dataset-difference analysis"
    needs = ("topk_idx",)

    def __init__(self, permutations: int = 100, seed: int = 0, memory_floats: int = 24_000_000) -> None:
        super().__init__()
        self.permutations, self.seed, self.memory = permutations, seed, memory_floats

    def _start(self) -> None:
        F = self.layout.num_layers * self.layout.num_experts
        self.blocks = int(min(32, max(8, self.memory // (3 * F * F))))
        self.mom: dict[int, list[np.ndarray]] = {}  # dataset id -> [n [B], s [B, F], q [B, F, F]]

    def _moments(self, ds: int) -> list[np.ndarray]:
        if ds not in self.mom:
            F = self.layout.num_layers * self.layout.num_experts
            self.mom[ds] = [np.zeros(self.blocks), np.zeros((self.blocks, F)), np.zeros((self.blocks, F, F))]
        return self.mom[ds]

    def _add(self, chunk: RoutingData) -> None:
        x = selection_np(chunk).reshape(chunk.num_tokens, -1).astype(np.float64)
        ds = chunk.dataset_ids.numpy() if chunk.dataset_ids is not None else np.zeros(chunk.num_tokens, np.int64)
        unit = ds * self.blocks + block_of(document_keys(chunk), self.blocks)
        for u in np.unique(unit):
            xb = x[unit == u]
            n, s, q = self._moments(int(u) // self.blocks)
            b = int(u) % self.blocks
            n[b] += len(xb)
            s[b] += xb.sum(0)
            q[b] += xb.T @ xb

    def _merge(self, other: "DatasetDifferenceAccumulator") -> None:
        for ds, (n, s, q) in other.mom.items():
            mine = self._moments(ds)
            mine[0] += n
            mine[1] += s
            mine[2] += q

    def _diff(self, a: tuple, b: tuple) -> np.ndarray:
        """``[F, F]`` r_a - r_b from two groups' summed moments (n, s, q); NaN where either is undefined."""
        ra, rb = (_corr_from_moments(np.asarray(g[0]), g[1], g[2]) for g in (a, b))
        return ra - rb

    def _pair(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, Estimate]:
        """Observed ``[L, L]``, null mean ``[L, L]`` and the Estimate of the overall mean |Δr| of datasets a and b."""
        units = [(d, i) for d in (a, b) for i in np.nonzero(self.mom[d][0] > 0)[0]]
        n = np.array([self.mom[d][0][i] for d, i in units])
        s = np.stack([self.mom[d][1][i] for d, i in units])
        q = np.stack([self.mom[d][2][i] for d, i in units])
        in_a = np.array([d == a for d, _ in units])

        L, E = self.layout.num_layers, self.layout.num_experts
        F = L * E
        # A group's moments are a weighted sum over units (one BLAS pass). The observed value is computed in float64;
        # the leave-one-out and null draws (over 100 of them) in float32: their [F, F] passes are bound by memory, and r
        # to 1e-6 moves no interval or p a finding quotes. The moments are counts (0/1 features): exact in both.
        exact = (n, s, q.reshape(len(units), -1))
        fast = tuple(m.astype(np.float32) for m in exact)

        def diff(w_a: np.ndarray, w_b: np.ndarray, moments: tuple) -> np.ndarray:
            """r_a - r_b of the groups whose unit weights are w_a and w_b."""
            ga, gb = (tuple(w.astype(moments[0].dtype) @ m for m in moments) for w in (w_a, w_b))
            return self._diff(*((g[0], g[1], g[2].reshape(F, F)) for g in (ga, gb)))

        def stat(mask_a: np.ndarray, drop: int = -1, moments: tuple = fast) -> np.ndarray:
            keep = np.ones(len(units))
            if drop >= 0:
                keep[drop] = 0.0
            d = diff(keep * mask_a, keep * ~mask_a, moments)
            return _summarize(np.where(defined, d, np.nan), L, E)[0]

        observed = diff(in_a, ~in_a, exact)
        defined = np.isfinite(observed)  # the null and the interval average the same expert pairs (defined in both datasets)
        value = _summarize(np.where(defined, observed, np.nan), L, E)[0]
        loo_pairs = np.stack([stat(in_a, u) for u in range(len(units))])
        loo = overall(loo_pairs)
        rng = layer_rng(self.seed, a, b)
        draws = draws_for_holm(self.permutations, max(len(self.mom) - 1, 1)) if self.permutations else 0
        null = np.stack([stat(in_a[rng.permutation(len(units))]) for _ in range(draws)]) if draws else np.full((1,) + value.shape, np.nan)
        ci = jackknife_interval(overall(value), loo, bounds=(0.0, 2.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no draws: a NaN null
            est = permutation_estimate(overall(value), ci, overall(null), NULL_NAME, len(loo), correct=False)
        short = min(int(in_a.sum()), int((~in_a).sum()))
        why = (f"{short} document blocks in a dataset, under the {MIN_DOCUMENTS} that intervals over documents need"
               if short < MIN_DOCUMENTS else "" if draws else "resampling turned off")
        L = len(value)
        i, j = np.triu_indices(L, k=1 if L > 1 else 0)
        upper = np.full(value.shape, np.nan)
        upper[i, j] = value[i, j]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per = permutation_estimate(upper, jackknife_interval(upper, loo_pairs, bounds=(0.0, 2.0)), null, NULL_NAME,
                                       len(loo))  # each layer pair, Holm over them (a t prediction test on the draws)
            return (value, np.nanmean(null, 0), no_verdict(est, why) if why else est,
                    no_verdict(per, why) if why else per)

    def _result(self) -> DatasetDifference:
        ids = sorted(self.mom)
        names = lambda d: self.dataset_names[d] if d < len(self.dataset_names) else str(d)  # noqa: E731
        out = DatasetDifference(list(self.layout.moe_layers), self.layout.num_experts, [])
        for a, b in zip(ids, ids[1:]):
            key = f"{names(a)} - {names(b)}"
            out.pairs.append(key)
            out.layer_diff[key], out.layer_null[key], out.estimates[key], out.layer_estimates[key] = self._pair(a, b)
        return _holm_over_pairs(out)


def _holm_over_pairs(res: DatasetDifference) -> DatasetDifference:
    """The pairs' permutation p-values Holm-corrected together (the family a finding counts)."""
    from core.analysis.resampling import holm

    keys = [k for k in res.pairs if res.estimates[k].p_value is not None and np.isfinite(res.estimates[k].p_value)]
    if keys:
        adj = holm(np.array([float(res.estimates[k].p_value) for k in keys]))
        for k, p in zip(keys, adj):
            res.estimates[k].p_adjusted, res.estimates[k].family = np.asarray(p), len(keys)
    return res


def dataset_difference(routing: RoutingData | Iterable[RoutingData], permutations: int = 100,
                       seed: int = 0) -> DatasetDifference:
    """Mean |Δr| of each consecutive pair of datasets against the dealt-blocks null, with intervals."""
    return fold_one(routing, DatasetDifferenceAccumulator(permutations, seed))
