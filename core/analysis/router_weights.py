"""Router weight analysis: how similar the routers of different layers are, and how low-rank each is.

A router is an ``[E, H]`` matrix whose rows are the directions in hidden space that pull a
token towards each expert. A softmax router routes identically after ``W + 1cᵀ``, so its rows
are centred (mean over experts removed) before any comparison; a sigmoid router is used as is
(:func:`core.analysis.measures.center_router_rows`). Two comparisons between layers:
identity-matched cosine (is expert e's row the same direction in both layers?), which assumes
expert e means the same thing in both, and permutation-invariant ones (Hungarian-matched cosine,
principal angles between the row spaces, linear CKA), which do not. The Hungarian-matched cosine
is well above 0 for unrelated routers, so it comes with a null: the same statistic against the
other layer with its experts' rows mixed by a random rotation that keeps the router's covariance
(:mod:`core.analysis.router_null`; a rotation in hidden space would break the anisotropy real
routers share and make every pair look related). Spectra
show how many directions a router really uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.analysis.measures import center_router_rows, check_score_fn, require_score_fn, score_fn_of
from core.analysis.results import ResultMixin
from core.analysis.router_null import hungarian_cosine, pair_nulls

Weights = Mapping[int, "torch.Tensor | np.ndarray"]


def _unit_rows(w: np.ndarray) -> np.ndarray:
    return w / np.clip(np.linalg.norm(w, axis=1, keepdims=True), 1e-300, None)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same examples (rows), features in columns.

    Invariant to orthogonal transforms (so to permutations) of either side's features.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    num = np.linalg.norm(x.T @ y) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


@dataclass
class RouterSimilarity(ResultMixin):
    """Similarity between the routers of every pair of layers (axis order = ``layers``).

    Rows are centred first when ``centered`` (softmax routers: ``score_fn``), so routers that
    route identically compare as identical.

    - ``matched_cosine[a, b]``: mean over e of cos(W_a[e], W_b[e]) (expert identity assumed)
    - ``hungarian_cosine[a, b]``: Hungarian-matched cosine, the same after the best one-to-one
      matching of experts. Its null: ``hungarian_null_mean/low/high[a, b]`` = mean and 2.5/97.5%
      quantiles of the statistic between layer a and layer b with b's expert rows mixed by a
      Haar-random rotation fixing the all-ones vector (b's mean row and covariance kept, any
      correspondence destroyed), ``num_null`` draws, ``num_null_adjacent`` for adjacent layers;
      ``hungarian_p[a, b]`` = (1 + #{null >= observed}) / (1 + draws), and ``hungarian_p_adjusted``
      the adjacent pairs' p after Holm's correction over the L - 1 of them (NaN elsewhere): the
      verdict a finding reports. Diagonals are NaN.
    - ``subspace_similarity[a, b]``: mean cos^2 of the principal angles between the row
      spaces (1 = same subspace); ``subspace_baseline`` = rank/H, its expected value for random
      routers (rank = E-1 for centred rows, else E, at most H)
    - ``cka[a, b]``: linear CKA of W_a^T and W_b^T (hidden dims as examples)
    """

    layers: list[int]
    matched_cosine: np.ndarray  # [L, L]
    hungarian_cosine: np.ndarray  # [L, L]
    subspace_similarity: np.ndarray  # [L, L]
    cka: np.ndarray  # [L, L]
    subspace_baseline: float
    hungarian_null_mean: np.ndarray  # [L, L]
    hungarian_null_low: np.ndarray  # [L, L]
    hungarian_null_high: np.ndarray  # [L, L]
    hungarian_p: np.ndarray  # [L, L]
    num_null: int
    seed: int
    score_fn: str
    centered: bool
    hungarian_p_adjusted: np.ndarray  # [L, L], adjacent pairs only
    num_null_adjacent: int


@dataclass
class RouterSubspaces(ResultMixin):
    """Spectrum and effective rank of each layer's router ``[E, H]`` (rows centred when ``centered``).

    ``singular_values[l]`` is descending (NaN-padded if layers differ in size);
    ``effective_rank`` = exp(entropy of s / sum s) (Roy & Vetterli 2007);
    ``stable_rank`` = ||W||_F^2 / ||W||_2^2; ``rank_at_energy`` = components needed for
    ``energy`` of the squared spectrum; ``row_norms[l, e]`` = ||W[e]||. A centred softmax router
    has rank at most E-1: the direction it loses never affected routing.
    """

    layers: list[int]
    singular_values: np.ndarray  # [L, min(E, H)]
    explained_energy: np.ndarray  # [L, min(E, H)] cumulative share of s^2
    effective_rank: np.ndarray  # [L]
    stable_rank: np.ndarray  # [L]
    rank_at_energy: np.ndarray  # [L]
    energy: float
    row_norms: np.ndarray  # [L, E]
    score_fn: str
    centered: bool


def row_space_basis(w: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[rank, H]`` of the row space (rank cut as in ``scipy.linalg.orth``)."""
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    tol = (s[0] if s.size else 0.0) * max(w.shape) * np.finfo(float).eps
    return vt[: int(np.sum(s > tol))]


def _pair_measures(wa: np.ndarray, wb: np.ndarray, ua: np.ndarray, ub: np.ndarray, ba: np.ndarray, bb: np.ndarray) -> dict[str, float]:
    """Every similarity of one pair of layers; ``b*`` are row-space bases (mean cos² of principal angles)."""
    cos = ua @ ub.T
    k = min(ba.shape[0], bb.shape[0])
    return {
        "mc": float(np.mean(np.diagonal(cos))) if wa.shape[0] == wb.shape[0] else np.nan,
        "hc": hungarian_cosine(cos),
        "ss": float(np.sum((ba @ bb.T) ** 2) / k) if k else np.nan,
        "cka": linear_cka(wa.T, wb.T),
    }


class RouterAnalyzer:
    """Router weight analyses; ``model`` is a ``MoEModelWrapper`` or ``None`` to pass weights directly.

    ``score_fn`` ("softmax" centres the rows, "sigmoid" does not): given per call, else here, else
    the wrapper's own; with none of them an analysis raises a TypeError (no default: centring a
    sigmoid router changes its answer).
    """

    def __init__(self, model: Any | None = None, score_fn: str | None = None) -> None:
        self.model = model
        self.score_fn = None if score_fn is None else check_score_fn(score_fn)

    def extract_all_router_weights(self) -> dict[int, torch.Tensor]:
        """``{model layer index: [E, H]}`` from the wrapper."""
        if self.model is None:
            raise ValueError("RouterAnalyzer was built without a model; pass router weights to the methods directly")
        return self.model.get_router_weights()

    def _score_fn(self, score_fn: str | None) -> str:
        for given in (score_fn, self.score_fn, score_fn_of(self.model)):
            if given is not None:
                return check_score_fn(given)
        return require_score_fn(None, "RouterAnalyzer")

    def _weights(self, router_weights: Weights | None, score_fn: str) -> tuple[list[int], list[np.ndarray]]:
        if router_weights is None:
            router_weights = self.extract_all_router_weights()
        if not router_weights:
            raise ValueError("no router weights given")
        layers = sorted(router_weights)
        mats = []
        for l in layers:
            try:
                mats.append(center_router_rows(router_weights[l], score_fn))
            except ValueError as err:
                raise ValueError(f"router weight of layer {l}: {err}") from None
        return layers, mats

    def compute_router_similarity_matrix(
        self, router_weights: Weights | None = None, num_null: int = 100, seed: int = 0, score_fn: str | None = None
    ) -> RouterSimilarity:
        """Layer-by-layer router similarity, matched and permutation-invariant, with the Hungarian null."""
        if num_null < 1:
            raise ValueError(f"num_null must be >= 1, got {num_null}")
        score_fn = self._score_fn(score_fn)
        layers, W = self._weights(router_weights, score_fn)
        H = {m.shape[1] for m in W}
        if len(H) != 1:
            raise ValueError(f"routers read hidden states of different sizes {sorted(H)}; cannot compare")
        h = H.pop()
        L = len(layers)
        U = [_unit_rows(m) for m in W]
        B = [row_space_basis(m) for m in W]
        out = {k: np.eye(L) for k in ("mc", "hc", "ss", "cka")}
        for a in range(L):
            for b in range(a + 1, L):
                for key, v in _pair_measures(W[a], W[b], U[a], U[b], B[a], B[b]).items():
                    out[key][a, b] = out[key][b, a] = v
        null, adjacent = pair_nulls(layers, U, W, out["hc"], num_null, seed)
        centered = score_fn == "softmax"
        rank = min(W[0].shape[0] - (1 if centered else 0), h)
        return RouterSimilarity(
            layers, out["mc"], out["hc"], out["ss"], out["cka"], rank / h,
            null["mean"], null["low"], null["high"], null["p"], num_null, seed, score_fn, centered,
            null["p_adjusted"], adjacent,
        )

    def analyze_router_subspaces(
        self, router_weights: Weights | None = None, energy: float = 0.9, score_fn: str | None = None
    ) -> RouterSubspaces:
        """SVD spectrum, effective rank and stable rank of each router."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        score_fn = self._score_fn(score_fn)
        layers, W = self._weights(router_weights, score_fn)
        svs = [np.linalg.svd(m, compute_uv=False) for m in W]
        r = max(len(s) for s in svs)
        S = np.full((len(W), r), np.nan)
        cum = np.full((len(W), r), np.nan)
        eff, stable, rk = [], [], []
        for i, s in enumerate(svs):
            S[i, : len(s)] = s
            e2 = np.cumsum(s**2) / np.sum(s**2)
            cum[i, : len(s)] = e2
            p = s / s.sum()
            p = p[p > 0]
            eff.append(float(np.exp(-(p * np.log(p)).sum())))
            stable.append(float((s**2).sum() / s[0] ** 2))
            rk.append(int(np.searchsorted(e2, energy - 1e-12) + 1))
        E = max(m.shape[0] for m in W)
        norms = np.full((len(W), E), np.nan)
        for i, m in enumerate(W):
            norms[i, : m.shape[0]] = np.linalg.norm(m, axis=1)
        return RouterSubspaces(
            layers, S, cum, np.array(eff), np.array(stable), np.array(rk), energy, norms, score_fn, score_fn == "softmax"
        )
