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
