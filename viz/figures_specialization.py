"""Figures about what experts are for: domains, vocabulary, collaboration, ablation.

Domain names and tokens come from datasets, so every label and hover string built from
them is HTML-escaped before Plotly sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from viz._common import (
    DIVERGING,
    SEQUENTIAL,
    FigureInputError,
    as_array,
    check_len,
    colour_range,
    compact,
    esc,
    finish,
    heatmap_height,
    token_label,
)


class _Colours(NamedTuple):
    """What the domain-specialization heatmap colours and shows on hover, with or without a baseline."""

    z: np.ndarray
    custom: np.ndarray
    colorscale: str
    zmid: float | None
    zmin: float | None
    zmax: float | None
    value_txt: str
    bar_title: str


def _share_colours(share: np.ndarray, baseline: np.ndarray | float | None) -> _Colours:
    """Colour by share itself, or (with a baseline) by log2(share / baseline) saturated at ±5; a baseline must be positive."""
    if baseline is None:
        return _Colours(z=share, custom=np.dstack([share, share]), colorscale=SEQUENTIAL, zmid=None, zmin=0.0, zmax=None,
                        value_txt="share %{z:.4f}", bar_title="share of domain's routing")
    base = np.broadcast_to(np.asarray(baseline, dtype=float), (share.shape[1],)).copy()
    if np.any(base <= 0):
        raise FigureInputError("baseline: must be positive to form a ratio")
    with np.errstate(divide="ignore"):
        z = np.log2(np.maximum(share, 1e-12) / base[None, :])
    custom = np.dstack([share, np.broadcast_to(base, share.shape)])
    # An expert a domain never uses gives log2(0); saturate the colours at ±5 (32×).
    span = float(min(np.nanmax(np.abs(z)), 5.0)) or 1.0
    value_txt = (
        "share %{customdata[0]:.4f}<br>baseline %{customdata[1]:.4f}<br>"
        "log2 ratio %{z:.2f}"
    )
    return _Colours(z=z, custom=custom, colorscale=DIVERGING, zmid=0.0, zmin=-span, zmax=span,
                    value_txt=value_txt, bar_title="log2(share / baseline)")


def domain_specialization_heatmap(
    share: np.ndarray,
    domains: Sequence[str],
    baseline: np.ndarray | float | None = None,
    layer: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Share of each domain's routing per expert ``[D, E]``, optionally against a baseline.

    With ``baseline`` (per expert ``[E]`` or a scalar such as 1/E) the colour is
    log2(share / baseline): +1 means the domain uses the expert twice as much as the baseline.
    """
    share = as_array(share, 2, "share")
    names = [esc(d) for d in check_len(domains, share.shape[0], "domains", "share rows")]
    num_experts = share.shape[1]
    where = f" in layer {int(layer)}" if layer is not None else ""
    layer_txt = f"layer {int(layer)}<br>" if layer is not None else ""
    rows = list(range(len(names)))
    c = _share_colours(share, baseline)
    fig = go.Figure(
        go.Heatmap(
            z=c.z,
            x=list(range(num_experts)),
            y=rows,
            customdata=c.custom,
            colorscale=c.colorscale,
            zmid=c.zmid,
            zmin=c.zmin,
            zmax=c.zmax,
            colorbar={"title": {"text": c.bar_title}},
            text=[[names[r]] * num_experts for r in rows],
            hovertemplate=f"{layer_txt}domain %{{text}}<br>expert %{{x}}<br>{c.value_txt}<extra></extra>",
        )
    )
    fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=names, autorange="reversed")
    fig.update_xaxes(dtick=1 if num_experts <= 32 else None)
    return finish(
        fig,
        title or f"Domain specialization of experts{where}",
        "expert index",
        "domain",
        height=heatmap_height(len(names), per_row=30),
    )


