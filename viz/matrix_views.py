"""Which parts of a large expert-level matrix the report embeds, and its strongest entries.

The report must stay light at any model shape, so it embeds a bounded set of layers, layer
pairs and experts; the full matrices stay in the run's ``arrays.safetensors``. Everything
here reads blocks or one layer's rows at a time, never a temporary the size of the matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

MAX_OPTIONS = 16  # layers or layer pairs one dropdown figure embeds
MAX_EXPERTS = 128  # experts per axis above which only the most used are shown
MAX_COLUMNS = 2048  # (layer, expert) columns of a pattern figure above which only the strongest are shown


def spread(n: int, cap: int = MAX_OPTIONS) -> list[int]:
    """At most ``cap`` positions of ``range(n)``, evenly spaced, first and last included."""
    if n <= cap:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, max(cap, 2))})


def spread_with(n: int, keep: int, cap: int = MAX_OPTIONS) -> list[int]:
    """:func:`spread` positions that surely include ``keep`` (the layer a finding names, which the figure opens on)."""
    shown = spread(n, cap)
    return shown if keep in shown else sorted(set(spread(n, cap - 1)) | {keep})


def layer_pairs(layer_scores: np.ndarray, cap: int = MAX_OPTIONS) -> list[tuple[int, int]]:
    """Layer pairs (positions, a < b) worth showing: adjacent pairs, then the strongest others, ``cap`` in all.

    Every adjacent pair when there are fewer than ``cap``; else three quarters of the budget on
    evenly spaced adjacent pairs. The rest goes to the pairs with the largest ``layer_scores``.
    """
    m = np.asarray(layer_scores, dtype=float)
    L = m.shape[0]
    adjacent = [(i, i + 1) for i in range(L - 1)]
    n_adj = len(adjacent) if len(adjacent) < cap else cap - cap // 4
    chosen = [adjacent[i] for i in spread(len(adjacent), n_adj)]
    i, j = np.triu_indices(L, k=1)
    vals = np.nan_to_num(m[i, j], nan=-np.inf)
    for k in np.argsort(-vals, kind="stable"):
        if len(chosen) >= cap:
            break
        if (int(i[k]), int(j[k])) not in chosen:
            chosen.append((int(i[k]), int(j[k])))
    return sorted(chosen)


def strongest(pairs: Sequence[tuple[int, int]], layer_scores: np.ndarray) -> int:
    """Index of the pair with the largest score (the one a figure opens on)."""
    vals = [np.nan_to_num(float(layer_scores[a, b]), nan=-np.inf) for a, b in pairs]
    return int(np.argmax(vals)) if vals else 0


def top_experts(usage: np.ndarray | None, num_experts: int, cap: int = MAX_EXPERTS) -> np.ndarray:
    """All experts when there are at most ``cap``, else the ``cap`` most used (by index order)."""
    if num_experts <= cap:
        return np.arange(num_experts)
    score = np.zeros(num_experts) if usage is None else np.nan_to_num(np.asarray(usage, dtype=float), nan=-np.inf)
    return np.sort(np.argsort(-score, kind="stable")[:cap])


def block(matrix: np.ndarray, num_experts: int, a: int, b: int) -> np.ndarray:
    """The ``[E, E]`` block between layer positions a and b of an ``[L*E, L*E]`` matrix (a view)."""
    E = num_experts
    return matrix[a * E:(a + 1) * E, b * E:(b + 1) * E]


def _top_cells(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the ``n`` largest |values| (NaN last; ties in index order).

    The n largest row maxima are n cells, so every one of the n largest cells is at least the
    smallest of them: only cells reaching it are sorted (one layer's slab at 60 x 256 is 3.9M
    cells; partitioning all of them took 30-40 ms a layer).
    """
    mag = np.nan_to_num(np.abs(values), nan=-1.0)
    flat = mag.ravel()
    n = min(n, flat.size)
    if mag.ndim == 2 and mag.shape[0] > n > 0:
        row_max = mag.max(1)
        candidates = np.flatnonzero(flat >= np.partition(row_max, row_max.size - n)[row_max.size - n])
    else:
        candidates = np.arange(flat.size)
    top = candidates[np.argsort(-flat[candidates], kind="stable")[:n]]
    return np.unravel_index(top, values.shape)


def pair_table(matrix: np.ndarray, num_experts: int, layers: Sequence[int], pairs: Sequence[tuple[int, int]],
               n: int = 10, value: str = "corr") -> pd.DataFrame:
    """The ``n`` strongest expert pairs (by |value|) within each of ``pairs`` (layer positions)."""
    rows = []
    for a, b in pairs:
        blk = block(matrix, num_experts, a, b)
        r, c = _top_cells(blk, n)
        rows += [(layers[a], int(i), layers[b], int(j), float(blk[i, j])) for i, j in zip(r, c)]
    return pd.DataFrame(rows, columns=["layer_a", "expert_a", "layer_b", "expert_b", value])


def per_layer_table(matrix: np.ndarray, num_experts: int, layers: Sequence[int], n: int = 3,
                    value: str = "corr") -> pd.DataFrame:
    """Each layer's ``n`` strongest expert pairs with any other layer (by |value|), one layer's rows at a time."""
    E, rows = num_experts, []
    for a, layer in enumerate(layers):
        slab = np.array(matrix[a * E:(a + 1) * E], dtype=np.float32)  # [E, L*E], own layer blanked below
        slab[:, a * E:(a + 1) * E] = np.nan
        r, c = _top_cells(slab, n)
        rows += [(layer, int(i), layers[j // E], int(j % E), float(slab[i, j])) for i, j in zip(r, c)]
    return pd.DataFrame(rows, columns=["layer_a", "expert_a", "layer_b", "expert_b", value])


def strongest_columns(atoms: np.ndarray, cap: int = MAX_COLUMNS) -> np.ndarray | None:
    """The ``cap`` columns of ``atoms [P, C]`` with the largest |weight| in any pattern, in column order (None: all fit)."""
    if atoms.shape[1] <= cap:
        return None
    score = np.nan_to_num(np.abs(np.asarray(atoms, dtype=float)).max(0), nan=-1.0)
    return np.sort(np.argsort(-score, kind="stable")[:cap])
