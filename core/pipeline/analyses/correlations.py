"""Cross-layer correlation of expert selection (and router probabilities), per dataset and between datasets."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from core.analysis.correlations import (
    CorrelationAccumulator,
    adjacent_and_far,
    correlation_difference,
)
from core.analysis.streaming import PerGroup, WhenRecorded
from core.pipeline.findings_text import est_of, f3, flagged, quote, strongest
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import matrix_views as V
from viz import plotting as P
from viz.run_report import ReportPage, matrix_frame, pair_picker


def _adjacent_vs_far(layer_mean_abs: np.ndarray) -> tuple[float | None, float | None]:
    """``adjacent_and_far`` of the correlation analysis, rounded, None where there are no such layer pairs."""
    return tuple(round(float(v), 4) if np.isfinite(v) else None for v in adjacent_and_far(layer_mean_abs))


def correlation(corr: Any, adj: float | None, far: float | None) -> str:
    """Adjacent against non-adjacent layers, and how many layer pairs correlate beyond the shift (corrected)."""
    ea, ef, pairs = est_of(corr, "adjacent"), est_of(corr, "non_adjacent"), est_of(corr, "layer_link")
    text = ("Cross-layer correlation of expert selection (mean |r|; null: layers shifted within documents; verdicts: "
            "held-out documents, Holm, ≈ 0.05 false per run): adjacent layers ")
    if ea is not None:
        text += quote(ea, null="")
    else:  # undefined where a layer's selection never varies (every token to one expert: top-1 on a collapsed layer)
        text += f3(adj) if adj is not None else "undefined (a layer's expert selection never varies)"
    if far is not None:
        text += "; non-adjacent " + (quote(ef, null="") if ef is not None else f3(far))
    L = len(corr.moe_layers)
    if pairs is not None and L > 2 and np.isfinite(np.asarray(pairs.low, float)).any():
        sub = _upper(pairs)
        i = strongest(sub)
        iu = np.triu_indices(L, k=1)
        text += f"; {flagged(sub, 'layer pairs', 'linked', correction=False)}"
        if np.asarray(sub.distinguishable).any():
            text += f" (furthest: layers {corr.moe_layers[iu[0][i]]}–{corr.moe_layers[iu[1][i]]})"
    elif pairs is not None and pairs.why_none:
        text += f"; {flagged(pairs, 'layer pairs')}"
    if corr.undefined_features:
        n = corr.undefined_features
        text += f"; {n} constant feature{'s' if n > 1 else ''} left out"
    return text + "."


def _upper(est: Any) -> Any:
    """The layer pairs of an ``[L, L]`` Estimate, each once (its upper triangle), in ``np.triu_indices`` order."""
    if est is None:
        return None
    return est.at(np.triu_indices(np.shape(est.value)[0], k=1))


def _usage(r: dict[str, Any]) -> np.ndarray | None:
    """Each layer's expert load ``[L, E]``: which experts a wide model's expert-level figures keep."""
    stats, co = r.get("routing_stats"), r.get("coactivation")
    if stats is not None:
        return np.asarray(stats.utilization, dtype=float)
    return None if co is None else np.asarray(co.counts, dtype=float)


def _correlation_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Cross-layer correlation: layer-level summaries, and the expert level of one layer pair at a time."""
    corr = r.get("correlation_topk")
    if corr is None:
        return
    sec, layers, E, usage = "Cross-layer correlations", list(corr.moe_layers), corr.num_experts, _usage(r)
    page.section(sec, "Pearson correlation over tokens of expert-selection indicators (and router probabilities). "
                    "Each layer-level summary is the mean |r| over all expert pairs of two layers; the expert-level "
                    "figure below it shows one layer pair at a time.")
    for key, res, what in (("correlation_topk", corr, "expert selection"), ("correlation_probs", r.get("correlation_probs"), "router probabilities")):
        if res is None:
            continue
        summary = "correlation_layer_summary" if key == "correlation_topk" else f"{key}_layer_summary"
        page.figure(sec, summary, P.router_similarity_heatmap(res.layer_mean_abs, layers, title=f"Mean |r| between layers' {what}", measure="mean |r|"),
            matrix_frame(res.layer_mean_abs, [str(l) for l in layers]), arrays=[f"{key}/corr"])
        picked = pair_picker(res.corr, E, layers, res.layer_mean_abs, usage, f"Correlation of {what}", "Pearson r", "mean |r|")
        if picked is not None:
            page.figure(sec, key, picked[0], picked[1], caption=picked[2], arrays=[f"{key}/corr"])
        if len(layers) > 1:
            page.table(sec, V.per_layer_table(res.corr, E, layers), f"{key}_pairs_per_layer",
                          caption=f"Each layer's three strongest expert pairs with any other layer ({what}, over all layer pairs).")
    for pair, diff in (r.get("correlation_difference") or {}).items():
        slug = "".join(c if c.isalnum() else "_" for c in f"{diff.group_a}_vs_{diff.group_b}")
        key = f"correlation_difference/{pair}/diff"
        page.figure(sec, f"correlation_diff_{slug}_layer_summary",
            P.router_similarity_heatmap(diff.layer_mean_abs_diff, layers, title=f"Mean |Δr| between layers: {pair}", measure="mean |Δr|"),
            matrix_frame(diff.layer_mean_abs_diff, [str(l) for l in layers]), arrays=[key])
        picked = pair_picker(diff.diff, E, layers, diff.layer_mean_abs_diff, usage, f"Correlation difference {pair}", "Δ Pearson r", "mean |Δr|")
        if picked is not None:
            page.figure(sec, f"correlation_diff_{slug}", picked[0], picked[1], caption=picked[2], arrays=[key])


