"""Router weight analysis: how similar the routers of different layers are, and how low-rank each is.

A router is an ``[E, H]`` matrix whose rows are the directions in hidden space that pull a
token towards each expert. Two comparisons between layers: matched-expert cosine (is expert
e's row the same direction in both layers?), which assumes expert e means the same thing in
both, and permutation-invariant ones (optimally matched cosine, principal angles between the
row spaces, linear CKA), which do not. Spectra show how many directions a router really uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import subspace_angles
from scipy.optimize import linear_sum_assignment

from core.analysis.measures import to_numpy
from core.analysis.results import ResultMixin

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

    - ``matched_cosine[a, b]``: mean over e of cos(W_a[e], W_b[e]) (expert identity assumed)
    - ``hungarian_cosine[a, b]``: the same after the best one-to-one matching of experts
    - ``subspace_similarity[a, b]``: mean cos^2 of the principal angles between the row
      spaces (1 = same subspace); ``subspace_baseline`` = E/H, its expected value for
      random routers
    - ``cka[a, b]``: linear CKA of W_a^T and W_b^T (hidden dims as examples)
    """

    layers: list[int]
    matched_cosine: np.ndarray  # [L, L]
    hungarian_cosine: np.ndarray  # [L, L]
    subspace_similarity: np.ndarray  # [L, L]
    cka: np.ndarray  # [L, L]
    subspace_baseline: float


@dataclass
class RouterSubspaces(ResultMixin):
    """Spectrum and effective rank of each layer's router ``[E, H]``.

    ``singular_values[l]`` is descending (NaN-padded if layers differ in size);
    ``effective_rank`` = exp(entropy of s / sum s) (Roy & Vetterli 2007);
    ``stable_rank`` = ||W||_F^2 / ||W||_2^2; ``rank_at_energy`` = components needed for
    ``energy`` of the squared spectrum; ``row_norms[l, e]`` = ||W[e]||.
    """

    layers: list[int]
    singular_values: np.ndarray  # [L, min(E, H)]
    explained_energy: np.ndarray  # [L, min(E, H)] cumulative share of s^2
    effective_rank: np.ndarray  # [L]
    stable_rank: np.ndarray  # [L]
    rank_at_energy: np.ndarray  # [L]
    energy: float
    row_norms: np.ndarray  # [L, E]


class RouterAnalyzer:
    """Router weight analyses; ``model`` is a ``MoEModelWrapper`` or ``None`` to pass weights directly."""

    def __init__(self, model: Any | None = None) -> None:
        self.model = model

    def extract_all_router_weights(self) -> dict[int, torch.Tensor]:
        """``{model layer index: [E, H]}`` from the wrapper."""
        if self.model is None:
            raise ValueError("RouterAnalyzer was built without a model; pass router weights to the methods directly")
        return self.model.get_router_weights()

    def _weights(self, router_weights: Weights | None) -> tuple[list[int], list[np.ndarray]]:
        if router_weights is None:
            router_weights = self.extract_all_router_weights()
        if not router_weights:
            raise ValueError("no router weights given")
        layers = sorted(router_weights)
        mats = [to_numpy(router_weights[l]) for l in layers]
        for l, m in zip(layers, mats):
            if m.ndim != 2:
                raise ValueError(f"router weight of layer {l} must be [E, H], got shape {m.shape}")
        return layers, mats

    def compute_router_similarity_matrix(self, router_weights: Weights | None = None) -> RouterSimilarity:
        """Layer-by-layer router similarity, matched and permutation-invariant."""
        layers, W = self._weights(router_weights)
        H = {m.shape[1] for m in W}
        if len(H) != 1:
            raise ValueError(f"routers read hidden states of different sizes {sorted(H)}; cannot compare")
        L = len(layers)
        U = [_unit_rows(m) for m in W]
        out = {k: np.eye(L) for k in ("mc", "hc", "ss", "cka")}
        for a in range(L):
            for b in range(a + 1, L):
                cos = U[a] @ U[b].T
                mc = float(np.mean(np.diagonal(cos))) if W[a].shape[0] == W[b].shape[0] else np.nan
                r, c = linear_sum_assignment(-cos)
                hc = float(cos[r, c].mean())
                ang = subspace_angles(W[a].T, W[b].T)
                ss = float(np.mean(np.cos(ang) ** 2))
                ck = linear_cka(W[a].T, W[b].T)
                for key, v in (("mc", mc), ("hc", hc), ("ss", ss), ("cka", ck)):
                    out[key][a, b] = out[key][b, a] = v
        E = W[0].shape[0]
        return RouterSimilarity(layers, out["mc"], out["hc"], out["ss"], out["cka"], min(E, H.pop()) / W[0].shape[1])

    def analyze_router_subspaces(self, router_weights: Weights | None = None, energy: float = 0.9) -> RouterSubspaces:
        """SVD spectrum, effective rank and stable rank of each router."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        layers, W = self._weights(router_weights)
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
        return RouterSubspaces(layers, S, cum, np.array(eff), np.array(stable), np.array(rk), energy, norms)
