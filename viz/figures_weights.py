"""Figures about router and expert weights: singular-value spectra, subspace alignment, matched cosine.

Alignment and matched-cosine numbers only mean something next to their nulls, so those figures
always draw the null beside the measured value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import FigureInputError, as_array, check_len, check_square, esc, finish, wrap_title


ZERO_RATIO = 1e-6  # singular values below this share of the largest are numerical zeros (centred rows lose a rank)


def _spectrum(values: np.ndarray, name: str, normalize: bool) -> np.ndarray:
    """One spectrum without its numerical zeros (a log axis would run down to ~1e-16 for them), scaled if asked."""
    sv = as_array(values, 1, name)
    top = np.nanmax(sv)
    if top > 0:
        sv = sv[sv >= ZERO_RATIO * top]
        if normalize:
            sv = sv / top
    return sv


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
    scale compare; ``baseline`` (one spectrum) is drawn dashed for reference. Values below
    ``ZERO_RATIO`` of the largest are left out: they are rounding noise, not structure.
    """
    if not spectra:
        raise FigureInputError("spectra: no layers given")
    fig = go.Figure()
    for layer, values in sorted(spectra.items()):
        sv = _spectrum(values, f"spectra[{layer}]", normalize)
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
        sv = _spectrum(baseline, "baseline", normalize)
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
        fig.update_yaxes(type="log", exponentformat="power")
    y_title = "singular value / largest (ratio)" if normalize else "singular value (weight units)"
    return finish(
        fig, title or f"Singular-value spectra of {matrix} matrices (numerical zeros left out)", "index (descending order)", y_title,
    )


def _band(fig: go.Figure, x: np.ndarray, low: np.ndarray, high: np.ndarray, name: str, fill: str) -> None:
    """A shaded range between ``low`` and ``high`` along the layers."""
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([x, x[::-1]]),
            y=np.concatenate([high, low[::-1]]),
            mode="lines",
            fill="toself",
            fillcolor=fill,
            line={"width": 0},
            name=esc(name),
            hoverinfo="skip",
        )
    )


def _line(fig: go.Figure, x: np.ndarray, y: np.ndarray, name: str, color: str, layers: list[int], measure: str,
          extra: np.ndarray | None = None, extra_label: str = "") -> None:
    """A dashed reference line with hover naming the layer (and an optional second value)."""
    custom = np.asarray(layers, dtype=float)[:, None]
    hover = f"{esc(name)}<br>layer %{{customdata[0]}}<br>{esc(measure)} %{{y:.4f}}"
    if extra is not None:
        custom = np.concatenate([custom, np.asarray(extra, dtype=float)[:, None]], axis=1)
        hover += f"<br>{esc(extra_label)} %{{customdata[1]:.4f}}"
    fig.add_trace(
        go.Scatter(x=x, y=y, mode="lines", line={"color": color, "dash": "dash"}, name=esc(name),
                   customdata=custom, hovertemplate=hover + "<extra></extra>")
    )


