"""Figures about how tokens are routed: similarity, load, entropy, correlation, paths.

Each function takes plain numpy arrays plus the labels of their axes, so any analysis (or a
notebook) can draw them without depending on the analysis result classes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from viz._common import (
    DIVERGING,
    FigureInputError,
    as_array,
    blank_diagonal,
    check_len,
    check_square,
    colour_range,
    diagonal_marks,
    esc,
    finish,
    heatmap_height,
)


def router_similarity_heatmap(
    sim: np.ndarray,
    layers: Sequence[int],
    title: str | None = None,
    measure: str = "cosine",
) -> go.Figure:
    """Layer-by-layer similarity of router weights; shows which layers route alike.

    The diagonal (a layer with itself) is blank so the colours span the pairs of different
    layers; never-negative measures (mean |r|) get a sequential scale from 0.
    """
    sim = as_array(sim, 2, "sim")
    check_square(sim, "sim")
    layers = [int(v) for v in check_len(layers, sim.shape[0], "layers", "sim")]
    off = blank_diagonal(sim)
    fig = go.Figure(
        go.Heatmap(
            z=off,
            x=layers,
            y=layers,
            **colour_range(off),
            colorbar={"title": {"text": f"{esc(measure)} similarity"}},
            hovertemplate=(
                f"layer %{{y}} vs layer %{{x}}<br>{esc(measure)} similarity %{{z:.3f}}<extra></extra>"
            ),
        )
    )
    if len(layers) > 1:
        fig.add_trace(diagonal_marks(layers, np.diag(sim), "layer %{y} with itself"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return finish(
        fig,
        title or f"Router weight similarity between layers ({measure})",
        "MoE layer (model layer index)",
        "MoE layer (model layer index)",
        height=heatmap_height(len(layers)),
    )


def utilization_heatmap(
    util: np.ndarray,
    layers: Sequence[int],
    title: str | None = None,
    value_label: str = "share of routed tokens",
) -> go.Figure:
    """Expert load per layer ``[L, E]``: a sequential scale from 0 (a share is never negative); the title gives 1/E."""
    util = as_array(util, 2, "util")
    layers = check_len(layers, util.shape[0], "layers", "util rows")
    num_experts = util.shape[1]
    fig = go.Figure(
        go.Heatmap(
            z=util,
            x=list(range(num_experts)),
            y=[int(v) for v in layers],
            **colour_range(util),
            colorbar={"title": {"text": esc(value_label)}},
            hovertemplate=(
                f"layer %{{y}}<br>expert %{{x}}<br>{esc(value_label)} %{{z:.4f}}<extra></extra>"
            ),
        )
    )
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_xaxes(dtick=1 if num_experts <= 32 else None)
    return finish(
        fig,
        title or f"Expert utilization per layer (uniform load 1/E = {1 / num_experts:.3g})",
        "expert index",
        "MoE layer (model layer index)",
        height=heatmap_height(len(layers)),
    )


def entropy_per_layer(
    entropy: np.ndarray,
    layers: Sequence[int],
    max_entropy: float | None = None,
    std: np.ndarray | None = None,
    title: str | None = None,
    unit: str = "nats",
    label: str = "mean routing entropy",
) -> go.Figure:
    """Routing entropy per layer, with the maximum (uniform routing) as a reference line."""
    entropy = as_array(entropy, 1, "entropy")
    layers = check_len(layers, entropy.shape[0], "layers", "entropy")
    error_y = None
    if std is not None:
        std = as_array(std, 1, "std")
        check_len(std, entropy.shape[0], "std", "entropy")
        error_y = {"type": "data", "array": std, "visible": True}
    fig = go.Figure(
        go.Scatter(
            x=[int(v) for v in layers],
            y=entropy,
            mode="lines+markers",
            name=esc(label),
            error_y=error_y,
            hovertemplate=f"layer %{{x}}<br>{esc(label)} %{{y:.4f}} {esc(unit)}<extra></extra>",
        )
    )
    if max_entropy is not None:
        fig.add_hline(
            y=float(max_entropy),
            line_dash="dash",
            line_color="gray",
            annotation_text=f"uniform routing ({float(max_entropy):.3f} {esc(unit)})",
        )
    fig.update_xaxes(type="category")
    return finish(
        fig, title or "Routing entropy per layer", "MoE layer (model layer index)",
        f"entropy ({unit})",
    )


def correlation_matrix(
    corr: np.ndarray,
    feature_labels: Sequence[str],
    title: str | None = None,
    measure: str = "Pearson r",
) -> go.Figure:
    """Correlation between routing features (e.g. layer/expert pairs across layers)."""
    corr = as_array(corr, 2, "corr")
    check_square(corr, "corr")
    labels = [esc(v) for v in check_len(feature_labels, corr.shape[0], "feature_labels", "corr")]
    unique = len(set(labels)) == len(labels)
    # Unique labels go straight on categorical axes (hover reads them, nothing duplicated);
    # repeated labels need index axes plus per-cell label pairs so cells stay apart.
    axis_vals: list = labels if unique else list(range(len(labels)))
    extra = {} if unique else {
        "customdata": np.array([[[a, b] for b in labels] for a in labels], dtype=object)
    }
    names = ("%{y}", "%{x}") if unique else ("%{customdata[0]}", "%{customdata[1]}")
    fig = go.Figure(
        go.Heatmap(
            z=corr,
            x=axis_vals,
            y=axis_vals,
            colorscale=DIVERGING,
            zmin=-1.0,
            zmax=1.0,
            colorbar={"title": {"text": esc(measure)}},
            hovertemplate=f"{names[0]} vs {names[1]}<br>{esc(measure)} %{{z:.3f}}<extra></extra>",
            **extra,
        )
    )
    show_ticks = len(labels) <= 64
    if unique:
        fig.update_xaxes(type="category", showticklabels=show_ticks)
        fig.update_yaxes(type="category", showticklabels=show_ticks, autorange="reversed")
    else:
        axis = {"tickmode": "array", "tickvals": axis_vals, "ticktext": labels} if show_ticks else {}
        fig.update_xaxes(**axis)
        fig.update_yaxes(autorange="reversed", **axis)
    return finish(
        fig, title or f"Cross-layer routing correlation ({measure})", "feature (layer / expert)",
        "feature (layer / expert)", height=heatmap_height(len(labels), per_row=14),
    )


def coactivation_heatmap(
    coact: np.ndarray,
    layer: int,
    title: str | None = None,
    measure: str = "co-activation rate",
) -> go.Figure:
    """How often two experts of one layer are chosen for the same token ``[E, E]`` (diagonal blank: an expert with itself)."""
    coact = as_array(coact, 2, "coact")
    check_square(coact, "coact")
    experts = list(range(coact.shape[0]))
    off = blank_diagonal(coact)
    fig = go.Figure(
        go.Heatmap(
            z=off,
            x=experts,
            y=experts,
            **colour_range(off),
            colorbar={"title": {"text": esc(measure)}},
            hovertemplate=(
                f"layer {int(layer)}<br>expert %{{y}} with expert %{{x}}<br>"
                f"{esc(measure)} %{{z:.4f}}<extra></extra>"
            ),
        )
    )
    if len(experts) > 1:
        fig.add_trace(diagonal_marks(experts, np.diag(coact), f"layer {int(layer)}<br>expert %{{y}} with itself"))
    dtick = 1 if len(experts) <= 32 else None
    fig.update_xaxes(dtick=dtick)
    fig.update_yaxes(autorange="reversed", dtick=dtick)
    return finish(
        fig, title or f"Expert co-activation in layer {int(layer)}", "expert index", "expert index",
        height=heatmap_height(len(experts), per_row=10),
    )


def _check_paths(
    paths: Sequence[tuple[int, ...]], counts: Sequence[float], layers: Sequence[int]
) -> tuple[list[int], list[tuple[int, ...]], np.ndarray]:
    """The Sankey's inputs as ints and an array, refused with one line when paths, counts and layers disagree."""
    layers = [int(v) for v in layers]
    if len(layers) < 2:
        raise FigureInputError("layers: a routing path needs at least 2 layers")
    counts_arr = as_array(counts, 1, "counts")
    paths = [tuple(int(e) for e in p) for p in paths]
    check_len(paths, counts_arr.shape[0], "paths", "counts")
    for i, path in enumerate(paths):
        if len(path) != len(layers):
            raise FigureInputError(
                f"paths[{i}]: has {len(path)} experts but layers has {len(layers)}"
            )
    return layers, paths, counts_arr


