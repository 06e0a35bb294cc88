"""Routing statistics: expert load per layer and its diagnosis (dead, dominant, collapsed, imbalanced), overall and per dataset."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.routing_stats import RoutingStatsAccumulator
from core.analysis.streaming import PerGroup
from core.pipeline.findings_text import est_of, flagged, layer_list, quote
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import plotting as P
from viz.run_report import ReportPage, parameter_table


def load_balance(stats: Any) -> str:
    """The least balanced layer, how many layers are less even than uniform routing, and the diagnoses counted."""
    est = est_of(stats, "utilization_entropy_norm")
    diag = ", ".join(f"{c} {kind}" for kind in ("collapsed", "imbalanced", "healthy") if (c := list(stats.diagnosis).count(kind)))
    L = len(stats.moe_layers)
    if est is None:
        li = int(np.argmin(stats.utilization_entropy_norm))
        return (f"Load balance (normalized utilization entropy, 1 = uniform; no interval: resampling off): lowest at layer "
                f"{stats.moe_layers[li]}, {stats.utilization_entropy_norm[li]:.3f}; {diag} of {L} layers.")
    li = int(np.argmin(est.value))
    return (f"Load balance (utilization entropy / log E; null: experts relabelled per document block): "
            f"lowest at layer {stats.moe_layers[li]}, {quote(est.at(li), null='')}; "
            f"{flagged(est, 'layers', 'less even than a balanced load')}; {diag} of {L} layers.")


_COUNT_REASON = re.compile(r"^\d+ (dead|dominant) experts\b")  # "3 dead experts": counted from stats.dead/dominant


def _problem_line(stats: Any, kind: str, note: str | None) -> str | None:
    """One line for all layers of one diagnosis: which layers, and in how many of them each reason holds."""
    idx = [i for i, d in enumerate(stats.diagnosis) if d == kind]
    if not idx:
        return None
    parts = []
    for what, mask in (("dead", stats.dead), ("dominant", stats.dominant)):
        rows = [i for i in idx if any((m := _COUNT_REASON.match(r)) and m.group(1) == what for r in stats.reasons[i])]
        if rows:
            parts.append(f"{what} experts in {len(rows)} ({int(np.asarray(mask, bool)[rows].sum())} in all)")
    other: dict[str, list[tuple[int, str]]] = {}  # the other reasons, grouped by their wording without the numbers
    for i in idx:
        for why in stats.reasons[i]:
            if not _COUNT_REASON.match(why):
                other.setdefault(re.sub(r"\d+(\.\d+)?", "#", why), []).append((stats.moe_layers[i], why))
    for hits in other.values():
        layer, why = hits[0]
        parts.append(f"{why} at layer {layer}" + (f" and {len(hits) - 1} more" if len(hits) > 1 else ""))
    one = len(idx) == 1
    return (f"{'layer' if one else 'layers'} {layer_list([stats.moe_layers[i] for i in idx])} of {len(stats.moe_layers)} "
            f"{'is' if one else 'are'} {kind}: " + "; ".join(parts)
            + " (see the routing statistics section" + (f"; {note}" if note else "") + ")")


def _warnings(stats: Any, record: Any) -> list[str]:
    """One line per kind of problem (collapsed layers, imbalanced layers), layers named compactly."""
    out = []
    note = getattr(stats, "null_note", None)  # what the thresholds were judged against: said once
    for kind in ("collapsed", "imbalanced"):
        if line := _problem_line(stats, kind, note):
            out.append(line)
            note = "judged as above" if note else note
    return out


def _headline(stats: Any, record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"utilization_entropy_norm": [round(float(x), 4) for x in stats.utilization_entropy_norm],
                           "diagnosis": list(stats.diagnosis)}
    if stats.token_entropy_norm is not None:
        out["token_entropy_norm"] = [round(float(x), 4) for x in stats.token_entropy_norm]
    return out


def _stats_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Utilization per layer and expert, overall and per dataset; token entropy against log E."""
    stats = r.get("routing_stats")
    if stats is not None:
        L, E = list(stats.moe_layers), stats.num_experts
        page.section("Routing statistics", "Expert utilization per layer and the diagnosis of each layer; its thresholds, "
                        "in units of the uniform share 1/E, are in the table below.")
        null = getattr(stats, "null_note", "")
        page.table("Routing statistics", parameter_table(stats.thresholds.to_dict()), "diagnosis_thresholds",
                      caption="Thresholds of the dead / dominant / collapsed / imbalanced diagnosis"
                      + (f". The null: {null}." if null else "."))
        page.table("Routing statistics", pd.DataFrame({"layer": L, "diagnosis": stats.diagnosis,
                                                          "why": ["; ".join(w) for w in stats.reasons]}),
                      "diagnosis_per_layer", caption="Each layer's diagnosis and what raised it (beyond the null above).")
        page.figure("Routing statistics", "utilization", P.utilization_heatmap(stats.utilization, L), stats.expert_table())
        if stats.token_entropy is not None:
            page.figure("Routing statistics", "token_entropy", P.entropy_per_layer(stats.token_entropy, L, max_entropy=math.log(E)),
                stats.layer_table(), caption="Mean entropy of each token's routing distribution; the dashed line is log E (uniform).")
        for name, s in (r.get("routing_stats_by_dataset") or {}).items():
            page.figure("Routing statistics", f"utilization_{name}", P.utilization_heatmap(s.utilization, L, title=f"Expert utilization on {name}"),
                s.expert_table())


def _tables(stats: Any, record: Any, decode: Any) -> dict[str, pd.DataFrame]:
    """Utilization per (dataset, layer, expert) and the per-layer summary, as W&B tables."""
    parts = [stats.expert_table().assign(dataset="all")]
    parts += [s.expert_table().assign(dataset=name) for name, s in (record.get("routing_stats_by_dataset") or {}).items()]
    return {"tables/expert_utilization": pd.concat(parts, ignore_index=True), "tables/layer_summary": stats.layer_table()}


register(AnalysisSpec(
    "routing_stats", "pass", order=10, lead=90,
    build=lambda ctx: RoutingStatsAccumulator(resamples=ctx.resamples, seed=ctx.seed),
    headline=_headline,
    estimates=lambda stats: {"load_balance": est_of(stats, "utilization_entropy_norm")},
    decisions=lambda stats: {"load_balance": est_of(stats, "utilization_entropy_norm"), "dominant_experts": stats.dominant,
                             "dead_experts": stats.dead},
    findings=lambda stats, record: [Finding("routing_stats", load_balance(stats), ("utilization",),
                                            est_of(stats, "utilization_entropy_norm"))],
    warnings=_warnings,
    report=lambda stats, record, page: _stats_section(record.results, page),
    wandb_tables=_tables,
    notes="expert utilization, token entropy, load balance and the per-layer diagnosis",
))
register(AnalysisSpec(
    "routing_stats_by_dataset", "pass", order=11,
    build=lambda ctx: PerGroup(RoutingStatsAccumulator, by="dataset"),
    notes="the routing statistics of each dataset (drawn in the routing statistics section)",
))
