"""Is there a token-level link between two layers' routing? A split-half test of within-document correlation.

The mean |r| (or r²) of E x E expert pairs is pushed up by noise, and by more when a document's
tokens come in runs that keep their experts (repeated words route alike at every layer): then a
null made by shuffling or shifting one layer within documents is less noisy than the data, and
flagged every layer pair of such routing with no link at all. So the verdict uses a statistic
that noise does not push up:

- correlations *within documents* (each document's mean taken out), so what a document is about
  (its domain, its topic) is not counted as a link between layers;
- computed on two halves of the documents (document blocks of even and odd number): the expert
  pairs most correlated in one half are measured in the other (:func:`held_out_link`). The
  halves' noise is independent, so the held-out correlation is 0 without a link, however noisy
  or autocorrelated the tokens are;
- tested against 0 with its jackknife standard error over document blocks (a t test, which
  captures any dependence inside documents), Holm-corrected over the layer pairs.
"""

from __future__ import annotations

import warnings

import numpy as np

from core.analysis.resampling import DocumentRuns, block_of


class DocumentMeans:
    """Per document block, what each document's own mean contributes to the co-moments: ``B [U, F, F]``.

    ``sum_d s_d s_d^T / n_d`` over the block's documents; the block's raw products ``q`` minus this
    are the co-moments within documents. A document's sums wait in :class:`DocumentRuns` until it
    ends (its tokens may arrive over several chunks).
    """

    def __init__(self, num_blocks: int, num_features: int) -> None:
        self.B = np.zeros((num_blocks, num_features, num_features))
        self.docs = DocumentRuns()

    def add(self, keys: np.ndarray, x: np.ndarray) -> None:
        """Tokens ``x [N, F]`` of documents ``keys``."""
        self._close(*self.docs.add(keys, np.concatenate([np.ones((len(x), 1)), x], 1)))

    def _close(self, keys: np.ndarray, totals: np.ndarray) -> None:
        if not len(keys):
            return
        n, s = totals[:, 0], totals[:, 1:] / np.sqrt(np.clip(totals[:, :1], 1, None))
        blocks = block_of(keys, self.B.shape[0])
        for b in np.unique(blocks[n > 0]):
            sel = (blocks == b) & (n > 0)
            self.B[b] += s[sel].T @ s[sel]

    def merge(self, later: "DocumentMeans") -> None:
        """The later share's added; a document both shares saw is closed once, as a whole."""
        self._close(*self.docs.merge(later.docs))
        self.B += later.B

    def within(self, q: np.ndarray) -> np.ndarray:
        """The within-document co-moments ``q - B`` per block, every document closed."""
        self._close(*self.docs.flush())
        return q - self.B


def corr_from_cov(cov: np.ndarray) -> np.ndarray:
    """Pearson correlation from co-moments ``[..., F, F]`` (any scale); NaN where a feature never varies."""
    sd = np.sqrt(np.clip(np.diagonal(cov, axis1=-2, axis2=-1), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / (sd[..., :, None] * sd[..., None, :])
    bad = sd < 1e-12
    if not bad.any():  # the usual case: no pass over the whole matrix to mark them (it is [F, F], 1M at 16 x 64)
        return r
    if r.ndim == 2:
        r[bad, :] = np.nan
        r[:, bad] = np.nan
        return r
    return np.where(bad[..., :, None] | bad[..., None, :], np.nan, r)


def _pairs(r: np.ndarray, L: int, E: int) -> np.ndarray:
    """``[L, L, E*E]``: each layer pair's expert-pair correlations (a layer with itself: NaN, not a link)."""
    out = np.moveaxis(r.reshape(L, E, L, E), 1, 2).reshape(L, L, E * E).copy()
    out[np.arange(L), np.arange(L)] = np.nan
    return out


def _select(r: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` expert pairs of largest |r| per layer pair, ``[L, L, m]``, and their signs."""
    a = np.nan_to_num(np.abs(r), nan=-1.0)
    idx = np.argpartition(-a, m - 1, axis=-1)[..., :m]
    return idx, np.sign(np.nan_to_num(np.take_along_axis(r, idx, -1)))


def _held_out(r: np.ndarray, idx: np.ndarray, sign: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(sign * np.take_along_axis(r, idx, -1), -1)


def held_out_link(W: np.ndarray, used: np.ndarray, L: int, E: int, m: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``V [L, L]``, its values with each used block left out ``[n, L, L]`` and the t test's degrees of freedom.

    None if a half has under 2 blocks. Degrees of freedom: the smaller half's blocks - 1, since
    each direction's noise comes from one half only (with all blocks - 1 a pair's p under 0.001
    came 3x too often on i.i.d. routing; with the half's, at its rate).

    ``V[a, b]``: the ``m`` expert pairs (default E / 8) most correlated within documents in one
    half of the documents, their signed correlation in the other half, averaged over both ways.
    Held-out documents see none of the noise that picked the pairs, so V is 0 without a link; one
    strongly coupled expert pair, or a copy of one layer by the next for 5% of tokens, stands out
    where a mean over all E x E pairs drowned it. The picks are fixed while blocks are left out.
    """
    half = np.arange(W.shape[0]) % 2
    parts = [used & (half == h) for h in (0, 1)]
    if min(int(p.sum()) for p in parts) < 2:
        return None
    m = int(np.clip(m or E // 8, 1, E * E))
    tot = [W[p].sum(0) for p in parts]
    r = [_pairs(corr_from_cov(t), L, E) for t in tot]
    picks = [_select(x, m) for x in r]
    value = lambda ra, rb: 0.5 * (_held_out(rb, *picks[0]) + _held_out(ra, *picks[1]))  # noqa: E731
    loo = []
    for b in np.nonzero(used)[0]:
        h = half[b]
        rb = _pairs(corr_from_cov(tot[h] - W[b]), L, E)
        loo.append(value(rb, r[1]) if h == 0 else value(r[0], rb))
    return value(*r), np.stack(loo), min(int(p.sum()) for p in parts) - 1