def _path_flows(
    paths: list[tuple[int, ...]], counts: np.ndarray, num_layers: int
) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], float]]:
    """Sankey node ids per (position, expert) in first-seen order, and the summed flow between neighbouring nodes."""
    nodes: dict[tuple[int, int], int] = {}
    for path in paths:
        for pos, expert in enumerate(path):
            nodes.setdefault((pos, expert), len(nodes))
    flows: dict[tuple[int, int], float] = defaultdict(float)
    for path, count in zip(paths, counts):
        for pos in range(num_layers - 1):
            flows[(nodes[(pos, path[pos])], nodes[(pos + 1, path[pos + 1])])] += float(count)
    return nodes, flows


def routing_paths_sankey(
    paths: Sequence[tuple[int, ...]],
    counts: Sequence[float],
    layers: Sequence[int],
    title: str | None = None,
    unit: str = "tokens",
) -> go.Figure:
    """Most frequent expert paths through consecutive layers, as a Sankey diagram.

    ``paths[i]`` gives the (top-1) expert at each of ``layers`` and ``counts[i]`` how many
    tokens took that path; flows between neighbouring layers are summed over paths.
    """
    layers, paths, counts_arr = _check_paths(paths, counts, layers)
    nodes, flows = _path_flows(paths, counts_arr, len(layers))
    order = sorted(nodes, key=lambda k: nodes[k])
    span = max(len(layers) - 1, 1)
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={
                "label": [f"L{layers[pos]} E{expert}" for pos, expert in order],
                "x": [0.01 + 0.98 * pos / span for pos, _ in order],
                "customdata": [[layers[pos], expert] for pos, expert in order],
                "hovertemplate": (
                    f"layer %{{customdata[0]}}<br>expert %{{customdata[1]}}<br>"
                    f"%{{value:.0f}} {esc(unit)}<extra></extra>"
                ),
                "pad": 8,
            },
            link={
                "source": [s for s, _ in flows],
                "target": [t for _, t in flows],
                "value": list(flows.values()),
                "customdata": [
                    [layers[order[s][0]], order[s][1], layers[order[t][0]], order[t][1]]
                    for s, t in flows
                ],
                "hovertemplate": (
                    "layer %{customdata[0]} expert %{customdata[1]} → "
                    "layer %{customdata[2]} expert %{customdata[3]}<br>"
                    f"%{{value:.0f}} {esc(unit)}<extra></extra>"
                ),
            },
        )
    )
    return finish(
        fig, title or f"Most frequent routing paths ({unit})", "MoE layer (left to right)", "",
        height=heatmap_height(len(nodes) // max(len(layers), 1), per_row=40),
    )