def vocabulary_specialization(
    scores: np.ndarray,
    tokens: Sequence[str],
    layer: int,
    experts: Sequence[int] | None = None,
    title: str | None = None,
    measure: str = "P(expert | token)",
) -> go.Figure:
    """Which experts each token goes to ``[T, E']``: vocabulary-specialized experts stand out.

    ``tokens`` are decoded token strings (escaped here); ``experts`` names the columns when
    ``scores`` holds a subset of the experts.
    """
    scores = as_array(scores, 2, "scores")
    toks = [esc(token_label(t)) for t in tokens]
    toks = check_len(toks, scores.shape[0], "tokens", "scores rows")
    cols = list(range(scores.shape[1])) if experts is None else [int(e) for e in experts]
    check_len(cols, scores.shape[1], "experts", "scores columns")
    rows = list(range(len(toks)))
    fig = go.Figure(
        go.Heatmap(
            z=scores,
            x=[str(c) for c in cols],
            y=rows,
            text=[[t] * len(cols) for t in toks],
            **colour_range(scores),
            colorbar={"title": {"text": esc(measure)}},
            hovertemplate=(
                f"layer {int(layer)}<br>token %{{text}}<br>expert %{{x}}<br>"
                f"{esc(measure)} %{{z:.4f}}<extra></extra>"
            ),
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=toks, autorange="reversed")
    return finish(
        fig,
        title or f"Vocabulary specialization in layer {int(layer)}",
        "expert index",
        "token",
        height=heatmap_height(len(toks), per_row=18),
    )


def _check_patterns(
    atoms: np.ndarray, pattern_domain_scores: np.ndarray, layers: Sequence[int], num_experts: int,
    domains: Sequence[str], columns: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int], list[str], np.ndarray]:
    """The collaboration figure's inputs as arrays, refused with one line when their shapes disagree.

    ``columns``: which (layer, expert) columns ``l * E + e`` the atoms hold (all by default; a wide
    model's report draws only the strongest). Returned last, with the layer and expert of each.
    """
    atoms = as_array(atoms, 2, "atoms")
    pds = as_array(pattern_domain_scores, 2, "pattern_domain_scores")
    layers = [int(v) for v in layers]
    total = len(layers) * int(num_experts)
    cols = np.arange(total) if columns is None else np.asarray(columns, dtype=int)
    if atoms.shape[1] != len(cols):
        what = f"layers × num_experts is {len(layers)} × {int(num_experts)} = {total}" if columns is None \
            else f"columns names {len(cols)}"
        raise FigureInputError(f"atoms: has {atoms.shape[1]} columns but {what}")
    if len(cols) and (cols.min() < 0 or cols.max() >= total or (np.diff(cols) <= 0).any()):
        raise FigureInputError(f"columns: must be increasing (layer, expert) columns in [0, {total})")
    if pds.shape[0] != atoms.shape[0]:
        raise FigureInputError(
            f"pattern_domain_scores: has {pds.shape[0]} patterns but atoms has {atoms.shape[0]}"
        )
    names = [esc(d) for d in check_len(domains, pds.shape[1], "domains", "pattern_domain_scores columns")]
    return atoms, pds, layers, names, cols


