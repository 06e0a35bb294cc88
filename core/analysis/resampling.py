"""Uncertainty and verdicts, shared by every analysis: document blocks, bootstrap and jackknife, tests and corrections.

Tokens of one document are not independent: they share a topic, a domain, a style. So the unit
of resampling is the document. A streaming analysis keeps its sums per *document block* (every
document goes to one of ``num_blocks`` blocks by a hash of its dataset and document id; a block
is a random set of whole documents, so resampling blocks resamples documents), and
:func:`bootstrap` recomputes the statistic on blocks drawn with replacement, or the jackknife leaves
one out at a time. Nulls are "the same statistic on shuffled data" (the shuffles that keep
documents whole are in :mod:`core.analysis.shuffles`); the verdicts here are permutation and t
tests, Holm-corrected over what a finding counts. :class:`Estimate` carries a value, its
interval, its null and the verdict, and writes the sentence a report quotes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from core.analysis.results import ResultMixin
from core.safe_io import ArraySink, to_jsonable
from core.routing_data import RoutingData

NUM_BLOCKS = 64  # document blocks kept per analysis
RESAMPLES = 200  # bootstrap resamples
LEVEL = 0.95
MIN_DOCUMENTS = 6  # document blocks with data (8 documents fill 6 of 32 blocks 98% of the time); fewer: no interval, no verdict

Stat = Callable[[Mapping[str, np.ndarray]], np.ndarray]


# ---------------------------------------------------------------------------- document keys
def document_key(doc_ids: np.ndarray, dataset_ids: np.ndarray) -> np.ndarray:
    """One int64 key per (dataset id, document id); -1 ids count as their own document."""
    return (np.asarray(dataset_ids, np.int64) + 1) * (1 << 40) + (np.asarray(doc_ids, np.int64) + 1)


def document_keys(chunk: RoutingData) -> np.ndarray:
    """The :func:`document_key` of every token of a chunk (missing ids count as 0)."""
    n = chunk.num_tokens
    doc = chunk.doc_ids.numpy() if chunk.doc_ids is not None else np.zeros(n, np.int64)
    ds = chunk.dataset_ids.numpy() if chunk.dataset_ids is not None else np.zeros(n, np.int64)
    return document_key(doc, ds)


def block_of(keys: np.ndarray, num_blocks: int = NUM_BLOCKS) -> np.ndarray:
    """The block of each document key: a fixed hash, so a document lands in the same block in every analysis."""
    h = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return (h % np.uint64(num_blocks)).astype(np.int64)


def sum_by(units: np.ndarray, values: np.ndarray, num_units: int) -> np.ndarray:
    """``values [N, ...]`` summed per unit id in ``[0, num_units)``: ``[num_units, ...]``."""
    n = values.shape[0]
    flat = values.reshape(n, -1).astype(np.float64, copy=False)
    onehot = sp.csr_matrix((np.ones(n), (units, np.arange(n))), shape=(num_units, n))
    return np.asarray(onehot @ flat).reshape((num_units,) + values.shape[1:])


class BlockSums:
    """Named sums kept per unit (document block, or block x group), the input of :func:`bootstrap`."""

    def __init__(self, num_units: int = NUM_BLOCKS) -> None:
        self.num_units = num_units
        self.sums: dict[str, np.ndarray] = {}

    def add(self, name: str, units: np.ndarray, values: np.ndarray) -> None:
        part = sum_by(units, np.asarray(values), self.num_units)
        self.sums[name] = part if name not in self.sums else self.sums[name] + part

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sums[name]

    def merge(self, other: "BlockSums") -> "BlockSums":
        """The sums of both (units are fixed hashes of documents, so they line up)."""
        if other.num_units != self.num_units:
            raise ValueError(f"cannot merge block sums over {other.num_units} units into {self.num_units}")
        for name, v in other.sums.items():
            self.sums[name] = v if name not in self.sums else self.sums[name] + v
        return self


# ---------------------------------------------------------------------------- resampling
def bootstrap_weights(used: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """``[R, U]`` counts: each row draws the used units (bool mask over U) with replacement."""
    idx = np.nonzero(used)[0]
    w = np.zeros((resamples, used.shape[0]))
    if len(idx):
        rng = np.random.default_rng(seed)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=resamples)
    return w


def bootstrap(stat: Stat, sums: Mapping[str, np.ndarray], used: np.ndarray | None = None,
              resamples: int = RESAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The statistic on all units and on ``resamples`` bootstrap draws of units: ``(value, draws [R, ...])``.

    ``stat`` maps totals (``{name: array}``, with a leading batch axis) to values with that axis.
    """
    first = next(iter(sums.values()))
    used = np.ones(first.shape[0], bool) if used is None else used
    if used.sum() < 2:  # one document block: nothing to resample, so no interval
        resamples = 0
    w = np.concatenate([used[None].astype(np.float64), bootstrap_weights(used, resamples, seed)])
    totals = {k: np.tensordot(w, v, axes=(1, 0)) for k, v in sums.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(stat(totals))
    return out[0], out[1:]


def jackknife_weights(used: np.ndarray) -> np.ndarray:
    """``[U_used, U]``: every used unit once left out (for statistics a bootstrap would bias, see :func:`jackknife_interval`)."""
    idx = np.nonzero(used)[0]
    w = np.repeat(used[None].astype(np.float64), len(idx), 0)
    w[np.arange(len(idx)), idx] = 0.0
    return w


def jackknife_interval(value: np.ndarray, leave_one_out: np.ndarray, level: float = LEVEL,
                       bounds: tuple[float, float] = (-np.inf, np.inf), df: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """value ± t · jackknife standard error, from the statistic with each unit left out once.

    For statistics that noise pushes up (a maximum over experts, |r|, a divergence), a bootstrap
    that draws documents twice adds noise and so shifts every draw up: its percentile interval
    can miss the value itself. Leaving one block out does not duplicate anything. The normal
    interval can pass the statistic's own range (a share over 100%): ``bounds`` clips it. ``df``:
    Student's degrees of freedom where they are not n - 1 (a statistic split over halves of the blocks).
    """
    from scipy.special import stdtrit  # Student t quantile (scipy.stats is slow to import)

    loo = np.asarray(leave_one_out, dtype=np.float64)
    n = len(loo)
    if n < 2:
        nan = np.full(np.shape(value), np.nan)
        return nan, nan.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.sqrt((n - 1) / n * np.nansum((loo - np.nanmean(loo, 0)) ** 2, 0))
    half = stdtrit(n - 1 if df is None else df, 1 - (1 - level) / 2) * se
    return np.clip(np.asarray(value) - half, *bounds), np.clip(np.asarray(value) + half, *bounds)


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of draws along axis 0 (NaN draws ignored)."""
    a = (1 - level) / 2
    if len(draws) == 0:  # no resampling asked for: no interval
        nan = np.full(np.shape(draws)[1:], np.nan)
        return nan, nan.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(draws, a, axis=0), np.nanquantile(draws, 1 - a, axis=0)


def p_value(observed: np.ndarray, null_draws: np.ndarray) -> np.ndarray:
    """One-sided permutation p-value ``(1 + #{null >= observed}) / (1 + R)`` along axis 0 (Phipson & Smyth)."""
    ge = (np.asarray(null_draws) >= np.asarray(observed)[None] - 1e-12).sum(0)
    return (1 + ge) / (1 + len(null_draws))


def null_p_value(observed: np.ndarray, null_draws: np.ndarray, alternative: str = "greater") -> np.ndarray:
    """One-sided p of ``observed`` as one more draw of the null: a t prediction test on ``null_draws [P, ...]``.

    A permutation p-value from P draws cannot go below 1/(P + 1), so with the 4 to 20 draws an
    expensive null affords, no layer could pass a correction across 16 layers. The statistics
    tested here are means over many tokens, so their null draws are close to normal; then
    ``(observed - mean) / (sd * sqrt(1 + 1/P))`` follows Student's t with P - 1 degrees of freedom
    (exactly, for normal draws). Its false-positive rate is measured in docs/CALIBRATION.md.
    """
    from scipy.special import stdtr  # Student t CDF (scipy.stats is slow to import)

    null = np.asarray(null_draws, np.float64)
    P = len(null)
    obs = np.asarray(observed, np.float64)
    if P < 3:
        return np.full(obs.shape, np.nan)
    sign = 1.0 if alternative == "greater" else -1.0
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, sd = np.nanmean(null, 0), np.nanstd(null, 0, ddof=1)
        gap = sign * (obs - mean)
        t = gap / (sd * np.sqrt(1 + 1 / P))
        t = np.where(sd > 0, t, np.where(gap > 1e-12, np.inf, np.where(gap < -1e-12, -np.inf, 0.0)))
        return np.where(np.isfinite(obs) & np.isfinite(mean), stdtr(P - 1, -t), np.nan)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment over every element of ``p`` (NaN ones are not tests): family-wise error at alpha."""
    p = np.asarray(p, np.float64)
    flat = p.ravel()
    ok = np.nonzero(np.isfinite(flat))[0]
    out = np.full(flat.shape, np.nan)
    m = len(ok)
    if m:
        order = ok[np.argsort(flat[ok], kind="stable")]
        adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
        out[order] = adj
    return out.reshape(p.shape)


def jackknife_t_p(value: np.ndarray, leave_one_out: np.ndarray, null: np.ndarray | float = 0.0,
                  alternative: str = "greater", df: int | None = None) -> np.ndarray:
    """One-sided p of ``value - null`` by its jackknife standard error over document blocks, Student t with n - 1 df.

    For a difference whose expectation under the null is known for every document (a
    within-document shuffle's exact expectation): ``leave_one_out`` holds the difference with
    each block left out once.
    """
    from scipy.special import stdtr

    loo = np.asarray(leave_one_out, np.float64)
    n = len(loo)
    diff = np.asarray(value, np.float64) - np.asarray(null, np.float64)
    if n < 2:
        return np.full(diff.shape, np.nan)
    sign = 1.0 if alternative == "greater" else -1.0
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        se = np.sqrt((n - 1) / n * np.nansum((loo - np.nanmean(loo, 0)) ** 2, 0))
        t = np.where(se > 0, sign * diff / se, np.where(sign * diff > 1e-12, np.inf, 0.0))
        return np.where(np.isfinite(diff), stdtr(n - 1 if df is None else df, -t), np.nan)


# ---------------------------------------------------------------------------- what a finding quotes
@dataclass
class Estimate(ResultMixin):
    """A statistic with its interval over documents, its null, and whether the two can be told apart.

    Fields may be scalars or arrays of one shape (e.g. one value per layer). ``diff_low/high`` is the
    interval of value - null (paired nulls: the null recomputed on every resample); ``p_value`` is
    each element's one-sided p against its null, and ``p_adjusted`` the same after Holm's
    correction over the ``family`` elements a finding counts (its layers, its experts): the
    verdict uses it, so "n of L layers" holds its family-wise error at ``alpha``.
    ``null_low/high`` is the null's 95% range (its min and max when there are few draws).
    ``why_none``: why there is no interval or verdict (too few documents), where there is none.
    """

    value: np.ndarray
    low: np.ndarray
    high: np.ndarray
    null: np.ndarray
    null_low: np.ndarray
    null_high: np.ndarray
    null_name: str
    resamples: int
    diff_low: np.ndarray | None = None
    diff_high: np.ndarray | None = None
    p_value: np.ndarray | None = None
    alpha: float = 0.05
    p_adjusted: np.ndarray | None = None
    family: int = 1
    why_none: str = ""

    @property
    def distinguishable(self) -> np.ndarray:
        """True where the value differs from its null: adjusted p (else p) < alpha, or a difference interval without 0."""
        p = self.p_adjusted if self.p_adjusted is not None else self.p_value
        if p is not None:
            return np.asarray(p, np.float64) < self.alpha
        lo, hi = np.asarray(self.diff_low), np.asarray(self.diff_high)
        return (lo > 0) | (hi < 0)

    def corrected(self) -> "Estimate":
        """This estimate with Holm's correction over all its elements (e.g. its layers); ``family`` counts the tests."""
        if self.p_value is None:
            return self
        p = np.asarray(self.p_value, np.float64)
        return replace(self, p_adjusted=holm(p), family=int(np.isfinite(p).sum()))

    @property
    def expected_false(self) -> float:
        """How many elements the verdict flags by chance alone, at most (alpha with a correction, else alpha per test)."""
        return self.alpha if self.p_adjusted is not None else self.alpha * int(np.size(self.value))

    def to_dict(self, *, sink: ArraySink | None = None, path: tuple[str, ...] = ()) -> dict:
        return {**super().to_dict(sink=sink, path=path),
                "distinguishable": to_jsonable(np.asarray(self.distinguishable), sink=sink, path=(*path, "distinguishable"))}

    def at(self, i: int | tuple) -> "Estimate":
        """The estimate of one element (e.g. one layer); its adjusted p keeps the family it was corrected in."""
        pick = lambda x: None if x is None else np.asarray(x)[i]  # noqa: E731
        return Estimate(pick(self.value), pick(self.low), pick(self.high), pick(self.null), pick(self.null_low),
                        pick(self.null_high), self.null_name, self.resamples, pick(self.diff_low),
                        pick(self.diff_high), pick(self.p_value), self.alpha, pick(self.p_adjusted), self.family,
                        self.why_none)

    def text(self, fmt: Callable[[float], str] = lambda x: f"{x:.3f}") -> str:
        """"X (95% CI a–b) against null Y (name, 95% range c–d)", and the verdict, for one element."""
        v, lo, hi = (float(np.asarray(x)) for x in (self.value, self.low, self.high))
        null, nlo, nhi = (float(np.asarray(x)) for x in (self.null, self.null_low, self.null_high))
        if not np.isfinite(lo):  # no resampling: the value and its null, no verdict
            why = self.why_none or "one document, or resampling turned off"
            return f"{fmt(v)} against {self.null_name} {fmt(null)} (no interval: {why})"
        rng = f", 95% range {fmt(nlo)}–{fmt(nhi)}" if np.isfinite(nlo) and nlo != nhi else ""
        s = f"{fmt(v)} (95% CI {fmt(lo)}–{fmt(hi)}) against {self.null_name} {fmt(null)}{rng}"
        if self.p_value is not None and np.isfinite(float(np.asarray(self.p_value))):
            s += f", p = {float(np.asarray(self.p_value)):.3g}"
            if self.p_adjusted is not None and self.family > 1:
                s += f" ({float(np.asarray(self.p_adjusted)):.3g} corrected over {self.family})"
        return s + ("" if bool(self.distinguishable) else ": not distinguishable from the null")


def no_verdict(est: Estimate, why: str) -> Estimate:
    """``est`` without interval, p-value or verdict (e.g. too few documents for any interval to cover)."""
    nan = np.full(np.shape(est.value), np.nan)
    return replace(est, low=nan, high=nan.copy(), diff_low=None, diff_high=None, p_value=nan.copy(),
                   p_adjusted=None, why_none=why)


def too_few_documents(used: np.ndarray) -> str:
    """Why there is no interval or verdict when fewer than :data:`MIN_DOCUMENTS` document blocks hold data, else ""."""
    n = int(np.asarray(used, bool).sum())
    return (f"{n} document block{'s' if n != 1 else ''} (too few documents), under the {MIN_DOCUMENTS} that intervals "
            "over documents need"
            if n < MIN_DOCUMENTS else "")


def paired_estimate(stat: Stat, null_stat: Stat, sums: Mapping[str, np.ndarray], null_name: str,
                    used: np.ndarray | None = None, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Value and null from the same sums, both bootstrapped over the same units (e.g. a within-document expectation)."""
    both = lambda t: np.stack([np.asarray(stat(t)), np.asarray(null_stat(t))], axis=1)  # noqa: E731
    value, draws = bootstrap(both, sums, used, resamples, seed)
    lo, hi = interval(draws[:, 0])
    nlo, nhi = interval(draws[:, 1])
    dlo, dhi = interval(draws[:, 0] - draws[:, 1])
    return Estimate(value[0], lo, hi, value[1], nlo, nhi, null_name, resamples, diff_low=dlo, diff_high=dhi)


def permutation_estimate(value: np.ndarray, draws: np.ndarray | tuple[np.ndarray, np.ndarray], null_draws: np.ndarray,
                         null_name: str, resamples: int, alternative: str = "greater", correct: bool = True) -> Estimate:
    """Value with bootstrap ``draws`` (or a ``(low, high)`` interval) against a permutation null ``null_draws [P, ...]``.

    The verdict is a one-sided p (``alternative`` "greater" or "less" than the null), Holm-corrected
    over the estimate's elements (``correct``: its layers, its groups): the permutation p where
    there are draws enough for the corrected test to reach alpha, else :func:`null_p_value`. With
    under 3 null draws there is no p-value: the verdict is whether the value's interval and the
    null's range overlap, ``diff_low/high`` = (low - null_high, high - null_low).
    """
    lo, hi = draws if isinstance(draws, tuple) else interval(draws)  # a tuple: an interval made elsewhere (jackknife)
    null_draws = np.asarray(null_draws)
    nlo, nhi = (null_draws.min(0), null_draws.max(0)) if len(null_draws) < 40 else interval(null_draws)
    est = Estimate(np.asarray(value), lo, hi, np.nanmean(null_draws, axis=0), nlo, nhi, null_name, resamples)
    if len(null_draws) >= 3:
        family = int(np.isfinite(np.asarray(value, np.float64)).sum()) if correct else 1
        if (len(null_draws) + 1) * est.alpha >= max(family, 1):  # enough draws for the corrected verdict: exact p
            sign = 1.0 if alternative == "greater" else -1.0
            est.p_value = np.where(np.isfinite(np.asarray(value, np.float64)),
                                   p_value(sign * np.asarray(value), sign * null_draws), np.nan)
        else:
            est.p_value = null_p_value(value, null_draws, alternative)
        est = est.corrected() if correct else est
    else:
        est.diff_low, est.diff_high = lo - nhi, hi - nlo
    return est


def jackknife_paired_estimate(value: np.ndarray, null: np.ndarray, value_loo: np.ndarray, null_loo: np.ndarray,
                              null_name: str, bounds: tuple[float, float] = (-np.inf, np.inf),
                              alternative: str = "greater", correct: bool = True, df: int | None = None) -> Estimate:
    """A value against a null computed from the same documents (an exact within-document expectation).

    Both are recomputed with each document block left out (``*_loo [n, ...]``); the interval of the
    value is the jackknife t interval, and the verdict a t test of value - null on its jackknife
    standard error (n - 1 degrees of freedom), Holm-corrected over the elements. A percentile
    bootstrap of the difference covered too little at few documents (docs/CALIBRATION.md).
    """
    value, null = np.asarray(value, np.float64), np.asarray(null, np.float64)
    lo, hi = jackknife_interval(value, value_loo, bounds=bounds, df=df)
    nlo, nhi = jackknife_interval(null, null_loo, bounds=bounds, df=df)
    dlo, dhi = jackknife_interval(value - null, np.asarray(value_loo) - np.asarray(null_loo), df=df)
    p = jackknife_t_p(value - null, np.asarray(value_loo) - np.asarray(null_loo), 0.0, alternative, df)
    est = Estimate(value, lo, hi, null, nlo, nhi, null_name, len(value_loo), dlo, dhi, p)
    return est.corrected() if correct else est


class DocumentRuns:
    """Totals of per-token features for each document, when a document's tokens arrive together.

    Caches store a document's tokens contiguously, possibly across shards: ``add`` returns the
    documents that ended, and keeps the open one for the next chunk; ``flush`` closes it. A
    document seen in two separate runs counts as two units (a finer null, never a mixed one).
    """

    def __init__(self) -> None:
        self.key: int | None = None
        self.open: np.ndarray | None = None
        self.first_key: int | None = None  # the first document seen: a share before this one may have ended inside it

    def continues_in(self, later: "DocumentRuns") -> bool:
        """Whether the share of tokens that ``later`` saw starts inside this one's last document."""
        return self.key is not None and later.first_key is not None and self.key == later.first_key

    @staticmethod
    def starts(keys: np.ndarray) -> np.ndarray:
        """Where each run of one key begins (for ``np.add.reduceat``)."""
        return np.r_[0, np.nonzero(keys[1:] != keys[:-1])[0] + 1]

    def add(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = self.starts(keys)
        return self.add_runs(keys[starts], np.add.reduceat(values.astype(np.float64, copy=False), starts, axis=0))

    def add_runs(self, run_keys: np.ndarray, totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`add`, for values already summed per run (``run_keys`` from :meth:`starts`)."""
        done_keys, done = [], []
        if self.first_key is None and len(run_keys):
            self.first_key = int(run_keys[0])
        if self.key is not None:
            if run_keys[0] == self.key:
                totals[0] += self.open
            else:
                done_keys.append(self.key)
                done.append(self.open[None])
        self.key, self.open = int(run_keys[-1]), totals[-1]
        done_keys += list(run_keys[:-1])
        done.append(totals[:-1])
        return np.asarray(done_keys, np.int64), np.concatenate(done)

    def merge(self, later: "DocumentRuns") -> tuple[np.ndarray, np.ndarray]:
        """Take on the open document of the share that follows; returns this share's open one, now finished.

        Shares should split the stream between documents. A document split between them counts as
        two (as one seen in two separate runs does), with a warning.
        """
        if self.continues_in(later):
            warnings.warn(f"document key {self.key} is split between two shares of the stream: it counts as two "
                          "documents in the intervals over documents", stacklevel=3)
        done = self.flush()
        self.key, self.open = later.key, later.open
        self.first_key = self.first_key if self.first_key is not None else later.first_key
        return done

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        if self.key is None:
            return np.zeros(0, np.int64), np.zeros((0, 0))
        out = np.asarray([self.key], np.int64), self.open[None]
        self.key, self.open = None, None
        return out
