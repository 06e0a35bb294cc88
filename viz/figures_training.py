"""Figures over training time: checkpoints (saturation, drift) and training-log curves.

The x axis is whatever the run counts in (checkpoint step, epoch, tokens); callers pass its
name so the axis title carries the unit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from viz._common import (
    SEQUENTIAL,
    FigureInputError,
    as_array,
    check_len,
    esc,
    finish,
    heatmap_height,
)


def _per_layer_lines(
    steps: np.ndarray,
    values: np.ndarray,
    layers: Sequence[int],
    value_label: str,
    x_label: str,
    value_fmt: str = ".4f",
) -> go.Figure:
    """One line per layer of ``values [C, L]`` over ``steps [C]``."""
    fig = go.Figure()
    for j, layer in enumerate(layers):
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=values[:, j],
                mode="lines+markers",
                name=f"L{int(layer)}",
                hovertemplate=(
                    f"layer {int(layer)}<br>{esc(x_label)} %{{x}}<br>"
                    f"{esc(value_label)} %{{y:{value_fmt}}}<extra></extra>"
                ),
            )
        )
    fig.update_layout(legend_title_text="MoE layer")
    return fig


def _steps_and_matrix(
    steps: Sequence[float], values: np.ndarray, layers: Sequence[int], name: str
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    steps_arr = as_array(steps, 1, "steps")
    values = as_array(values, 2, name)
    check_len(steps_arr, values.shape[0], "steps", f"{name} rows")
    layers = [int(v) for v in check_len(layers, values.shape[1], "layers", f"{name} columns")]
    return steps_arr, values, layers


def _percent_of_training(steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each checkpoint as % of the final step, and which checkpoints a log axis can show (step > 0)."""
    final = float(steps[-1])
    if final <= 0:
        raise FigureInputError(f"steps: the final step must be positive to give % of training, got {final:g}")
    return steps / final * 100.0, steps > 0


def _rgba(color: str, alpha: float) -> str:
    """A ``#rrggbb`` colour as ``rgba(...)`` with the given opacity (for a band under its line)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _saturation_layer(fig: go.Figure, x: np.ndarray, steps: np.ndarray, value: np.ndarray, j: int, layer: int,
                      measure: str, bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> None:
    """Layer ``j``: its 95% interval as a band, its value as a line, its chance as a dashed line (one legend entry)."""
    color = qualitative.Plotly[j % len(qualitative.Plotly)]
    group = {"legendgroup": f"L{layer}"}
    custom = steps[:, None]
    ci = ""
    if bounds is not None:
        low, high, null = (b[:, j] for b in bounds)
        fig.add_trace(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([high, low[::-1]]), fill="toself",
                                 fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip", showlegend=False,
                                 name=f"L{layer} 95% CI", **group))
        fig.add_trace(go.Scatter(x=x, y=null, mode="lines", line={"color": color, "dash": "dash", "width": 1.5},
                                 showlegend=False, name=f"L{layer} chance", **group,
                                 hovertemplate=f"layer {layer}<br>%{{x:.3g}}% of training<br>chance %{{y:.4f}}<extra></extra>"))
        custom = np.stack([steps, low, high], axis=1)
        ci = "<br>95% CI %{customdata[1]:.4f}–%{customdata[2]:.4f}"
    fig.add_trace(go.Scatter(x=x, y=value[:, j], mode="lines+markers", line={"color": color}, name=f"L{layer}",
                             customdata=custom, **group,
                             hovertemplate=(f"layer {layer}<br>step %{{customdata[0]:.0f}} (%{{x:.3g}}% of training)<br>"
                                            f"{esc(measure)} %{{y:.4f}}{ci}<extra></extra>")))


def _bounds(low: np.ndarray | None, high: np.ndarray | None, null: np.ndarray | None, shape: tuple[int, ...]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``low``, ``high`` and ``null`` as ``[C, L]`` arrays of ``shape``: all three or none."""
    given = [v is not None for v in (low, high, null)]
    if not any(given):
        return None
    if not all(given):
        raise FigureInputError("low, high and null: give all three or none")
    out = tuple(as_array(v, 2, n) for v, n in ((low, "low"), (high, "high"), (null, "null")))
    for v, n in zip(out, ("low", "high", "null")):
        if v.shape != shape:
            raise FigureInputError(f"{n}: shape {v.shape} differs from saturation {shape}")
    return out