def _layer_bands(fig: go.Figure, layers: list[int], num_experts: int) -> None:
    """Lines between layers' expert bands and one tick per layer (at most 16 labelled)."""
    # one layout update: add_vline re-validates the whole layout per line (59 lines at 60 layers took 6 s)
    sub = fig.get_subplot(1, 1)
    xref, yref = sub.xaxis.plotly_name.replace("axis", ""), sub.yaxis.plotly_name.replace("axis", "") + " domain"
    lines = [{"type": "line", "xref": xref, "yref": yref, "x0": x, "x1": x, "y0": 0, "y1": 1,
              "line": {"color": "black", "width": 0.5}} for x in (i * num_experts - 0.5 for i in range(1, len(layers)))]
    fig.update_layout(shapes=list(fig.layout.shapes) + lines)
    step = max(1, len(layers) // 16)
    fig.update_xaxes(
        tickmode="array",
        tickvals=[i * num_experts + (num_experts - 1) / 2 for i in range(0, len(layers), step)],
        ticktext=[f"L{layers[i]}" for i in range(0, len(layers), step)],
        row=1, col=1,
    )


def _atoms_heatmap(atoms: np.ndarray, layers: list[int], num_experts: int, cols: np.ndarray) -> go.Heatmap:
    """The patterns' weight per (layer, expert) column, each cell's hover naming its layer and expert."""
    col_layer, col_expert = np.asarray(layers)[cols // num_experts], cols % num_experts
    custom = compact(np.dstack(
        [np.broadcast_to(col_layer, atoms.shape), np.broadcast_to(col_expert, atoms.shape)]
    ))
    return go.Heatmap(
        z=compact(atoms),
        x=compact(cols),
        y=list(range(atoms.shape[0])),
        customdata=custom,
        colorscale=DIVERGING,
        zmid=0.0,
        colorbar={"title": {"text": "atom weight"}, "x": 0.62, "thickness": 14},
        hovertemplate=(
            "pattern %{y}<br>layer %{customdata[0]}<br>expert %{customdata[1]}<br>"
            "weight %{z:.3f}<extra></extra>"
        ),
    )


def collaboration_patterns(
    atoms: np.ndarray,
    pattern_domain_scores: np.ndarray,
    layers: Sequence[int],
    num_experts: int,
    domains: Sequence[str],
    title: str | None = None,
    columns: Sequence[int] | None = None,
) -> go.Figure:
    """Expert collaboration patterns (dictionary atoms over layer×expert) and their domains.

    ``atoms [P, L*E]`` is laid out layer-major (column ``l * E + e``), or holds only ``columns``
    of that layout; the right panel shows how strongly each pattern is used by each domain ``[P, D]``.
    """
    atoms, pds, layers, names, cols = _check_patterns(atoms, pattern_domain_scores, layers, num_experts, domains, columns)
    num_patterns = atoms.shape[0]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.72, 0.28], horizontal_spacing=0.17,
        subplot_titles=("pattern weight per layer and expert", "pattern use per domain"),
    )
    fig.add_trace(_atoms_heatmap(atoms, layers, num_experts, cols), row=1, col=1)
    fig.add_trace(
        go.Heatmap(
            z=pds,
            x=list(range(len(names))),
            y=list(range(num_patterns)),
            text=[names] * num_patterns,
            colorscale=SEQUENTIAL,
            colorbar={"title": {"text": "domain score"}},
            hovertemplate="pattern %{y}<br>domain %{text}<br>score %{z:.3f}<extra></extra>",
        ),
        row=1, col=2,
    )
    _layer_bands(fig, layers, num_experts)
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(names))), ticktext=names, row=1, col=2)
    fig.update_yaxes(autorange="reversed")
    finish(
        fig,
        title or "Expert collaboration patterns",
        "layer × expert (experts within each layer band)",
        "pattern index",
        height=heatmap_height(num_patterns, per_row=24),
    )
    fig.update_xaxes(title_text="domain", row=1, col=2)
    fig.update_yaxes(title_text="", showticklabels=False, row=1, col=2)
    return fig


def ablation_effects(
    delta_loss: np.ndarray,
    labels: Sequence[str],
    domains: Sequence[str],
    title: str | None = None,
    unit: str = "nats/token",
) -> go.Figure:
    """Change in loss per domain when experts are ablated ``[A, D]`` (grouped bars)."""
    delta = as_array(delta_loss, 2, "delta_loss")
    labs = [esc(v) for v in check_len(labels, delta.shape[0], "labels", "delta_loss rows")]
    names = [esc(v) for v in check_len(domains, delta.shape[1], "domains", "delta_loss columns")]
    fig = go.Figure()
    for d, name in enumerate(names):
        fig.add_trace(
            go.Bar(
                x=labs,
                y=delta[:, d],
                name=name,
                hovertemplate=(
                    f"ablated %{{x}}<br>domain {name}<br>Δ loss %{{y:+.4f}} {esc(unit)}<extra></extra>"
                ),
            )
        )
    fig.add_hline(y=0.0, line_color="gray", line_width=1)
    fig.update_layout(barmode="group", legend_title_text="domain")
    return finish(
        fig, title or "Effect of ablating experts on loss", "ablated experts (layer / expert)",
        f"Δ loss ({unit})",
    )


