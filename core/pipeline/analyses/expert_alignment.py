"""Router–expert alignment: how much of a router row's energy lies in its own expert's input subspace, against permuted experts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from core.analysis.expert_alignment import ExpertAnalyzer
from core.pipeline.analyses.router_weights import no_weights
from core.pipeline.reuse import weights_identity
from core.pipeline.spec import AnalysisSpec, Finding, register


def _alignment(align: Any) -> str:
    """How many layers' routers point into their own experts' input subspaces beyond permuted experts (Holm over the layers)."""
    q, L = np.asarray(align.perm_p_adjusted, float), len(align.layers)
    sig = q < 0.05
    effect = np.asarray(align.mean_own, float) - np.asarray(align.perm_null_mean, float)
    i = int(np.argmax(np.where(sig, effect, -np.inf)) if sig.any() else np.argmax(effect))
    note = "Holm: ≈ 0.05 false per run" if L > 1 else "0.05 false per run by chance"  # as findings_text.flagged says it
    return (f"Router–expert alignment (row energy in its expert's input subspace; null: experts permuted "
            f"{align.num_permutations} times): {int(sig.sum())} of {L} layers beyond the null ({note}); "
            f"{'strongest' if sig.any() else 'largest'}: layer {align.layers[i]}, "
            f"{align.mean_own[i]:.3f} against {align.perm_null_mean[i]:.3f} (95% range {align.perm_null_low[i]:.3f}–"
            f"{align.perm_null_high[i]:.3f})" + ("" if sig[i] else ", not distinguishable") + ".")


def _permutations(ctx: Any) -> int:
    return 200 if ctx.micro else 1000


def _compute(ctx: Any, results: Mapping[str, Any]) -> Any:
    analyzer = ExpertAnalyzer(ctx.wrapper, device=ctx.wrapper.device, score_fn=ctx.score_fn, progress=ctx.progress)
    return analyzer.analyze_expert_router_alignment(router_weights=ctx.sweep.router_weights[-1],
                                                    num_permutations=_permutations(ctx), seed=ctx.seed)


def _headline(align: Any, record: Any) -> dict[str, Any]:
    if not hasattr(align, "perm_p_adjusted"):
        return {}
    return {"alignment": {str(l): {"own": round(float(align.mean_own[i]), 4), "experts_permuted": round(float(align.perm_null_mean[i]), 4),
                                   "p": round(float(align.perm_p[i]), 4),
                                   "p_adjusted": round(float(align.perm_p_adjusted[i]), 4), "r_over_h": round(float(align.mean_random[i]), 4)}
                          for i, l in enumerate(align.layers)}}


register(AnalysisSpec(
    "expert_alignment", "after", order=52, lead=80, compute=_compute, skip=no_weights, headline=_headline,
    # the experts' weights (the model), the final routers, the permutations, seed and code: a rerun reuses it
    reuse_key=lambda ctx, results: weights_identity(ctx, True, permutations=_permutations(ctx)),
    findings=lambda align, record: ([Finding("expert_alignment", _alignment(align), ("router_expert_alignment",))]
                                    if hasattr(align, "perm_p_adjusted") else []),
    notes="router rows against their experts' input subspaces (drawn in the weights section)",
))
