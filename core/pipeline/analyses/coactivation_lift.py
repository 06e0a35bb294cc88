"""Co-activation as lift over independence, against the within-document null (OLMoE's Fig. 21), with its finding."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.analysis.coactivation_lift import CoactivationLiftAccumulator
from core.pipeline.findings_text import est_of, f3, flagged, quote, strongest
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import matrix_views as V
from viz.figures_lift import lift_by_layer
from viz.run_report import ReportPage, experts_note

SECTION = "Co-activation and routing paths"


def lift_finding(res: Any, record: Any = None) -> list[Finding]:
    """How many layers have an expert pair picked together beyond the document null, and the strongest pair."""
    est = est_of(res, "pair_lift")
    if est is None:
        return []
    layers = res.moe_layers
    per_layer = np.asarray(est.distinguishable, bool).reshape(len(layers), -1).any(1)
    text = ("Co-activation (lift: P(i and j both in the top-k) / (P(i) P(j)); null: tokens shuffled within documents, "
            "exact): ")
    if est.why_none and not np.isfinite(np.asarray(est.low, float)).any():
        text += flagged(est, "expert pairs")
    else:
        hits = int(np.asarray(est.distinguishable, bool).sum())
        text += (f"{int(per_layer.sum())} of {len(layers)} layers have a pair co-selected beyond the null, {hits} of "
                 f"{est.family} pairs in all (Holm over the pairs of all layers: ≈ {est.expected_false:.2g} false per run)")
        li, i, j = strongest(est)
        text += f"; strongest: layer {layers[li]}, experts {i} and {j}, lift " + quote(est.at((li, i, j)), null="")
    text += f" (uniform top-{res.top_k} routing: {f3(res.uniform_lift)})."
    return [Finding("coactivation_lift", text, ("coactivation_lift",), est)]


def lift_section(res: Any, record: Any, page: ReportPage) -> None:
    """The lift of a few layers as heatmaps (a menu picks the layer) and every layer's strongest pairs with intervals."""
    layers, E = list(res.moe_layers), res.num_experts
    shown = V.spread(len(layers))
    keep = [V.top_experts(res.counts[li], E) for li in shown]
    mats = [np.asarray(res.lift[li])[np.ix_(k, k)] for li, k in zip(shown, keep)]
    nulls = [np.asarray(res.null_lift[li])[np.ix_(k, k)] for li, k in zip(shown, keep)]
    est = est_of(res, "pair_lift")
    top = strongest(est)[0] if est is not None else -1  # open on the layer of the strongest pair where it is shown
    first = shown.index(top) if top in shown else 0
    page.section(SECTION)
    page.figure(SECTION, "coactivation_lift", lift_by_layer(mats, [layers[li] for li in shown], keep, nulls, shown=first),
                res.top_pairs(5), arrays=["coactivation_lift/lift", "coactivation_lift/null_lift"],
                caption=f"Lift over independence of each pair of experts (1: picked independently; colour on a log "
                        f"scale). Under uniform top-{res.top_k} routing a pair's lift is {f3(res.uniform_lift)}, "
                        "below 1, since a token's k experts are distinct. The table lists each layer's strongest "
                        "pairs with their 95% interval over documents and the within-document null (a pair of "
                        f"experts that share a topic has a null above 1).{experts_note(E)}")


register(AnalysisSpec(
    "coactivation_lift", "pass", order=32, lead=35,
    build=lambda ctx: CoactivationLiftAccumulator(resamples=ctx.resamples, seed=ctx.seed),
    decisions=lambda res: {"coactivation_lift_pairs": est_of(res, "pair_lift")},
    findings=lift_finding,
    report=lift_section,
    notes="lift over independence of every expert pair per layer, against the within-document shuffle",
))