def collaboration_by_domain(
    atoms: np.ndarray,
    pattern_domain_scores: np.ndarray,
    layers: Sequence[int],
    num_experts: int,
    domains: Sequence[str],
    top_experts: dict[str, list[dict]],
    patterns_shown: int = 4,
    title: str | None = None,
    columns: Sequence[int] | None = None,
) -> go.Figure:
    """Pick a domain (a dropdown): the patterns it uses most, and its most specialized experts.

    ``atoms [P, L*E]`` and ``pattern_domain_scores [P, D]`` as in :func:`collaboration_patterns`;
    ``top_experts[domain]``: records with ``layer``, ``expert`` and ``ratio`` (share over k/E).
    Everything is in the figure: the dropdown only switches which domain's traces are visible.
    """
    atoms, pds, layers, names, cols = _check_patterns(atoms, pattern_domain_scores, layers, num_experts, domains, columns)
    col_layer, col_expert = np.asarray(layers)[cols // num_experts], cols % num_experts
    fig = make_subplots(rows=1, cols=2, column_widths=[0.68, 0.32], horizontal_spacing=0.14,
                        subplot_titles=("patterns the domain uses most", "its most specialized experts (share / k/E)"))
    for d, name in enumerate(names):
        top = np.argsort(-pds[:, d], kind="stable")[:patterns_shown]
        rows = [f"pattern {k} ({pds[k, d]:.0%} of its use)" for k in top]
        custom = compact(np.dstack([np.broadcast_to(col_layer, (len(top), atoms.shape[1])),
                                    np.broadcast_to(col_expert, (len(top), atoms.shape[1]))]))
        fig.add_trace(go.Heatmap(
            z=compact(atoms[top]), x=compact(cols), y=rows, customdata=custom, colorscale=DIVERGING, zmid=0.0,
            visible=d == 0, name=name, colorbar={"title": {"text": "atom weight"}, "x": 0.58, "thickness": 14},
            hovertemplate="%{y}<br>layer %{customdata[0]}<br>expert %{customdata[1]}<br>weight %{z:.3f}<extra></extra>",
        ), row=1, col=1)
        recs = top_experts.get(str(domains[d]), [])
        fig.add_trace(go.Bar(
            x=[f"L{r['layer']} E{r['expert']}" for r in recs], y=[float(r["ratio"]) for r in recs], visible=d == 0,
            name=name, marker_color="#3b7dd8",
            hovertemplate=f"domain {name}<br>%{{x}} (layer, expert)<br>ratio %{{y:.2f}}<extra></extra>",
        ), row=1, col=2)
    buttons = [{"label": name, "method": "update",
                "args": [{"visible": [i // 2 == d for i in range(2 * len(names))]}]} for d, name in enumerate(names)]
    fig.update_layout(updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.18,
                                    "yanchor": "top", "showactive": True}], showlegend=False)
    fig.add_hline(y=1.0, line={"dash": "dot", "color": "gray"}, row=1, col=2)
    _layer_bands(fig, layers, num_experts)
    finish(fig, title or "Collaboration by domain (choose a domain)", "layer × expert (experts within each layer band)",
           "pattern", height=420)
    fig.update_xaxes(title_text="layer, expert", row=1, col=2)
    fig.update_yaxes(title_text="ratio (1 = k/E)", row=1, col=2)
    return fig