def saturation_over_checkpoints(
    steps: Sequence[float],
    saturation: np.ndarray,
    layers: Sequence[int],
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
    null: np.ndarray | None = None,
    title: str | None = None,
    x_label: str = "training step",
    measure: str = "top-k overlap with final checkpoint",
) -> go.Figure:
    """How close each layer's routing is to its final state at each checkpoint ``[C, L]``, as OLMoE's Fig. 20.

    The x axis is % of training (step / final step) on a log scale, so early checkpoints, where
    routing settles, get room; step 0 has no place on it and is left out (said in the axis title).
    ``low``/``high`` (each layer's 95% interval) draw a band and ``null`` (chance) a dashed line.
    """
    steps_arr, values, layers = _steps_and_matrix(steps, saturation, layers, "saturation")
    bounds = _bounds(low, high, null, values.shape)
    x, keep = _percent_of_training(steps_arr)
    if bounds is not None:
        bounds = tuple(b[keep] for b in bounds)
    fig = go.Figure()
    for j, layer in enumerate(layers):
        _saturation_layer(fig, x[keep], steps_arr[keep], values[keep], j, layer, measure, bounds)
    fig.update_xaxes(type="log", exponentformat="power")
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(legend_title_text="MoE layer")
    dropped = "; step 0 not on a log axis" if not keep.all() else ""
    return finish(
        fig, title or "Routing saturation over training (band: 95% CI; dashed: chance)", f"% of training ({x_label} / final {x_label}, log{dropped})",
        f"{measure} (fraction, 0–1)",
    )


def drift_over_checkpoints(
    steps: Sequence[float],
    drift: np.ndarray,
    layers: Sequence[int],
    title: str | None = None,
    x_label: str = "training step",
    measure: str = "router weight change (1 − cosine to previous checkpoint)",
) -> go.Figure:
    """How much each layer's router moves between checkpoints ``[C, L]``."""
    steps_arr, values, layers = _steps_and_matrix(steps, drift, layers, "drift")
    fig = _per_layer_lines(steps_arr, values, layers, measure, x_label, value_fmt=".4g")
    return finish(fig, title or "Router drift over training", f"{x_label} (checkpoint)", measure)


def training_curves(
    steps: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str = "Training curves",
    x_label: str = "epoch",
    y_label: str = "value",
) -> go.Figure:
    """Several scalar curves over training on one axis (e.g. loss and accuracy)."""
    steps_arr = as_array(steps, 1, "steps")
    if not series:
        raise FigureInputError("series: no curves given")
    fig = go.Figure()
    for name, values in series.items():
        vals = as_array(values, 1, f"series[{name!r}]")
        check_len(vals, steps_arr.shape[0], f"series[{name!r}]", "steps")
        fig.add_trace(
            go.Scatter(
                x=steps_arr,
                y=vals,
                mode="lines+markers",
                name=esc(name),
                hovertemplate=f"{esc(x_label)} %{{x}}<br>{esc(name)} %{{y:.4f}}<extra></extra>",
            )
        )
    return finish(fig, title, x_label, y_label)


def utilization_over_time(
    steps: Sequence[float],
    util: np.ndarray,
    title: str | None = None,
    x_label: str = "epoch",
    layer: int | None = None,
    value_label: str = "share of routed tokens",
) -> go.Figure:
    """Each expert's load over training ``[T, E]``; the dashed line is the uniform share."""
    steps_arr = as_array(steps, 1, "steps")
    util = as_array(util, 2, "util")
    check_len(steps_arr, util.shape[0], "steps", "util rows")
    layer_txt = f"layer {int(layer)}<br>" if layer is not None else ""
    fig = go.Figure()
    for e in range(util.shape[1]):
        fig.add_trace(
            go.Scatter(
                x=steps_arr,
                y=util[:, e],
                mode="lines+markers",
                name=f"expert {e}",
                hovertemplate=(
                    f"{layer_txt}expert {e}<br>{esc(x_label)} %{{x}}<br>"
                    f"{esc(value_label)} %{{y:.2%}}<extra></extra>"
                ),
            )
        )
    fig.add_hline(
        y=1.0 / util.shape[1], line_dash="dash", line_color="gray",
        annotation_text=f"uniform 1/E = {1.0 / util.shape[1]:.1%}",
    )
    fig.update_yaxes(tickformat=".0%")
    where = f" in layer {int(layer)}" if layer is not None else ""
    return finish(
        fig, title or f"Expert utilization over training{where}", x_label,
        f"{value_label} (%)",
    )