def _baselines(fig: go.Figure, x: np.ndarray, layers: list[int], measure: str, random_mean: np.ndarray,
               random_std: np.ndarray | None, null: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
               null_label: str) -> None:
    """The random-subspace reference (exact r/H, optional ± 2 sd band) and the expert-permutation null."""
    if random_std is not None:
        _band(fig, x, random_mean - 2 * random_std, random_mean + 2 * random_std,
              "isotropic random subspace (mean ± 2 sd)", "rgba(128,128,128,0.25)")
    _line(fig, x, random_mean, "random subspace of the same dimension (r/H)", "gray", layers, measure,
          extra=random_std, extra_label="sd")
    if null is not None:
        mean, low, high = null
        _band(fig, x, low, high, f"{null_label} (95% range)", "rgba(214,39,40,0.18)")
        _line(fig, x, mean, f"{null_label} (mean)", "#d62728", layers, measure)


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
    random_std: np.ndarray | None,
    layers: Sequence[int],
    title: str | None = None,
    measure: str = "subspace alignment",
    own_label: str = "router row ↔ its own expert",
    other_label: str = "router row ↔ other experts (mean)",
    y_title: str | None = None,
    null_mean: np.ndarray | None = None,
    null_low: np.ndarray | None = None,
    null_high: np.ndarray | None = None,
    null_label: str = "experts permuted",
) -> go.Figure:
    """Router–expert alignment per layer and expert ``[L, E]`` against its baselines ``[L]``.

    Points are single experts; lines are layer means. ``random_mean`` (r/H) is what a random
    subspace gives, drawn dashed (with a ± 2 sd band if ``random_std`` is given); it is easy to
    beat for anisotropic weights. The test that matters is ``null_*``: the layer mean of own
    alignment when experts are permuted (row e against another expert's subspace), drawn as its
    95% range, so a layer-mean line above the red band aligns with its own expert beyond chance.
    """
    own = as_array(own, 2, "own")
    layers = [int(v) for v in check_len(layers, own.shape[0], "layers", "own rows")]
    rmean = as_array(random_mean, 1, "random_mean")
    check_len(rmean, own.shape[0], "random_mean", "own rows")
    rstd = None
    if random_std is not None:
        rstd = as_array(random_std, 1, "random_std")
        check_len(rstd, own.shape[0], "random_std", "own rows")
    null = None
    given = [v is not None for v in (null_mean, null_low, null_high)]
    if any(given):
        if not all(given):
            raise FigureInputError("null_mean, null_low and null_high: give all three or none")
        null = tuple(as_array(v, 1, n) for v, n in ((null_mean, "null_mean"), (null_low, "null_low"), (null_high, "null_high")))
        for v, n in zip(null, ("null_mean", "null_low", "null_high")):
            check_len(v, own.shape[0], n, "own rows")
    x = np.arange(own.shape[0])
    fig = go.Figure()
    _baselines(fig, x, layers, measure, rmean, rstd, null, null_label)
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
    finish(fig, title or "Router–expert alignment against its baselines", "MoE layer (model layer index)", "")
    wrapped, lines = wrap_title(esc(y_title or f"{measure} (0 = orthogonal, 1 = same subspace)"))
    fig.update_yaxes(title_text=wrapped)
    fig.update_layout(height=480, margin_l=50 + 16 * lines)
    return fig


def hungarian_cosine_vs_null(
    observed: np.ndarray,
    null_mean: np.ndarray,
    null_low: np.ndarray,
    null_high: np.ndarray,
    layers: Sequence[int],
    title: str | None = None,
    measure: str = "Hungarian-matched cosine",
) -> go.Figure:
    """Hungarian-matched cosine of every layer pair ``[L, L]`` beside its null.

    Matching experts optimally makes even unrelated routers score well above 0, so each pair is
    drawn with the mean and 95% range of the same statistic with one router's expert rows mixed by
    a random rotation (same mean row and covariance, no correspondence); only a point above its bar
    is beyond chance.
    """
    observed = as_array(observed, 2, "observed")
    check_square(observed, "observed")
    layers = [int(v) for v in check_len(layers, observed.shape[0], "layers", "observed")]
    arrays = {}
    for name, v in (("null_mean", null_mean), ("null_low", null_low), ("null_high", null_high)):
        arrays[name] = as_array(v, 2, name)
        if arrays[name].shape != observed.shape:
            raise FigureInputError(f"{name}: shape {arrays[name].shape} differs from observed {observed.shape}")
    a, b = np.triu_indices(len(layers), k=1)
    if a.size == 0:
        raise FigureInputError("observed: needs at least 2 layers to compare")
    labels = [f"L{layers[i]}–L{layers[j]}" for i, j in zip(a, b)]
    mean, low, high = (arrays[n][a, b] for n in ("null_mean", "null_low", "null_high"))
    custom = np.stack([np.asarray(layers)[a], np.asarray(layers)[b], low, high], axis=1)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=labels, y=mean, mode="markers", marker={"color": "gray", "symbol": "line-ew-open", "size": 12},
            error_y={"type": "data", "symmetric": False, "array": high - mean, "arrayminus": mean - low, "color": "gray"},
            name="null: other router's rows mixed (mean, 95% range)", customdata=custom,
            hovertemplate=("layer %{customdata[0]} vs layer %{customdata[1]}<br>null mean %{y:.3f}, "
                           "95% range %{customdata[2]:.3f}–%{customdata[3]:.3f}<extra></extra>"),
        )
    )
    fig.add_trace(
        go.Scatter(
            x=labels, y=observed[a, b], mode="markers", marker={"color": "#1f77b4", "size": 8},
            name=esc(measure), customdata=custom,
            hovertemplate=(f"layer %{{customdata[0]}} vs layer %{{customdata[1]}}<br>{esc(measure)} "
                           "%{y:.3f}<extra></extra>"),
        )
    )
    fig.update_xaxes(type="category")
    return finish(fig, title or f"{measure} between layers against its null", "layer pair (model layer indices)",
                  f"{measure} (mean over matched experts)")
