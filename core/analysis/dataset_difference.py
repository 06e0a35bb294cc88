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
        x = selection_np(chunk).reshape(chunk.num_tokens, -1).astype(np.float32)  # 0/1: its products and sums are
        # counts, exact in float32 (to 2^24 tokens a chunk) and added to float64 totals; half float64's time
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
        # The observed value in float64; the leave-one-out and null draws (over 100 of them) in float32, a batch of
        # them per pass over the units' moments (:func:`_layer_means`): r to 1e-6 moves no interval or p a finding
        # quotes. The moments are counts (0/1 features): exact in both precisions.
        ga, gb = (tuple(w.astype(np.float64) @ m for m in (n, s, q.reshape(len(units), -1))) for w in (in_a, ~in_a))
        observed = self._diff((ga[0], ga[1], ga[2].reshape(F, F)), (gb[0], gb[1], gb[2].reshape(F, F)))
        defined = np.isfinite(observed)  # the null and the interval average the same expert pairs (defined in both datasets)
        value = _summarize(np.where(defined, observed, np.nan), L, E)[0]
        keep = 1.0 - np.eye(len(units))  # row u: every unit but u
        rng = layer_rng(self.seed, a, b)
        draws = draws_for_holm(self.permutations, max(len(self.mom) - 1, 1)) if self.permutations else 0
        dealt = np.array([in_a[rng.permutation(len(units))] for _ in range(draws)], dtype=float).reshape(draws, len(units))
        w_a = np.concatenate([keep * in_a, dealt])
        w_b = np.concatenate([keep * ~in_a, 1.0 - dealt])
        means = _layer_means(w_a, w_b, (n, s, q), defined & ~np.eye(F, dtype=bool), L, E)
        loo_pairs, null = means[:len(units)], means[len(units):] if draws else np.full((1,) + value.shape, np.nan)
        loo = overall(loo_pairs)
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


def _layer_means(w_a: np.ndarray, w_b: np.ndarray, moments: tuple, pairs: np.ndarray, L: int, E: int) -> np.ndarray:
    """``[K, L, L]`` mean |r_a - r_b| per layer pair over ``pairs`` (``[F, F]``), for the K groups ``w_a`` and ``w_b``
    (``[K, units]`` weights of the units' moments ``(n [U], s [U, F], q [U, F, F])``), in float32.

    The groups' moments come a batch at a time from one matrix product (``q`` read once per batch, not twice per
    group); each group's ``[F, F]`` passes then run on its own slice, which stays in the processor's cache. Where a
    feature never varies in a group its correlations are undefined and left out of that group's means (as
    ``np.nanmean`` leaves out the NaN that :func:`core.analysis.layer_link.corr_from_cov` gives them).
    """
    U, F = len(moments[0]), L * E
    n, s, q = moments[0].astype(np.float32), moments[1].astype(np.float32), moments[2].astype(np.float32).reshape(U, -1)
    weight = pairs.astype(np.float32)
    counts = _block_sums(weight, L, E)
    batch = int(max(1, min(8, 8_000_000 // (F * F))))
    buffers = np.empty((2, batch, F * F), np.float32)  # reused: a fresh 30 MB array per batch costs its page faults
    out = np.empty((len(w_a), L, L))
    with np.errstate(divide="ignore", invalid="ignore"):
        for lo in range(0, len(w_a), batch):
            ga, gb = (_group_moments(w[lo:lo + batch].astype(np.float32), (n, s, q), buf) for w, buf in zip((w_a, w_b), buffers))
            for k in range(len(ga[0])):
                ra, never_a = _corr_in_place(ga[0][k], ga[1][k], ga[2][k].reshape(F, F))
                rb, never_b = _corr_in_place(gb[0][k], gb[1][k], gb[2][k].reshape(F, F))
                d = np.abs(np.subtract(ra, rb, out=ra), out=ra)
                never, c = never_a | never_b, counts
                if never.any():  # undefined rows and columns: out of the sums and the counts
                    d[never, :] = 0.0
                    d[:, never] = 0.0
                    c = _block_sums(weight * ~never[:, None] * ~never[None, :], L, E)
                d *= weight
                out[lo + k] = _block_sums(d, L, E) / c
    return out


def _group_moments(w: np.ndarray, moments: tuple, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(n [B], s [B, F], q [B, F*F])`` of the B groups whose unit weights are ``w``; ``q`` written into ``out``."""
    n, s, q = moments
    return w @ n, w @ s, np.matmul(w, q, out=out[:len(w)])


def _corr_in_place(n: np.float32, s: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r from one group's moments, computed in ``q`` (``[F, F]``), and the features that never vary (their
    rows and columns of r are not numbers)."""
    mean = s / n
    q /= n
    q -= np.multiply.outer(mean, mean)
    sd = np.sqrt(np.clip(np.diagonal(q), 0, None))
    q /= sd[:, None]
    q /= sd[None, :]
    return np.clip(q, -1.0, 1.0, out=q), sd < 1e-12


def _block_sums(a: np.ndarray, L: int, E: int) -> np.ndarray:
    """``[L, L]`` sums of the ``E x E`` blocks of ``a`` (``[L E, L E]``)."""
    return a.reshape(L * E, L, E).sum(-1).reshape(L, E, L).sum(1)


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
