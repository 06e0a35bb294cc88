"""Turn a parsed training log into figures, warnings and one HTML report (seed 000's outputs).

The figure names match the seed's PNG files (``router_affinity_matrix_heatmap``,
``expert_utilization``, ``router_entropy``, ``routing_accuracy``) so existing habits carry over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from viz.figures_routing import utilization_heatmap
from viz.figures_training import (
    affinity_heatmap,
    layer_metric_over_time,
    training_curves,
    utilization_over_time,
)
from viz.report import Report
from viz.static_export import export_many
from viz.training_log import (
    COLLAPSE_SHARE,
    UNDERUSE_OF_UNIFORM,
    TrainingLog,
    log_warnings,
    monitor_flagged,
)


@dataclass
class TrainingLogOutputs:
    """What was written for one log."""

    report: Path
    warnings: list[str]
    figures: list[str]
    images: dict[str, Path] = field(default_factory=dict)
    static_note: str | None = None


def training_log_figures(
    log: TrainingLog,
    affinity: tuple[np.ndarray, list[str] | None, list[str] | None] | None = None,
    entropy_unit: str = "nats",
) -> list[tuple[str, str, go.Figure, pd.DataFrame]]:
    """(section, name, figure, numbers) for every figure the log supports."""
    x, xl = log.x, log.x_label
    out: list[tuple[str, str, go.Figure, pd.DataFrame]] = []
    frame = pd.DataFrame({xl: x})
    if affinity is not None:
        matrix, rows, experts = affinity
        fig = affinity_heatmap(matrix, rows, experts)
        df = pd.DataFrame(matrix, index=rows, columns=experts)
        out.append(("Routing", "router_affinity_matrix_heatmap", fig, df))
    util_df = frame.assign(**{f"expert_{e}": log.utilization[:, e] for e in range(log.num_experts)})
    out.append(("Routing", "expert_utilization", utilization_over_time(x, log.utilization, x_label=xl),
                util_df))
    max_ent = math.log(log.num_experts) if entropy_unit == "nats" else math.log2(log.num_experts)
    fig = training_curves(x, {"router entropy": log.entropy}, title="Router entropy over training",
                          x_label=xl, y_label=f"router entropy ({entropy_unit})")
    fig.add_hline(y=max_ent, line_dash="dash", line_color="gray",
                  annotation_text=f"uniform routing ({max_ent:.3f} {entropy_unit})")
    out.append(("Routing", "router_entropy", fig, frame.assign(entropy=log.entropy)))
    if np.isfinite(log.routing_acc).any():
        curves = {"routing accuracy": log.routing_acc}
        if log.routing_acc_chance is not None:
            curves["chance level"] = log.routing_acc_chance
        fig = training_curves(x, curves, title="Routing accuracy over training", x_label=xl,
                              y_label="routing accuracy (fraction, 0–1)")
        df = frame.assign(**{k.replace(" ", "_"): v for k, v in curves.items()})
        out.append(("Routing", "routing_accuracy", fig, df))
    for name, values in log.metrics.items():
        fig = training_curves(x, {name: values}, title=f"Training metric: {name}", x_label=xl,
                              y_label=name)
        out.append(("Training metrics", f"metric_{_safe(name)}", fig, frame.assign(**{name: values})))
    if log.layer_entropy is not None and log.layers is not None:
        fig = layer_metric_over_time(x, log.layer_entropy, log.layers, "router entropy",
                                     entropy_unit, x_label=xl)
        df = frame.assign(**{f"layer_{l}": log.layer_entropy[:, j] for j, l in enumerate(log.layers)})
        out.append(("Per layer", "layer_entropy", fig, df))
    if log.layer_utilization is not None and log.layers is not None:
        final = log.layer_utilization[-1]
        fig = utilization_heatmap(final, log.layers,
                                  title=f"Expert utilization per layer at {xl} {x[-1]:g}")
        df = pd.DataFrame(final, index=pd.Index(log.layers, name="layer"),
                          columns=[f"expert_{e}" for e in range(final.shape[1])])
        out.append(("Per layer", "layer_utilization", fig, df))
    if (flagged := monitor_flagged(log)) is not None:
        layers, values = flagged
        fig = layer_metric_over_time(x, values, layers, "dead + dominant experts", "count", x_label=xl,
                                     title="Routing monitor: experts flagged per layer (window of training batches)")
        df = frame.assign(**{f"layer_{l}": values[:, j] for j, l in enumerate(layers)})
        out.append(("Per layer", "routing_monitor", fig, df))
    return out


def _safe(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
    return cleaned.strip("._") or "unnamed"


def write_training_log_report(
    log: TrainingLog,
    out_dir: str | Path,
    affinity: tuple[np.ndarray, list[str] | None, list[str] | None] | None = None,
    static_format: str | None = "png",
    entropy_unit: str = "nats",
    collapse_share: float = COLLAPSE_SHARE,
    underuse_of_uniform: float = UNDERUSE_OF_UNIFORM,
) -> TrainingLogOutputs:
    """Write ``report.html`` (+ ``data/``) and, where possible, static images into ``out_dir``."""
    out_dir = Path(out_dir)
    warnings = log_warnings(log, collapse_share, underuse_of_uniform)
    figures = training_log_figures(log, affinity, entropy_unit)
    summary: dict[str, object] = {
        "training log": str(log.path),
        "records": len(log.epochs),
        "epochs": f"{log.epochs[0]:g} – {log.epochs[-1]:g}",
        "experts": log.num_experts,
    }
    if log.steps is not None:
        summary["steps"] = f"{log.steps[0]:g} – {log.steps[-1]:g}"
    if log.tokens is not None:
        summary["tokens"] = int(log.tokens[-1])
    if log.layers is not None:
        summary["MoE layers"] = log.layers
    for name, values in log.metrics.items():
        summary[f"final {name}"] = float(values[-1])
    summary["thresholds"] = (
        f"collapse: one expert ≥ {collapse_share:.0%} of routing; under-use: an expert ≤ "
        f"{underuse_of_uniform:.0%} of the uniform share 1/E"
    )
    report = Report("MoE training log", summary, warnings)
    report.add_section("Routing", "How the router distributes inputs over experts during training.")
    for section, name, fig, df in figures:
        report.add_figure(section, fig, name, data=df)
    images: dict[str, Path] = {}
    note = None
    if static_format:
        images, note = export_many({n: f for _, n, f, _ in figures}, out_dir / "figures",
                                   fmt=static_format)
    path = report.write(out_dir)
    return TrainingLogOutputs(path, warnings, [n for _, n, _, _ in figures], images, note)