def layer_metric_over_time(
    steps: Sequence[float],
    values: np.ndarray,
    layers: Sequence[int],
    metric: str,
    unit: str,
    title: str | None = None,
    x_label: str = "epoch",
) -> go.Figure:
    """A per-layer metric over training ``[T, L]`` (e.g. routing entropy per layer)."""
    steps_arr, vals, layers = _steps_and_matrix(steps, values, layers, "values")
    fig = _per_layer_lines(steps_arr, vals, layers, metric, x_label)
    return finish(fig, title or f"{metric} per layer over training", x_label, f"{metric} ({unit})")


def affinity_heatmap(
    affinity: np.ndarray,
    row_labels: Sequence[str] | None = None,
    expert_labels: Sequence[str] | None = None,
    title: str | None = None,
    value_label: str = "router affinity",
) -> go.Figure:
    """Router affinity of each input (row) for each expert (column), as in seed 000."""
    aff = as_array(affinity, 2, "affinity")
    rows = list(range(aff.shape[0]))
    rlab = [esc(v) for v in (row_labels if row_labels is not None else [str(r) for r in rows])]
    check_len(rlab, aff.shape[0], "row_labels", "affinity rows")
    elab = [esc(v) for v in (expert_labels if expert_labels is not None else
                             [str(e) for e in range(aff.shape[1])])]
    check_len(elab, aff.shape[1], "expert_labels", "affinity columns")
    cols = list(range(aff.shape[1]))
    fig = go.Figure(
        go.Heatmap(
            z=aff,
            x=cols,
            y=rows,
            customdata=np.array([[[r, c] for c in elab] for r in rlab], dtype=object),
            colorscale=SEQUENTIAL,
            colorbar={"title": {"text": esc(value_label)}},
            hovertemplate=(
                "input %{customdata[0]}<br>expert %{customdata[1]}<br>"
                f"{esc(value_label)} %{{z:.4f}}<extra></extra>"
            ),
        )
    )
    show_rows = len(rows) <= 60
    fig.update_xaxes(tickmode="array", tickvals=cols, ticktext=elab)
    if show_rows:
        fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=rlab)
    fig.update_yaxes(autorange="reversed")
    return finish(
        fig, title or "Router affinity matrix", "expert", "input (row of the affinity matrix)",
        height=heatmap_height(len(rows), per_row=14),
    )


def checkpoint_heatmap(
    values: np.ndarray,
    steps: Sequence[float],
    layers: Sequence[int],
    metric: str,
    x_label: str = "training step",
    title: str | None = None,
) -> go.Figure:
    """A per-layer metric over checkpoints as a heatmap ``[C, L]`` for many layers at once."""
    steps_arr, vals, layers = _steps_and_matrix(steps, values, layers, "values")
    fig = go.Figure(
        go.Heatmap(
            z=vals.T,
            x=steps_arr,
            y=layers,
            colorscale=SEQUENTIAL,
            colorbar={"title": {"text": esc(metric)}},
            hovertemplate=(
                f"layer %{{y}}<br>{esc(x_label)} %{{x}}<br>{esc(metric)} %{{z:.4f}}<extra></extra>"
            ),
        )
    )
    fig.update_yaxes(type="category", autorange="reversed")
    return finish(
        fig, title or f"{metric} per layer over training", x_label,
        "MoE layer (model layer index)", height=heatmap_height(len(layers)),
    )
