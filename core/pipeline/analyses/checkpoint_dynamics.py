"""Routing over training: saturation against the final checkpoint, load over checkpoints, and router drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.checkpoint_dynamics import (
    CheckpointDynamicsAccumulator,
    router_weight_drift,
)
from core.pipeline.analyses.router_weights import no_weights
from core.pipeline.findings_text import est_of, flagged, pct, quote
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import plotting as P
from viz.run_report import ReportPage, estimate_figure

ONE_CHECKPOINT = "one checkpoint only: pass --checkpoints to study routing over training"


def _one_checkpoint(ctx: Any) -> str | None:
    return ONE_CHECKPOINT if len(ctx.sweep.checkpoints) == 1 else None


def _earlier(est: Any) -> Any:
    """The checkpoints before the final one (the final one's overlap with itself is 100%: not a finding)."""
    return None if est is None else est.at(slice(0, -1))


def saturation(dyn: Any, k: int) -> str:
    """How early the routing settles: the first checkpoint against chance, and the step it is halfway to final."""
    sat = np.nanmean(dyn.saturation, axis=1)
    est = est_of(dyn, "saturation_mean")
    if est is not None:
        first = quote(est.at(0), pct, "")
        chance0 = float(np.asarray(est.null)[0])
        first += f"; {flagged(_earlier(est), 'earlier checkpoints', 'beyond chance')}"
    else:
        first, chance0 = pct(sat[0]), k / dyn.utilization.shape[-1]
    mid = chance0 + (1 - chance0) / 2
    half = next((s for s, v in zip(dyn.steps, sat) if v >= mid), None)
    return (f"Router saturation (share of a token's top-{k} experts as at the final step {dyn.steps[-1]}; chance: a random "
            f"token of its document): step {dyn.steps[0]}, {first}"
            + (f". Halfway from chance to 100% ({pct(mid)}) by step {half}." if half is not None else "."))


def _dynamics_section(r: Mapping[str, Any], page: ReportPage) -> None:
    dyn = r.get("checkpoint_dynamics")
    if dyn is None:
        return
    page.section("Routing over training", "Saturation: share of each token's top-k experts at a checkpoint that match the final checkpoint's.")
    per_layer = (getattr(dyn, "estimates", None) or {}).get("saturation")
    bounds = {} if per_layer is None else {"low": per_layer.low, "high": per_layer.high, "null": per_layer.null}
    page.figure("Routing over training", "saturation", P.saturation_over_checkpoints(dyn.steps, dyn.saturation, dyn.moe_layers, **bounds),
                dyn.table(), caption="As OLMoE's Fig. 20: each layer's 95% interval over documents as a band, its chance "
                                     "(a random token of the same document) dashed; % of training on a log axis.")
    est = (getattr(dyn, "estimates", None) or {}).get("saturation_mean")
    if est is not None:
        page.figure("Routing over training", "saturation_vs_chance", estimate_figure(est, [str(s) for s in dyn.steps],
            "Saturation (mean over layers) against chance", "share of top-k shared with the final checkpoint", "training step"),
            pd.DataFrame({"step": dyn.steps, "value": est.value, "low": est.low, "high": est.high, "chance": est.null}),
            caption="Chance: the overlap between a token's experts at this checkpoint and a random token of the same document "
                    "at the final checkpoint (routing that knows only the document).")
    page.figure("Routing over training", "utilization_entropy_over_training",
        P.layer_metric_over_time(dyn.steps, dyn.utilization_entropy_norm, dyn.moe_layers, "normalized utilization entropy", "0–1", x_label="training step"))
    drift = r.get("router_drift")
    if drift is not None:
        page.figure("Routing over training", "router_drift", P.drift_over_checkpoints(dyn.steps, 1 - np.nan_to_num(drift.cosine_prev, nan=1.0), drift.layers),
            drift.to_dict())


def _build(ctx: Any) -> CheckpointDynamicsAccumulator:
    ckpts = ctx.sweep.checkpoints
    steps = [c.step if c.step is not None else i for i, c in enumerate(ckpts)]
    return CheckpointDynamicsAccumulator([c.name for c in ckpts], steps, resamples=ctx.resamples, seed=ctx.seed)


def _drift(ctx: Any, results: Mapping[str, Any]) -> Any:
    """Router drift between checkpoints (None with one checkpoint: nothing to compare, and nothing to say)."""
    if len(ctx.sweep.checkpoints) == 1:
        return None
    return router_weight_drift(ctx.sweep.router_weights, names=[c.name for c in ctx.sweep.checkpoints], score_fn=ctx.score_fn)


def checkpoint_series(results: Any) -> list[tuple[int, dict[str, float]]]:
    """``(training step, {metric: value})`` per checkpoint, in training order (empty with one checkpoint)."""
    dyn = results.get("checkpoint_dynamics")
    if dyn is None:
        return []
    per_layer = {"saturation": dyn.saturation, "utilization_entropy_norm": dyn.utilization_entropy_norm,
                 "token_entropy_norm": dyn.token_entropy_norm, "cv": dyn.cv, "utilization_tv_to_final": dyn.utilization_tv}
    drift = results.get("router_drift")
    if drift is not None:
        per_layer |= {"router_cosine_to_final": drift.cosine_final, "router_rel_change_to_final": drift.rel_change_final}
    out = []
    for c, step in enumerate(dyn.steps):
        row = {f"training/{name}/L{layer}": float(values[c][li])
               for name, values in per_layer.items() for li, layer in enumerate(dyn.moe_layers)
               if np.isfinite(values[c][li])}
        row["training/saturation_mean"] = float(np.nanmean(dyn.saturation[c]))
        out.append((int(step), row))
    return out


register(AnalysisSpec(
    "checkpoint_dynamics", "pass", order=60, lead=50, all_checkpoints=True, build=_build, skip=_one_checkpoint,
    headline=lambda dyn, record: {"saturation": {str(s): round(float(np.nanmean(v)), 4) for s, v in zip(dyn.steps, dyn.saturation)}},
    estimates=lambda dyn: {"saturation": est_of(dyn, "saturation_mean")},
    decisions=lambda dyn: {"saturation_earlier": _earlier(est_of(dyn, "saturation_mean"))},
    findings=lambda dyn, record: [Finding("checkpoint_dynamics", saturation(dyn, record.model["top_k"]), ("saturation_vs_chance",),
                                          est_of(dyn, "saturation_mean"))],
    report=lambda dyn, record, page: _dynamics_section(record.results, page),
    wandb_series=lambda dyn, record: checkpoint_series(record),
    notes="saturation, load balance and entropy at every checkpoint",
))
register(AnalysisSpec(
    "router_drift", "after", order=61,
    skip=lambda ctx: no_weights(ctx) if len(ctx.sweep.checkpoints) > 1 else None, compute=_drift,
    notes="how far each router moved between checkpoints (drawn in the routing-over-training section)",
))
