"""Router weights: similarity between layers' routers (Hungarian-matched against a router with its rows mixed) and their SVD subspaces."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.router_weights import RouterAnalyzer
from core.pipeline.reuse import weights_identity
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import plotting as P
from viz.run_report import ReportPage, matrix_frame

NDIF = "the model ran on NDIF: its weights are not here"


def no_weights(ctx: Any) -> str | None:
    """Why weight analyses cannot run: a model traced on NDIF leaves its weights there."""
    return None if ctx.sweep.router_weights else NDIF


def _hungarian(sim: Any) -> str:
    """How many adjacent layers' routers match beyond the mixed-rows null (Holm-corrected over the pairs), and the strongest pair."""
    adj = [(i, i + 1) for i in range(len(sim.layers) - 1)]
    q = np.array([sim.hungarian_p_adjusted[a, b] for a, b in adj], float)
    gap = np.array([sim.hungarian_cosine[a, b] - sim.hungarian_null_mean[a, b] for a, b in adj], float)
    sig = q < 0.05
    i = int(np.argmax(np.where(sig, gap, -np.inf)) if sig.any() else np.argmax(gap))
    a, b = adj[i]
    note = "Holm: ≈ 0.05 false per run" if len(adj) > 1 else "0.05 false per run by chance"  # as findings_text.flagged
    return (f"Hungarian-matched router cosine (null: experts' rows mixed by a random rotation that "
            f"keeps the router's covariance): {int(sig.sum())} of {len(adj)} adjacent pairs beyond the null ({note}); "
            f"{'strongest' if sig.any() else 'largest'}: layers {sim.layers[a]}–{sim.layers[b]}, "
            f"{sim.hungarian_cosine[a, b]:.3f} against {sim.hungarian_null_mean[a, b]:.3f} (95% range "
            f"{sim.hungarian_null_low[a, b]:.3f}–{sim.hungarian_null_high[a, b]:.3f})"
            + ("" if sig[i] else ", not distinguishable")
            + ("" if getattr(sim, "centered", False) else "; rows not centred (sigmoid router)") + ".")


def _adjacent_flags(sim: Any) -> np.ndarray:
    """``[L - 1]``: which adjacent layer pairs the finding counts as matched (Holm-corrected p < 0.05)."""
    i = np.arange(len(sim.layers) - 1)
    return np.asarray(sim.hungarian_p_adjusted, float)[i, i + 1] < 0.05


def _weights_section(r: Mapping[str, Any], page: ReportPage) -> None:
    sim = r.get("router_similarity")
    if sim is None:
        return
    centred = ("Router rows are centred first (a softmax router is unchanged by adding one vector to all its rows)"
               if getattr(sim, "centered", False) else "Router rows are compared as they are (sigmoid routers: a shift changes routing)")
    page.section("Router and expert weights", f"{centred}. Router similarity between layers; the subspace similarity of "
                    f"random routers of this shape is rank/H = {sim.subspace_baseline:.3f}. The Hungarian-matched cosine is "
                    "tested against the same statistic with one router's expert rows mixed by a random rotation that keeps "
                    "its mean row and covariance (so shared anisotropy is not mistaken for a match); adjacent pairs are "
                    "Holm-corrected.")
    page.figure("Router and expert weights", "router_similarity_hungarian", P.router_similarity_heatmap(sim.hungarian_cosine, sim.layers, measure="Hungarian-matched cosine"),
        matrix_frame(sim.hungarian_cosine, [str(l) for l in sim.layers]))
    if len(sim.layers) > 1:
        page.figure("Router and expert weights", "hungarian_cosine_vs_null",
            P.hungarian_cosine_vs_null(sim.hungarian_cosine, sim.hungarian_null_mean, sim.hungarian_null_low, sim.hungarian_null_high, sim.layers),
            {"observed": sim.hungarian_cosine, "null_mean": sim.hungarian_null_mean, "p": sim.hungarian_p,
             "p_adjusted": sim.hungarian_p_adjusted})
    page.figure("Router and expert weights", "router_similarity_subspace", P.router_similarity_heatmap(
        sim.subspace_similarity, sim.layers, title="Router subspace similarity (mean cos² of principal angles)",
        measure="subspace"),  # the measure's full name in the title: at 16 layers it ran off the figure
        matrix_frame(sim.subspace_similarity, [str(l) for l in sim.layers]))
    sub = r.get("router_subspaces")
    if sub is not None:
        page.figure("Router and expert weights", "router_svd", P.svd_spectra({l: s for l, s in zip(sub.layers, sub.singular_values)}),
            pd.DataFrame({"layer": sub.layers, "effective_rank": sub.effective_rank, "stable_rank": sub.stable_rank}))
    al = r.get("expert_alignment")
    if al is not None:
        page.figure("Router and expert weights", "router_expert_alignment",
            P.alignment_vs_baseline(al.own, al.other_mean, al.random_mean.mean(axis=1), None, al.layers, null_mean=al.perm_null_mean,
                                    null_low=al.perm_null_low, null_high=al.perm_null_high,
                                    measure="share of router-row energy in the expert's input subspace"),
            pd.DataFrame({"layer": al.layers, "own": al.mean_own, "experts_permuted": al.perm_null_mean, "null_low": al.perm_null_low,
                          "null_high": al.perm_null_high, "p": al.perm_p, "p_adjusted": al.perm_p_adjusted, "effect": al.effect, "random_subspace_r_over_H": al.mean_random}))


def _nulls(ctx: Any) -> int:
    return 20 if ctx.micro else 100


def _similarity(ctx: Any, results: Mapping[str, Any]) -> Any:
    return RouterAnalyzer(score_fn=ctx.score_fn).compute_router_similarity_matrix(
        ctx.sweep.router_weights[-1], num_null=_nulls(ctx), seed=ctx.seed)


def _findings(sim: Any, record: Any) -> list[Finding]:
    if not hasattr(sim, "hungarian_p_adjusted") or len(sim.layers) <= 1:
        return []
    return [Finding("router_similarity", _hungarian(sim), ("hungarian_cosine_vs_null",))]


register(AnalysisSpec(
    "router_similarity", "after", order=50, lead=85, compute=_similarity, skip=no_weights, findings=_findings,
    reuse_key=lambda ctx, results: weights_identity(ctx, False, nulls=_nulls(ctx)),  # the final routers alone
    decisions=lambda sim: {"router_pairs_hungarian": _adjacent_flags(sim)},
    report=lambda sim, record, page: _weights_section(record.results, page),
    notes="Hungarian-matched cosine and subspace similarity between layers' routers",
))
register(AnalysisSpec(
    "router_subspaces", "after", order=51, skip=no_weights,
    compute=lambda ctx, results: RouterAnalyzer(score_fn=ctx.score_fn).analyze_router_subspaces(ctx.sweep.router_weights[-1]),
    notes="singular values and effective rank of each router (drawn in the weights section)",
))
