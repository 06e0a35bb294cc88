"""Figures of several runs on one set of axes: per-layer numbers with intervals, differences from a reference, training.

Every figure takes plain arrays (viz imports no analysis): one series per run, drawn in the
same colour in every figure, so a run is followed from figure to figure by its colour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import finish

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def run_colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _errors(value: np.ndarray, low: np.ndarray | None, high: np.ndarray | None) -> dict | None:
    if low is None or high is None or not np.isfinite(low).any():
        return None
    return dict(type="data", symmetric=False, array=np.nan_to_num(high - value), arrayminus=np.nan_to_num(value - low),
                thickness=1.2, width=4)


def per_layer(title: str, y_label: str, layers: Sequence[int], series: Sequence[tuple]) -> go.Figure:
    """One line per run over the MoE layers: ``series`` holds (run name, value [L], low [L] | None, high [L] | None).

    Runs are set slightly apart along x so their intervals do not hide each other.
    """
    fig = go.Figure()
    n = max(len(series), 1)
    for i, (name, value, low, high) in enumerate(series):
        value = np.asarray(value, np.float64)
        x = np.arange(len(value)) + (i - (n - 1) / 2) * 0.08
        fig.add_trace(go.Scatter(x=x, y=value, mode="lines+markers", name=str(name), line=dict(color=run_colour(i)),
                                 error_y=_errors(value, low, high),
                                 hovertemplate=f"{name}<br>layer %{{customdata}}: %{{y:.4g}}<extra></extra>",
                                 customdata=list(layers)[: len(value)]))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=[f"layer {l}" for l in layers])
    return finish(fig, title, "MoE layer", y_label, height=380)


def differences(title: str, layers: Sequence[int], reference: str, diffs: Sequence[tuple]) -> go.Figure:
    """Each run minus the reference per layer with its 95% interval; filled markers where the test tells them apart.

    ``diffs`` holds (run index, run name, diff [L], low [L], high [L], distinguishable [L]).
    """
    fig = go.Figure()
    n = max(len(diffs), 1)
    for j, (i, name, diff, low, high, dist) in enumerate(diffs):
        diff = np.asarray(diff, np.float64)
        x = np.arange(len(diff)) + (j - (n - 1) / 2) * 0.1
        symbols = ["circle" if d else "circle-open" for d in np.asarray(dist, bool)]
        fig.add_trace(go.Scatter(x=x, y=diff, mode="markers", name=f"{name} − {reference}",
                                 marker=dict(color=run_colour(i), symbol=symbols, size=10, line=dict(width=2)),
                                 error_y=_errors(diff, np.asarray(low, np.float64), np.asarray(high, np.float64)),
                                 customdata=list(layers)[: len(diff)],
                                 hovertemplate=f"{name} − {reference}<br>layer %{{customdata}}: %{{y:.4g}}<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#555", width=1, dash="dot"))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(layers))), ticktext=[f"layer {l}" for l in layers])
    return finish(fig, title, "MoE layer", f"difference from {reference}", height=360)


def over_training(title: str, series: Sequence[tuple]) -> go.Figure:
    """One line per run over training: ``series`` holds (run name, % of training [C], value [C]); log x (step 0 left out)."""
    fig = go.Figure()
    for i, (name, pct, value) in enumerate(series):
        pct, value = np.asarray(pct, np.float64), np.asarray(value, np.float64)
        keep = pct > 0
        fig.add_trace(go.Scatter(x=pct[keep], y=value[keep], mode="lines+markers", name=str(name),
                                 line=dict(color=run_colour(i)),
                                 hovertemplate=f"{name}<br>%{{x:.3g}}% of training: %{{y:.3f}}<extra></extra>"))
    fig = finish(fig, title, "% of training (log)", "share of top-k as at the end", height=360)
    fig.update_xaxes(type="log", ticksuffix="%")
    return fig


def grouped_bars(title: str, y_label: str, groups: Sequence[str], series: Sequence[tuple]) -> go.Figure:
    """One bar per run in each group (a domain): ``series`` holds (run name, values [G])."""
    fig = go.Figure()
    for i, (name, values) in enumerate(series):
        fig.add_trace(go.Bar(x=list(groups), y=list(np.asarray(values, np.float64)), name=str(name),
                             marker_color=run_colour(i), hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>"))
    fig.update_layout(barmode="group")
    return finish(fig, title, "", y_label, height=360)
