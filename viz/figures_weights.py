"""Figures about router and expert weights: singular-value spectra and subspace alignment.

Alignment numbers only mean something next to what random subspaces of the same size give,
so the alignment figure always draws that baseline as a band.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import FigureInputError, as_array, check_len, esc, finish


def svd_spectra(
    spectra: Mapping[int, np.ndarray],
    normalize: bool = True,
    log_y: bool = True,
    baseline: np.ndarray | None = None,
    baseline_label: str = "random Gaussian matrix",
    title: str | None = None,
    matrix: str = "router weight",
) -> go.Figure:
    """Singular values of a weight matrix per layer (one line per layer).

    With ``normalize`` each spectrum is divided by its largest value so layers of different
    scale compare; ``baseline`` (one spectrum) is drawn dashed for reference.
    """
    if not spectra:
        raise FigureInputError("spectra: no layers given")
    fig = go.Figure()
    for layer, values in sorted(spectra.items()):
        sv = as_array(values, 1, f"spectra[{layer}]")
        if normalize and sv.max() > 0:
            sv = sv / sv.max()
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, sv.size + 1),
                y=sv,
                mode="lines",
                name=f"L{int(layer)}",
                hovertemplate=(
                    f"layer {int(layer)}<br>singular value #%{{x}}<br>value %{{y:.4g}}<extra></extra>"
                ),
            )
        )
    if baseline is not None:
        sv = as_array(baseline, 1, "baseline")
        if normalize and sv.max() > 0:
            sv = sv / sv.max()
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, sv.size + 1),
                y=sv,
                mode="lines",
                line={"dash": "dash", "color": "black"},
                name=esc(baseline_label),
                hovertemplate=(
                    f"{esc(baseline_label)}<br>singular value #%{{x}}<br>value %{{y:.4g}}<extra></extra>"
                ),
            )
        )
    if log_y:
        fig.update_yaxes(type="log")
    y_title = "singular value / largest (ratio)" if normalize else "singular value (weight units)"
    return finish(
        fig, title or f"Singular-value spectra of {matrix} matrices", "index (descending order)",
        y_title,
    )


def _baseline_band(fig: go.Figure, x: np.ndarray, rmean: np.ndarray, rstd: np.ndarray, layers: list[int],
                   measure: str) -> None:
    """The random baseline: its mean as a dashed line inside a grey mean ± 2 sd band."""
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([x, x[::-1]]),
            y=np.concatenate([rmean + 2 * rstd, (rmean - 2 * rstd)[::-1]]),
            mode="lines",
            fill="toself",
            fillcolor="rgba(128,128,128,0.25)",
            line={"width": 0},
            name="random baseline (mean ± 2 sd)",
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=rmean,
            mode="lines",
            line={"color": "gray", "dash": "dash"},
            name="random baseline mean",
            customdata=np.stack([layers, rstd], axis=1),
            hovertemplate=(
                f"layer %{{customdata[0]}}<br>random {esc(measure)} %{{y:.4f}} ± "
                "%{customdata[1]:.4f} (sd)<extra></extra>"
            ),
        )
    )


def _per_expert_series(fig: go.Figure, values: np.ndarray, label: str, color: str, layers: list[int], measure: str,
                       rng: np.random.Generator) -> None:
    """One series ``[L, E]``: a jittered point per expert and a line through the layer means."""
    num_layers, num_experts = values.shape
    x = np.arange(num_layers)
    jitter = rng.uniform(-0.15, 0.15, size=values.shape)
    custom = np.stack([np.repeat(layers, num_experts), np.tile(np.arange(num_experts), num_layers)], axis=1)
    fig.add_trace(
        go.Scatter(
            x=(x[:, None] + jitter).ravel(),
            y=values.ravel(),
            mode="markers",
            marker={"size": 4, "color": color, "opacity": 0.45},
            name=f"{esc(label)} (per expert)",
            customdata=custom,
            hovertemplate=(
                f"{esc(label)}<br>layer %{{customdata[0]}}<br>expert %{{customdata[1]}}<br>"
                f"{esc(measure)} %{{y:.4f}}<extra></extra>"
            ),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=np.nanmean(values, axis=1),
            mode="lines+markers",
            line={"color": color},
            name=f"{esc(label)} (layer mean)",
            customdata=np.asarray(layers)[:, None],
            hovertemplate=(
                f"{esc(label)}<br>layer %{{customdata[0]}}<br>mean {esc(measure)} "
                "%{y:.4f}<extra></extra>"
            ),
        )
    )


def alignment_vs_baseline(
    own: np.ndarray,
    other: np.ndarray | None,
    random_mean: np.ndarray,
    random_std: np.ndarray,
    layers: Sequence[int],
    title: str | None = None,
    measure: str = "subspace alignment",
    own_label: str = "router row ↔ its own expert",
    other_label: str = "router row ↔ other experts (mean)",
    y_title: str | None = None,
) -> go.Figure:
    """Router–expert alignment per layer and expert ``[L, E]`` against a random baseline.

    Points are single experts; lines are layer means; the grey band is the random-subspace
    mean ± 2 standard deviations, so points above it are aligned beyond chance.
    """
    own = as_array(own, 2, "own")
    layers = [int(v) for v in check_len(layers, own.shape[0], "layers", "own rows")]
    rmean = as_array(random_mean, 1, "random_mean")
    rstd = as_array(random_std, 1, "random_std")
    check_len(rmean, own.shape[0], "random_mean", "own rows")
    check_len(rstd, own.shape[0], "random_std", "own rows")
    x = np.arange(own.shape[0])
    fig = go.Figure()
    _baseline_band(fig, x, rmean, rstd, layers, measure)
    series = [(own, own_label, "#1f77b4")]
    if other is not None:
        other = as_array(other, 2, "other")
        if other.shape != own.shape:
            raise FigureInputError(f"other: shape {other.shape} differs from own {own.shape}")
        series.append((other, other_label, "#ff7f0e"))
    rng = np.random.default_rng(0)
    for values, label, color in series:
        _per_expert_series(fig, values, label, color, layers, measure, rng)
    fig.update_xaxes(tickmode="array", tickvals=list(x), ticktext=[f"L{v}" for v in layers])
    return finish(
        fig,
        title or f"Router–expert {measure} against a random baseline",
        "MoE layer (model layer index)",
        y_title or f"{measure} (0 = orthogonal, 1 = same subspace)",
    )
