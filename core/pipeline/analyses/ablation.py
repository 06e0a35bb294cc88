"""Causal ablation: the loss change per domain when a layer's most-used (and, as a control, least-used) expert is removed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.ablation import ablation_study, most_and_least_used_experts
from core.pipeline.findings_text import nats, span
from core.pipeline.reuse import reuse_identity, value_digest
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import plotting as P
from viz.run_report import ReportPage


def _ablation_text(abl: Any) -> str:
    """How many single-expert changes are nulls, how many are small, and the largest with its interval."""
    est, delta = abl.estimate, np.asarray(abl.delta, float)
    T, D = delta.shape
    size = np.where(np.isfinite(delta), np.abs(delta), -np.inf)
    ok = est is not None and np.isfinite(np.asarray(est.low, float)).any()
    dist = np.asarray(est.distinguishable, bool) & np.isfinite(np.asarray(est.low, float)) if ok else np.zeros_like(delta, bool)
    t, d = np.unravel_index(int(np.argmax(np.where(dist, size, -np.inf) if dist.any() else size)), delta.shape)
    single = all(sum(map(len, target.values())) == 1 for target in abl.target_experts)
    text = f"Ablation (loss change, nats per token; {T} {'single experts' if single else 'targets'} x {D} domains): "
    if ok:
        text += f"{delta.size - int(dist.sum())} of {delta.size} changes are not distinguishable from no change (Holm); "
    small = int(((size >= 0) & (size < 0.01)).sum())
    text += f"{small} of {delta.size} are under 0.01 nats. The largest is {abl.targets[t]} on {abl.domains[d]}, "
    if not ok:
        why = ("resampling off" if est is None or not est.resamples
               else "each domain's tokens are in too few document blocks")
        return text + f"{nats(delta[t, d])} (no interval: {why})."
    return text + (f"{nats(delta[t, d])} (95% CI {span(est.low[t, d], est.high[t, d], nats)})"
                   + ("" if dist[t, d] else ", not distinguishable from no change") + ".")


def _ablation_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Loss change per domain when an expert is removed."""
    abl = r.get("ablation")
    if abl is not None:
        page.section("Causal ablation", "Loss change per domain when an expert is removed from routing (weights of the rest renormalized), "
                        "through nnsight. Base loss per domain: " + ", ".join(f"{d} {v:.3f}" for d, v in zip(abl.domains, abl.base_loss)) + " nats.")
        data = pd.DataFrame(abl.delta, index=abl.targets, columns=abl.domains)
        est = getattr(abl, "estimate", None)
        if est is not None and np.isfinite(np.asarray(est.low, dtype=float)).all():
            data = pd.concat({"delta": data, "ci_low": pd.DataFrame(est.low, index=abl.targets, columns=abl.domains),
                              "ci_high": pd.DataFrame(est.high, index=abl.targets, columns=abl.domains)}, axis=1)
        page.figure("Causal ablation", "ablation", P.ablation_effects(abl.delta, abl.targets, abl.domains), data,
            caption="95% intervals over documents are in the data table and the findings.")


VERSION = "1"  # bump by hand when the ablation's computation changes: results stored by the old code are not reused
BATCH_SIZE = 16


def _targets(results: Mapping[str, Any]) -> tuple[list, list[str]]:
    """The experts ablated (each layer's most- and least-used, from routing_stats) and their labels."""
    stats = results["routing_stats"]
    return most_and_least_used_experts(np.asarray(stats.utilization), list(stats.moe_layers))


def _compute(ctx: Any, results: Mapping[str, Any]) -> Any:
    targets, labels = _targets(results)
    return ablation_study(ctx.wrapper, ctx.model_tokens(ctx.options.analysis.ablation_tokens), targets, labels=labels,
                          batch_size=BATCH_SIZE, progress=ctx.progress, resamples=ctx.resamples, seed=ctx.seed)


def _reuse_key(ctx: Any, results: Mapping[str, Any]) -> dict[str, Any]:
    """What the ablation depends on: model, tokens, resamples and seed, the ablated experts, batch size, code version."""
    targets, labels = _targets(results)
    return reuse_identity(ctx, ctx.options.analysis.ablation_tokens, code=f"ablation/{VERSION}",
                          targets=value_digest([targets, labels]), batch_size=BATCH_SIZE)


def _table(abl: Any, record: Any, decode: Any) -> dict[str, pd.DataFrame]:
    """The loss change per (ablated expert, domain) with its interval, as a W&B table."""
    rows = [{"ablated": t, "domain": d, "delta_nats": float(abl.delta[i][j])} for i, t in enumerate(abl.targets)
            for j, d in enumerate(abl.domains)]
    est = getattr(abl, "estimate", None)
    if est is not None:
        for row, (i, j) in zip(rows, [(i, j) for i in range(len(abl.targets)) for j in range(len(abl.domains))]):
            row.update(ci_low=float(np.asarray(est.low)[i][j]), ci_high=float(np.asarray(est.high)[i][j]))
    return {"tables/ablation": pd.DataFrame(rows)}


register(AnalysisSpec(
    "ablation", "after", order=80, lead=60, compute=_compute, reuse_key=_reuse_key,
    skip=lambda ctx: None if ctx.options.analysis.ablation else "turned off (--no-ablation)",
    headline=lambda abl, record: {"ablation_delta_nats": {t: dict(zip(abl.domains, np.round(d, 4).tolist()))
                                                          for t, d in zip(abl.targets, abl.delta)}},
    estimates=lambda abl: {"ablation_delta": getattr(abl, "estimate", None)},
    decisions=lambda abl: {"ablation_changes": getattr(abl, "estimate", None)},
    findings=lambda abl, record: [Finding("ablation", _ablation_text(abl), ("ablation",), getattr(abl, "estimate", None))],
    warnings=lambda abl, record: list(abl.notes),
    report=lambda abl, record, page: _ablation_section(record.results, page),
    wandb_tables=_table,
    notes="loss change per domain when one expert is removed from routing, with intervals over documents",
))
