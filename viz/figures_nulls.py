"""A measured value beside its null: the one figure shape for "X (95% CI) against chance Y".

Every finding in the report is a value with an interval over documents and a null from
shuffled data; this draws them side by side per item (layer, checkpoint, domain), so a bar
whose interval clears the null's band is an effect, and one inside it is not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import FigureInputError, as_array, check_len, esc, finish


def estimate_vs_null(
    labels: Sequence[str],
    value: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    null: np.ndarray,
    null_low: np.ndarray | None = None,
    null_high: np.ndarray | None = None,
    title: str = "measured against its null",
    y_title: str = "value",
    x_title: str = "MoE layer",
    value_label: str = "measured (95% CI over documents)",
    null_label: str = "null (95% range)",
) -> go.Figure:
    """Measured values with interval bars, and their null with its range, one pair per label."""
    v = as_array(value, 1, "value")
    names = [esc(x) for x in check_len(labels, v.size, "labels", "value")]
    arrays = {}
    for name, arr in (("low", low), ("high", high), ("null", null), ("null_low", null_low), ("null_high", null_high)):
        if arr is None:
            arrays[name] = None
            continue
        arrays[name] = as_array(arr, 1, name)
        check_len(arrays[name], v.size, name, "value")
    if (arrays["null_low"] is None) != (arrays["null_high"] is None):
        raise FigureInputError("null_low and null_high: give both or neither")
    fig = go.Figure()
    err = dict(type="data", symmetric=False, array=arrays["high"] - v, arrayminus=v - arrays["low"])
    fig.add_trace(go.Bar(x=names, y=v, name=esc(value_label), error_y=err, marker_color="#1f77b4",
                         hovertemplate="%{x}<br>%{y:.4f}<extra>measured</extra>"))
    nerr = None
    if arrays["null_low"] is not None:
        n = arrays["null"]
        nerr = dict(type="data", symmetric=False, array=arrays["null_high"] - n, arrayminus=n - arrays["null_low"])
    fig.add_trace(go.Bar(x=names, y=arrays["null"], name=esc(null_label), error_y=nerr, marker_color="#bbbbbb",
                         hovertemplate="%{x}<br>%{y:.4f}<extra>null</extra>"))
    fig.update_layout(barmode="group")
    return finish(fig, title, x_title, y_title)


_LINE_COLOURS = ("#3b7dd8", "#e4572e", "#17a398", "#8e44ad", "#f3a712", "#555555")


def pruning_curves(
    fractions: Sequence[float],
    criteria: Sequence[str],
    overall: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    title: str | None = None,
    y_title: str = "Δ loss (nats/token)",
) -> go.Figure:
    """Loss change against the pruned share of each layer's experts: one line per criterion, with its 95% band.

    ``overall``, ``low`` and ``high`` are ``[criterion, fraction]``; a criterion named "random" is drawn dashed (the baseline).
    """
    names = [str(c) for c in criteria]
    vals, lo, hi = (as_array(a, 2, n) for a, n in ((overall, "overall"), (low, "low"), (high, "high")))
    check_len(names, vals.shape[0], "criteria", "overall rows")
    x = [100 * float(f) for f in check_len(list(fractions), vals.shape[1], "fractions", "overall columns")]
    fig = go.Figure()
    for i, name in enumerate(names):
        colour = _LINE_COLOURS[-1] if name == "random" else _LINE_COLOURS[i % (len(_LINE_COLOURS) - 1)]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=list(hi[i]) + list(lo[i])[::-1], fill="toself", fillcolor=colour,
                                 opacity=0.15, line={"width": 0}, hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(
            x=x, y=vals[i], mode="lines+markers", name=esc(name), line={"color": colour, "dash": "dash" if name == "random" else "solid"},
            customdata=np.stack([lo[i], hi[i]], -1),
            hovertemplate=f"{esc(name)}<br>%{{x:.1f}}% of each layer's experts pruned<br>Δ loss %{{y:+.4f}} "
                          "(95% CI %{customdata[0]:+.4f} to %{customdata[1]:+.4f})<extra></extra>",
        ))
    fig.add_hline(y=0.0, line={"color": "gray", "width": 1})
    return finish(fig, title or "Loss change when pruning experts, by criterion", "share of each layer's experts pruned (%)",
                  y_title)
