"""Expert-level heatmaps of one layer (or one layer pair) at a time, chosen in a dropdown.

A whole model's expert-level matrix ((L*E) x (L*E), or one E x E figure per layer) grows
with depth and width until the page no longer opens; these figures hold a bounded set of
layer blocks (the caller picks which, see ``viz.matrix_views``) and show one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import (
    DIVERGING,
    FigureInputError,
    as_array,
    blank_diagonal,
    check_len,
    colour_range,
    compact,
    diagonal_marks,
    esc,
    finish,
    heatmap_height,
    pick_one,
)
from viz.figures_specialization import domain_specialization_heatmap


def _experts(given: Sequence[Sequence[int]] | None, i: int, size: int, name: str) -> list[str]:
    """Axis labels (expert indices as text) for option ``i``; all experts when none are given."""
    if given is None:
        return [str(e) for e in range(size)]
    ids = check_len(given[i], size, f"{name}[{i}]", "its matrix")
    return [str(int(e)) for e in ids]


def _blocks(matrices: Sequence[np.ndarray] | np.ndarray, count: int, name: str) -> list[np.ndarray]:
    blocks = [as_array(m, 2, f"{name}[{i}]") for i, m in enumerate(matrices)]
    check_len(blocks, count, name, "the options")
    if not blocks:
        raise FigureInputError(f"{name}: no matrices to show")
    return blocks


def correlation_by_layer_pair(
    blocks: Sequence[np.ndarray],
    pairs: Sequence[tuple[int, int]],
    experts_a: Sequence[Sequence[int]] | None = None,
    experts_b: Sequence[Sequence[int]] | None = None,
    scores: Sequence[float] | None = None,
    shown: int = 0,
    title: str | None = None,
    measure: str = "Pearson r",
    span: float = 1.0,
) -> go.Figure:
    """Expert x expert correlation between two MoE layers, one layer pair at a time.

    ``blocks[i]`` is ``[Ea, Eb]`` for ``pairs[i] = (layer_a, layer_b)`` (model layer indices);
    ``experts_a/b[i]`` name its rows/columns when they are a subset of the experts;
    ``scores[i]`` (e.g. the pair's mean |r|) is shown in the menu. Colours span ±``span``.
    """
    pairs = [(int(a), int(b)) for a, b in pairs]
    mats = _blocks(blocks, len(pairs), "blocks")
    fig = go.Figure()
    for i, ((la, lb), z) in enumerate(zip(pairs, mats)):
        fig.add_trace(go.Heatmap(
            z=compact(z), x=_experts(experts_b, i, z.shape[1], "experts_b"), y=_experts(experts_a, i, z.shape[0], "experts_a"),
            colorscale=DIVERGING, zmin=-span, zmax=span, zmid=0.0, colorbar={"title": {"text": esc(measure)}},
            hovertemplate=f"layer {la} expert %{{y}} vs layer {lb} expert %{{x}}<br>{esc(measure)} %{{z:.3f}}<extra></extra>",
        ))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    head = title or f"Expert-level {measure} between two layers"
    titles = [f"{head}: layer {la} vs layer {lb}" for la, lb in pairs]
    score = [""] * len(pairs) if scores is None else [f" ({float(s):.3f})" for s in check_len(scores, len(pairs), "scores", "pairs")]
    rows = max(z.shape[0] for z in mats)
    finish(fig, titles[shown], "expert of the second layer (columns)", "expert of the first layer (rows)",
           height=heatmap_height(rows, per_row=10))
    return pick_one(fig, [f"L{la} – L{lb}{s}" for (la, lb), s in zip(pairs, score)], titles, shown)


def coactivation_by_layer(
    matrices: Sequence[np.ndarray] | np.ndarray,
    layers: Sequence[int],
    experts: Sequence[Sequence[int]] | None = None,
    shown: int = 0,
    title: str | None = None,
    measure: str = "co-activation rate",
) -> go.Figure:
    """Within-layer expert x expert co-activation ``[E', E']`` of one MoE layer at a time.

    ``experts[i]`` names the rows and columns of ``matrices[i]`` when they are a subset of
    the layer's experts (e.g. its most used ones). The diagonal (an expert with itself, P = 1)
    is blank so the colours span the pairs of different experts; hovering there says so.
    """
    layers = [int(v) for v in layers]
    mats = _blocks(matrices, len(layers), "matrices")
    fig = go.Figure()
    for i, (layer, z) in enumerate(zip(layers, mats)):
        if z.shape[0] != z.shape[1]:
            raise FigureInputError(f"matrices[{i}]: expected a square matrix, got shape {z.shape}")
        ids = _experts(experts, i, z.shape[0], "experts")
        off = blank_diagonal(z)
        fig.add_trace(go.Heatmap(
            z=compact(off), x=ids, y=ids, **colour_range(off), colorbar={"title": {"text": esc(measure)}},
            hovertemplate=f"layer {layer}<br>expert %{{y}} with expert %{{x}}<br>{esc(measure)} %{{z:.4f}}<extra></extra>",
        ))
        fig.add_trace(diagonal_marks(ids, np.diag(z), f"layer {layer}<br>expert %{{y}} with itself"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    head = title or "Expert co-activation"
    titles = [f"{head} in layer {layer}" for layer in layers]
    finish(fig, titles[shown], "expert index", "expert index", height=heatmap_height(max(z.shape[0] for z in mats), per_row=10))
    return pick_one(fig, [f"layer {layer}" for layer in layers], titles, shown)


def domain_specialization_by_layer(
    share: np.ndarray,
    domains: Sequence[str],
    layers: Sequence[int],
    baseline: np.ndarray | float | None = None,
    shown: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Each domain's routing share per expert ``[D, E]`` of one MoE layer at a time (``share [L', D, E]``).

    The options are :func:`domain_specialization_heatmap` figures of each layer, so a deep
    model gets one figure with a layer menu instead of a figure per layer.
    """
    share = as_array(share, 3, "share")
    layers = [int(v) for v in check_len(layers, share.shape[0], "layers", "share")]
    figs = [domain_specialization_heatmap(share[i], domains, baseline, layer=layer) for i, layer in enumerate(layers)]
    fig = figs[0]
    for other in figs[1:]:
        fig.add_traces(list(other.data))
    head = title or "Domain specialization of experts"
    return pick_one(fig, [f"layer {layer}" for layer in layers], [f"{head} in layer {layer}" for layer in layers], shown)
