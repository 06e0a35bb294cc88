"""The null of the Hungarian-matched cosine between two routers: one router's expert rows mixed by a random rotation.

Two routers with no expert correspondence still match well when both are anisotropic (trained
routers share a few dominant hidden directions): a null that rotates one router in hidden space
moves it off those directions, so it sits far below any pair of real routers and flags them all
(60 of 60 independent anisotropic pairs at p < 0.05). This null instead mixes router b's rows,
``W_b' = Q W_b`` with ``Q`` a Haar-random ``E x E`` orthogonal matrix that fixes the all-ones
vector: the mean row (what all experts share) is kept, ``W_b'ᵀ W_b' = W_bᵀ W_b`` (the hidden-space
covariance) exactly, and which row belongs to which expert is lost. For rows drawn iid from any
Gaussian, ``Q W_b`` has the distribution of ``W_b`` itself, so the test is exact there.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.analysis.measures import draws_for_holm, layer_rng, random_orthonormal_frame
from core.analysis.resampling import holm, interval, p_value


def hungarian_cosine(cos: np.ndarray) -> float:
    """Mean cosine after the best one-to-one matching of the rows of ``cos`` to its columns."""
    r, c = linear_sum_assignment(-cos)
    return float(cos[r, c].mean())


@lru_cache(maxsize=16)
def _complement_basis(e: int) -> np.ndarray:
    """``[e, e-1]`` orthonormal basis of the vectors orthogonal to the all-ones vector."""
    q, _ = np.linalg.qr(np.eye(e) - 1.0 / e)
    return q[:, : e - 1]


def rotation_fixing_ones(e: int, rng: np.random.Generator) -> np.ndarray:
    """``[e, e]`` Haar-random orthogonal matrix with ``Q 1 = 1``: a random rotation of the complement of 1/√e·1."""
    if e < 2:
        return np.ones((e, e))
    p = _complement_basis(e)
    return np.full((e, e), 1.0 / e) + p @ random_orthonormal_frame(e - 1, e - 1, rng) @ p.T


def mixed_rows_null(unit_a: np.ndarray, wb: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``[draws]`` Hungarian-matched cosine of ``unit_a`` (unit rows of router a) against router ``wb`` with its rows mixed.

    Works on ``E x E`` products only: the cosines are ``unit_a W_bᵀ Qᵀ`` over the norms of the
    rows of ``Q W_b``, ``sqrt(diag(Q W_b W_bᵀ Qᵀ))``, so a draw costs no product in hidden space.
    """
    cross = unit_a @ wb.T  # [Ea, Eb]
    gram = wb @ wb.T  # [Eb, Eb]
    out = np.empty(draws)
    for t in range(draws):
        q = rotation_fixing_ones(wb.shape[0], rng)
        norms = np.sqrt(np.clip(np.einsum("ij,ij->i", q @ gram, q), 0.0, None))
        out[t] = hungarian_cosine((cross @ q.T) / np.clip(norms, 1e-300, None)[None])
    return out


def pair_nulls(layers: list[int], unit_rows: list[np.ndarray], weights: list[np.ndarray], observed: np.ndarray,
               num_null: int, seed: int) -> tuple[dict[str, np.ndarray], int]:
    """``{mean, low, high, p, p_adjusted}`` ``[L, L]`` of the mixed-rows null for every pair of layers, and the adjacent draws.

    For pair (a, b), a < b, layer b's rows are mixed, ``num_null`` times from a stream seeded by
    ``seed`` and both model layer indices (so a pair's null does not depend on the other layers);
    the result is mirrored. Adjacent pairs, the ones a finding counts, get enough draws for their
    permutation p to pass Holm's correction over the ``L - 1`` of them (:func:`draws_for_holm`):
    ``p_adjusted`` holds it there and NaN elsewhere. Diagonals are NaN.
    """
    L = len(layers)
    adjacent = draws_for_holm(num_null, L - 1)
    out = {k: np.full((L, L), np.nan) for k in ("mean", "low", "high", "p", "p_adjusted")}
    for a in range(L):
        for b in range(a + 1, L):
            null = mixed_rows_null(unit_rows[a], weights[b], adjacent if b == a + 1 else num_null,
                                   layer_rng(seed, layers[a], layers[b]))
            low, high = interval(null)
            for k, v in zip(("mean", "low", "high", "p"), (null.mean(), low, high, p_value(observed[a, b], null))):
                out[k][a, b] = out[k][b, a] = v
    i = np.arange(L - 1)
    out["p_adjusted"][i, i + 1] = out["p_adjusted"][i + 1, i] = holm(out["p"][i, i + 1])
    return out, adjacent
