"""Within-layer co-activation of experts, and the most common top-1 paths through the layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.coactivation import CoactivationAccumulator, RoutingPathsAccumulator
from core.pipeline.spec import AnalysisSpec, register
from viz import matrix_views as V
from viz import plotting as P
from viz.run_report import ReportPage, experts_note


def _coactivation_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Within-layer co-activation (one layer at a time, a bounded set of layers) and the most common top-1 paths."""
    co = r.get("coactivation")
    sec = "Co-activation and routing paths"
    if co is not None:
        page.section(sec, "P(expert j selected | expert i selected) within each layer; the most common top-1 paths through the layers.")
        layers, E = list(co.moe_layers), co.num_experts
        shown = V.spread(len(layers))
        keep = [V.top_experts(co.counts[li], E) for li in shown]
        cond = [np.asarray(co.conditional[li])[np.ix_(k, k)] for li, k in zip(shown, keep)]
        which = "every MoE layer" if len(shown) == len(layers) else f"{len(shown)} of the {len(layers)} MoE layers, evenly spaced"
        page.figure(sec, "coactivation", P.coactivation_by_layer(cond, [layers[li] for li in shown], keep, measure="P(j | i)"),
            _coactivation_table(co), arrays=["coactivation/conditional"],
            caption=f"Pick a layer in the menu ({which}).{experts_note(E)} Rows: expert i; columns: expert j. "
                    "The numbers list each layer's strongest pairs.")
    paths = r.get("routing_paths")
    if paths is not None and paths.top_paths and len(paths.layers) > 1:
        page.figure(sec, "routing_paths", P.routing_paths_sankey(paths.top_paths, paths.top_counts, paths.layers),
            paths.table(), caption=f"Path entropy {paths.entropy:.3f} nats (normalized {paths.entropy_norm:.3f}); {paths.num_unique} distinct paths.")


def _coactivation_table(co: Any, n: int = 10) -> pd.DataFrame:
    """Each layer's ``n`` largest P(j | i) between two different experts."""
    frames = []
    for li, layer in enumerate(co.moe_layers):
        m = np.array(co.conditional[li], dtype=float)
        np.fill_diagonal(m, np.nan)
        flat = np.nan_to_num(m, nan=-1.0).ravel()
        top = np.argsort(-flat, kind="stable")[:n]
        frames.append(pd.DataFrame({"layer": layer, "expert_i": top // m.shape[1], "expert_j": top % m.shape[1],
                                    "p_j_given_i": m.ravel()[top]}))
    return pd.concat(frames, ignore_index=True)


register(AnalysisSpec(
    "coactivation", "pass", order=30, build=lambda ctx: CoactivationAccumulator(),
    report=lambda co, record, page: _coactivation_section(record.results, page),
    notes="P(expert j selected | expert i selected) within each layer",
))
register(AnalysisSpec(
    "routing_paths", "pass", order=31, build=lambda ctx: RoutingPathsAccumulator(top_n=20),
    notes="the most common top-1 paths through the layers (drawn in the co-activation section)",
))
