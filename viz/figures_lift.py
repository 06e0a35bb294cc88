"""Co-activation as lift over independence, one layer at a time (OLMoE's Fig. 21, on a log scale about 1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import (DIVERGING, FigureInputError, blank_diagonal, compact, diagonal_marks, finish, heatmap_height,
                         pick_one)

_CAP = 3.0  # log2 lift drawn within ±3 (1/8 to 8 times independence); hover gives the value


def lift_by_layer(matrices: Sequence[np.ndarray], layers: Sequence[int], experts: Sequence[Sequence[int]],
                  null_lift: Sequence[np.ndarray] | None = None, shown: int = 0,
                  title: str = "Co-activation lift over independence") -> go.Figure:
    """``matrices[i]`` ``[E', E']`` lift of layer ``layers[i]`` among ``experts[i]``; colour log2 lift, white at 1.

    A lift is a ratio: 2 and 1/2 are as far from independence, so the colour is its log, diverging
    about 1 (independence), with ticks in lift units. The diagonal is blank (an expert with itself).
    ``null_lift``: the within-document null of each cell, shown on hover.
    """
    if len(matrices) != len(layers) or len(experts) != len(layers):
        raise FigureInputError(f"matrices, layers and experts must have one entry per layer ({len(layers)})")
    ticks = np.arange(-_CAP, _CAP + 1)
    fig = go.Figure()
    for i, (layer, z, ids) in enumerate(zip(layers, matrices, experts)):
        z = blank_diagonal(np.asarray(z, float))
        if z.shape != (len(ids), len(ids)):
            raise FigureInputError(f"matrices[{i}]: expected shape {(len(ids), len(ids))}, got {z.shape}")
        with np.errstate(divide="ignore", invalid="ignore"):
            logz = np.clip(np.log2(z), -_CAP, _CAP)
        nul = np.full_like(z, np.nan) if null_lift is None else np.asarray(null_lift[i], float)
        names = [str(int(e)) for e in ids]
        fig.add_trace(go.Heatmap(
            z=compact(logz), x=names, y=names, customdata=compact(np.stack([z, nul], -1)), visible=i == shown,
            colorscale=DIVERGING, zmid=0.0, zmin=-_CAP, zmax=_CAP,
            colorbar={"title": {"text": "lift (log scale)"}, "tickvals": ticks.tolist(),
                      "ticktext": [f"{2.0 ** t:g}" for t in ticks]},
            hovertemplate=(f"layer {int(layer)}<br>experts %{{y}} and %{{x}}<br>lift %{{customdata[0]:.3f}}"
                           "<br>within-document null %{customdata[1]:.3f}<extra></extra>"),
        ))
        fig.add_trace(diagonal_marks(names, np.full(len(names), np.nan), f"layer {int(layer)}<br>expert %{{y}} with itself",
                                     visible=i == shown))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    titles = [f"{title}, layer {int(layer)}" for layer in layers]
    finish(fig, titles[shown], "expert j", "expert i", height=heatmap_height(max(len(e) for e in experts), per_row=10))
    return pick_one(fig, [f"layer {int(layer)}" for layer in layers], titles, shown)
