"""The papers' own views: OLMoE's Fig. 22 / Mixtral's Fig. 7 (each domain's share per expert) and OLMoE's Fig. 23."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import FigureInputError, compact, esc, finish, pick_one

_COLOURS = ("#3b7dd8", "#e4572e", "#17a398", "#8e44ad", "#f3a712", "#555555", "#c0392b", "#16a085")


def domain_shares_per_expert(share: np.ndarray, domains: Sequence[str], layers: Sequence[int], baseline: float,
                             experts: Sequence[Sequence[int]] | None = None, shown: int = 0) -> go.Figure:
    """``share[i, d, e]``: share of domain d's tokens routed to expert e at layer ``layers[i]``, bars per expert.

    One group of bars per expert, one bar per domain, and the uniform k/E as a dashed line, one
    layer at a time (a menu picks it): OLMoE's Fig. 22 and Mixtral's Fig. 7.
    ``experts[i]``: which experts layer i shows (all by default).
    """
    share = np.asarray(share, float)
    if share.ndim != 3 or share.shape[:2] != (len(layers), len(domains)):
        raise FigureInputError(f"share: expected [layers, domains, experts] = [{len(layers)}, {len(domains)}, E], got {share.shape}")
    fig = go.Figure()
    for i, layer in enumerate(layers):
        ids = np.arange(share.shape[2]) if experts is None else np.asarray(experts[i])
        names = [str(int(e)) for e in ids]
        for d, dom in enumerate(domains):
            fig.add_trace(go.Bar(x=names, y=compact(100 * share[i, d, ids]), name=esc(dom),
                                 marker_color=_COLOURS[d % len(_COLOURS)], legendgroup=esc(dom), showlegend=True,
                                 hovertemplate=f"layer {int(layer)}<br>expert %{{x}}<br>{esc(dom)}: %{{y:.2f}}% of its tokens<extra></extra>"))
        fig.add_trace(go.Scatter(x=[names[0], names[-1]], y=[100 * baseline] * 2, mode="lines", name="uniform k/E",
                                 line={"dash": "dash", "color": "#444"}, hoverinfo="skip"))
    fig.update_xaxes(type="category")
    titles = [f"Share of each domain's tokens per expert, layer {int(layer)}" for layer in layers]
    finish(fig, titles[shown], "expert", "% of the domain's tokens", height=480)
    fig.update_layout(barmode="group", bargap=0.15, legend={"orientation": "h", "x": 0, "y": -0.22, "yanchor": "top"},
                      margin={"b": 120})
    return pick_one(fig, [f"layer {int(layer)}" for layer in layers], titles, shown)


def vocabulary_per_expert(value: np.ndarray, tokens: Sequence[Sequence[str]], layers: Sequence[int], floor: float,
                          shown: int = 0) -> go.Figure:
    """``value[i, e]``: the vocabulary specialization of expert e's top token at layer ``layers[i]`` (OLMoE's Fig. 23).

    A token's specialization toward an expert is the fraction of its occurrences routed to that
    expert (top-k); ``floor`` is k/E, what an id routed uniformly shows. Hover names the token.
    """
    value = np.asarray(value, float)
    if value.shape[0] != len(layers) or len(tokens) != len(layers):
        raise FigureInputError(f"value and tokens need one row per layer ({len(layers)})")
    fig = go.Figure()
    for i, layer in enumerate(layers):
        names = [str(e) for e in range(value.shape[1])]
        fig.add_trace(go.Bar(x=names, y=compact(value[i]), customdata=[esc(t) for t in tokens[i]], marker_color="#3b7dd8",
                             name="top token", hovertemplate=f"layer {int(layer)}<br>expert %{{x}}<br>top token %{{customdata}}"
                                                             "<br>specialization %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[names[0], names[-1]], y=[floor, floor], mode="lines", name="uniform k/E",
                                 line={"dash": "dash", "color": "#444"}, hoverinfo="skip"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 1.02])
    titles = [f"Vocabulary specialization of each expert's top token, layer {int(layer)}" for layer in layers]
    finish(fig, titles[shown], "expert", "share of the token's occurrences", height=420)
    return pick_one(fig, [f"layer {int(layer)}" for layer in layers], titles, shown)
