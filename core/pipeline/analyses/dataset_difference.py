"""Whether datasets differ in cross-layer routing correlation: mean |Δr| against dealt document blocks, with its finding."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.analysis.dataset_difference import DatasetDifferenceAccumulator
from core.pipeline.findings_text import f3, quote
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz.figures_nulls import estimate_vs_null
from viz.run_report import ReportPage

SECTION = "Cross-layer correlations"


def difference_finding(res: Any, record: Any = None) -> list[Finding]:
    """One sentence over the dataset pairs: how many differ, the largest mean |Δr| with its interval against the null, the others' values."""
    pairs = [p for p in res.pairs if p in res.estimates]
    if not pairs:
        return []
    ests = [res.estimates[p] for p in pairs]
    tested = [e for e in ests if e.p_adjusted is not None and np.isfinite(float(e.p_adjusted))]
    family = max([e.family for e in tested], default=0)
    text = ("Datasets' cross-layer correlations (mean |Δr| over expert pairs of different layers; null: document "
            f"blocks dealt between two datasets{'; Holm over ' + str(family) + ' pairs' if family > 1 else ''}): "
            f"{sum(bool(e.distinguishable) for e in tested)} of {len(tested)} tested pairs differ; ")
    values = np.array([float(e.value) for e in ests])
    top = int(np.nanargmax(values)) if np.isfinite(values).any() else 0
    text += f"largest {pairs[top]}: {_one(ests[top])}{_layer_pairs(res, pairs[top])}"  # one pair quoted in full: short at any count
    others = [f"{p} {f3(v)}" if np.isfinite(v) else f"{p} undefined" for i, (p, v) in enumerate(zip(pairs, values)) if i != top]
    text += (f"; others: {', '.join(others)}" if others else "") + "."
    return [Finding("dataset_difference", text, ("correlation_diff_null",), ests[top] if np.isfinite(values).any() else None)]


def _layer_pairs(res: Any, pair: str) -> str:
    """", n of M layer pairs differ (Holm), most: layers a–b" where the per-layer-pair verdict exists."""
    est = (getattr(res, "layer_estimates", None) or {}).get(pair)
    if est is None or est.why_none or not np.isfinite(np.asarray(est.value, float)).any():
        return ""
    d = np.asarray(est.distinguishable, bool)
    text = f", {int(d.sum())} of {est.family} layer pairs beyond (Holm)"
    if d.any():
        gap = np.where(d, np.asarray(est.value, float) - np.asarray(est.null, float), -np.inf)
        a, b = np.unravel_index(int(np.argmax(gap)), gap.shape)
        text += f", most at {res.moe_layers[a]}–{res.moe_layers[b]}"
    return text


def _one(est: Any) -> str:
    """A pair's quote, or why it has none (a dataset with too few documents, a correlation undefined)."""
    if not np.isfinite(float(est.value)):
        return "undefined (a dataset's expert selection never varies)"
    if est.why_none:
        return f"{f3(float(est.value))} against {f3(float(est.null))}, no verdict: {est.why_none}"
    return quote(est, null="")


def difference_section(res: Any, record: Any, page: ReportPage) -> None:
    """Each dataset pair's mean |Δr| with its interval beside the null's mean and 95% range."""
    pairs = [p for p in res.pairs if p in res.estimates]
    if not pairs:
        return
    get = lambda name: np.array([float(getattr(res.estimates[p], name)) for p in pairs])  # noqa: E731
    fig = estimate_vs_null(pairs, get("value"), get("low"), get("high"), get("null"), get("null_low"), get("null_high"),
                           title="Mean |Δr| between datasets against its null", y_title="mean |Δr|", x_title="datasets")
    rows = [{"datasets": p, "mean_abs_diff": float(res.estimates[p].value), "low": float(res.estimates[p].low),
             "high": float(res.estimates[p].high), "null": float(res.estimates[p].null),
             "null_low": float(res.estimates[p].null_low), "null_high": float(res.estimates[p].null_high),
             "p_adjusted": float(np.nan if res.estimates[p].p_adjusted is None else res.estimates[p].p_adjusted)}
            for p in pairs]
    page.section(SECTION)
    page.figure(SECTION, "correlation_diff_null", fig, pd.DataFrame(rows),
                caption="Two datasets' correlation matrices differ by noise alone: the grey bars are the mean |Δr| of "
                        "the same documents dealt at random between two pseudo-datasets of the same sizes "
                        f"(document blocks; interval: one block left out at a time). Null of the first pair: {f3(rows[0]['null'])}.")


register(AnalysisSpec(
    "dataset_difference", "pass", order=24, lead=25,
    build=lambda ctx: DatasetDifferenceAccumulator(permutations=100 if ctx.resamples else 0, seed=ctx.seed),
    estimates=lambda res: {f"corr_diff {p}": e for p, e in res.estimates.items()},
    decisions=lambda res: {**{f"corr_diff {p}": e for p, e in res.estimates.items()},
                           **{f"corr_diff_layers {p}": e for p, e in getattr(res, "layer_estimates", {}).items()}},
    findings=difference_finding,
    report=difference_section,
    notes="mean |Δr| of consecutive datasets' cross-layer correlations against document blocks dealt between them",
))
