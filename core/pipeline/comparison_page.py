"""The page of ``exp/compare_runs.py``: several runs on the same figures, their findings in one table, the differences tested.

Built from a :class:`core.pipeline.run_comparison.Comparison` with the report's own page
(:class:`viz.report.Report`: escaped text, plotly embedded, the numbers behind each figure as files).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.pipeline.run_comparison import METRICS, Comparison, findings_table
from viz import compare_runs as V
from viz.report import Report

SAME = "Per-layer numbers side by side"


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _routing(model: dict[str, Any]) -> str:
    """How the model routes, where its config says (the toolkit's own model: ``topk`` or ``random``), with its k."""
    import json
    from pathlib import Path

    k = f"top-{model.get('top_k')}"
    try:
        cfg = json.loads((Path(str(model.get("model"))) / "config.json").read_text())
    except (OSError, ValueError):
        return k
    return f"{cfg['routing']} (k={model.get('top_k')})" if isinstance(cfg.get("routing"), str) else k


def _runs_table(comp: Comparison) -> pd.DataFrame:
    """One row per run: its folder, model, routing, data, and whether it routed the reference's documents."""
    rows = []
    for i, run in enumerate(comp.runs):
        m = run.metrics["model"]
        shared = "(reference)" if i == 0 else ("yes: paired tests" if not comp.shared.get(run.name) else
                                               f"no: {comp.shared[run.name]}")
        rows.append({"run": run.name, "folder": str(run.folder), "model": m.get("name"), "checkpoint": m.get("final_checkpoint"),
                     "MoE layers": len(run.layers), "experts": m.get("num_experts"), "top-k": m.get("top_k"),
                     "routing": _routing(m),
                     "datasets": ", ".join(run.metrics.get("datasets", [])),
                     "tokens": sum((run.metrics.get("tokens") or {}).values()), "same documents as the reference": shared})
    return pd.DataFrame(rows).set_index("run")


def _difference_rows(comp: Comparison) -> pd.DataFrame:
    """Every tested difference: metric, run, layer, both values, the difference with its interval, p (Holm), method."""
    rows, layers = [], comp.runs[0].layers
    for m in METRICS:
        for name, d in comp.differences.get(m.key, []):
            for li, layer in enumerate(layers[: len(d.diff)]):
                if not np.isfinite(d.diff[li]):
                    continue
                rows.append({"metric": m.label, "run": name, "layer": layer, "reference": d.value_a[li], "run value": d.value_b[li],
                             "difference": d.diff[li], "ci_low": d.low[li], "ci_high": d.high[li],
                             "p (Holm over layers)": d.p_adjusted[li],
                             "verdict": "different" if d.distinguishable[li] else "not told apart", "method": d.method})
    return pd.DataFrame(rows)


def _lead(comp: Comparison) -> list[tuple[str, str | None]]:
    """One line per tested metric: for each run, at how many layers it differs from the reference and its largest difference."""
    ref, out = comp.runs[0].name, []
    for m in METRICS:
        parts, methods = [], set()
        for name, d in comp.differences.get(m.key, []):
            ok = np.isfinite(d.diff)
            if not ok.any():
                continue
            li = int(np.nanargmax(np.where(ok, np.abs(d.diff), -np.inf)))
            methods.add("paired over shared documents" if d.units else "from the runs' own intervals")
            parts.append(f"{name} at {int(np.sum(d.distinguishable & ok))} of {int(ok.sum())} layers, largest at layer "
                         f"{comp.runs[0].layers[li]}: {_fmt(d.value_a[li])} → {_fmt(d.value_b[li])} "
                         f"(Δ {_fmt(d.diff[li])}, 95% CI {_fmt(d.low[li])} to {_fmt(d.high[li])})")
        if parts:
            out.append((f"{m.label}, against {ref} ({' / '.join(sorted(methods))}; Holm over layers): " + "; ".join(parts) + ".",
                        f"diff_{m.key}"))
    return out


def _metric_figures(report: Report, comp: Comparison) -> None:
    layers, ref = comp.runs[0].layers, comp.runs[0].name
    for m in METRICS:
        series = [(r.name, *v) for r, v in zip(comp.runs, comp.values[m.key]) if v is not None]
        if not series:
            continue
        data = pd.DataFrame({f"{s[0]} {part}": (np.full(len(s[1]), np.nan) if x is None else x)
                             for s in series for part, x in zip(("value", "low", "high"), s[1:])})
        report.add_figure(SAME, V.per_layer(m.label, "value (95% interval where the run has one)", layers, series),
                          f"same_{m.key}", data=data, caption=f"{m.label}, per layer, one line per run.")
        diffs = comp.differences.get(m.key) or []
        if diffs:
            idx = {r.name: i for i, r in enumerate(comp.runs)}
            report.add_figure(SAME, V.differences(f"{m.label}: difference from {ref}", layers, ref,
                                                  [(idx[n], n, d.diff, d.low, d.high, d.distinguishable) for n, d in diffs]),
                              f"diff_{m.key}", caption="Each run minus the reference with its 95% interval; a filled marker: "
                              "told apart (Holm over layers). " + "; ".join(sorted({f"{n}: {d.method}" for n, d in diffs})) + ".")


def _training_figures(report: Report, comp: Comparison) -> None:
    """Saturation over training (mean over layers) and the loss per domain, where the runs have them."""
    series = []
    for r in comp.runs:
        dyn = r.metrics.get("checkpoint_dynamics")
        if dyn and dyn.get("saturation") is not None and len(dyn.get("steps") or []) > 1:
            steps = np.asarray(dyn["steps"], np.float64)
            series.append((r.name, 100 * steps / steps[-1], np.nanmean(np.asarray(dyn["saturation"], np.float64), 1)))
    if series:
        report.add_figure("Over training", V.over_training("Router saturation (mean over layers)", series),
                          "saturation_over_training", caption="Share of a token's top-k experts that are already those of "
                          "the final checkpoint, mean over layers, at each run's checkpoints.")
    losses = [(r.name, r.metrics["ablation"]["domains"], r.metrics["ablation"]["base_loss"]) for r in comp.runs
              if (r.metrics.get("ablation") or {}).get("base_loss") is not None]
    if losses:
        domains = list(dict.fromkeys(d for _, ds, _ in losses for d in ds))
        bars = [(n, [dict(zip(ds, v)).get(d, np.nan) for d in domains]) for n, ds, v in losses]
        report.add_figure("Loss", V.grouped_bars("Loss per domain (nats per token, the ablation's scored tokens)", "nats",
                                                 domains, bars), "loss_per_domain",
                          caption="Each run's loss on the tokens its ablation scored (no interval in metrics.json).")


def comparison_report(comp: Comparison, title: str) -> Report:
    """The whole page: the lead, the runs, the findings side by side, every per-layer figure, the differences table."""
    report = Report(title, summary={"runs": len(comp.runs), "reference": comp.runs[0].name})
    report.lead = _lead(comp)
    report.add_section("Runs", "Each later run is compared with the first, the reference. Where both runs' routing caches "
                       "of the final checkpoint are on disk and hold the same documents (the same token ids, document by "
                       "document), load balance and domain specialization are tested paired over those documents "
                       "(jackknife over document blocks, two-sided t, Holm over layers). Other metrics, and runs on "
                       "other documents, are compared from each run's own 95% intervals taken as normal and independent; "
                       "metrics with no interval in the run are shown, not tested.")
    report.add_table("Runs", _runs_table(comp), "runs", caption="The runs compared.")
    _metric_figures(report, comp)
    report.add_table("Findings side by side", findings_table(comp.runs), "findings", max_rows=60,
                     caption="Each run's own findings, one row per topic.")
    _training_figures(report, comp)
    diffs = _difference_rows(comp)
    if len(diffs):
        report.add_table("Differences", diffs, "differences", max_rows=400,
                         caption="Every tested difference (run minus reference) per layer; 'method' says how it was tested.")
    return report


def write_page(comp: Comparison, folder: Any, title: str) -> Any:
    """Write report.html and its data files into ``folder`` (a scratch folder the command puts in place)."""
    return comparison_report(comp, title).write(folder)