def _headline(corr: Any, record: Any) -> dict[str, Any]:
    adj, far = _adjacent_vs_far(corr.layer_mean_abs)
    return {"corr_adjacent_mean_abs": adj, "corr_nonadjacent_mean_abs": far}


def _findings(corr: Any, record: Any) -> list[Finding]:
    if corr.layer_mean_abs.shape[0] <= 1:
        return []
    return [Finding("correlation_topk", correlation(corr, *_adjacent_vs_far(corr.layer_mean_abs)),
                    ("correlation_layer_summary", "correlation_topk"), est_of(corr, "adjacent"))]


def _differences(ctx: Any, results: Mapping[str, Any]) -> dict[str, Any] | None:
    """Each dataset's correlation minus the next one's (None with fewer than two datasets)."""
    by_ds = results.get("correlation_by_dataset")
    names = list(by_ds or [])
    if len(names) < 2:
        return None
    return {f"{a} - {b}": correlation_difference(by_ds[a], by_ds[b]) for a, b in zip(names, names[1:])}


register(AnalysisSpec(
    "correlation_topk", "pass", order=20, lead=20,
    build=lambda ctx: CorrelationAccumulator("topk", resamples=ctx.resamples, seed=ctx.seed),
    headline=_headline,
    estimates=lambda corr: {"corr_adjacent": est_of(corr, "adjacent"), "corr_nonadjacent": est_of(corr, "non_adjacent")},
    decisions=lambda corr: {"corr_adjacent": est_of(corr, "adjacent"), "corr_nonadjacent": est_of(corr, "non_adjacent"),
                            "corr_layer_pairs": est_of(corr, "layer_link")},
    findings=_findings,
    report=lambda corr, record, page: _correlation_section(record.results, page),
    notes="Pearson correlation over tokens of every (layer, expert) selection indicator",
))
register(AnalysisSpec(
    "correlation_probs", "pass", order=21,
    build=lambda ctx: WhenRecorded(CorrelationAccumulator("probs"), "router_logits"),
    notes="the same on router probabilities (drawn in the correlation section)",
))
register(AnalysisSpec(
    "correlation_by_dataset", "pass", order=22,
    build=lambda ctx: PerGroup(partial(CorrelationAccumulator, "topk"), by="dataset"),
    notes="the selection correlation of each dataset",
))
register(AnalysisSpec(
    "correlation_difference", "after", order=23, compute=_differences,
    notes="each dataset's correlation minus the next one's (drawn in the correlation section)",
))
