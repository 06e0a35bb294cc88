"""What a run logs to W&B so that W&B can show it: training as steps, results as tables, the report as an artifact.

- **Checkpoints are W&B steps** (each checkpoint's training step): saturation, load balance,
  token entropy, CV, utilization drift and router drift per layer become native line charts
  over training (``training/<measure>/L<layer>``).
- **Per-expert and per-domain results are ``wandb.Table``s** (``tables/...``): utilization per
  (dataset, layer, expert), each domain's share per (layer, expert), ablation per (expert,
  domain) with its interval, vocabulary per token id, so a user filters and plots in the UI.
- **Runs are grouped by model**, with the datasets and checkpoints in the config: several
  datasets or models compare in one workspace.
- **The HTML report, metrics.json and its arrays.safetensors are an artifact** of type ``report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.array_files import ARRAY_FILE
from viz._common import token_label
from viz.wandb_logger import WandbLogger, flatten_metrics


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


def result_tables(results: Any, decode: Any = None) -> dict[str, pd.DataFrame]:
    """The per-expert and per-domain results as long tables, by W&B key."""
    r, out = results.results, {}
    stats = r.get("routing_stats")
    if stats is not None:
        parts = [stats.expert_table().assign(dataset="all")]
        parts += [s.expert_table().assign(dataset=name) for name, s in (r.get("routing_stats_by_dataset") or {}).items()]
        out["tables/expert_utilization"] = pd.concat(parts, ignore_index=True)
        out["tables/layer_summary"] = stats.layer_table()
    spec = r.get("domain_specialization")
    if spec is not None:
        D, L, E = len(spec.group_names), len(spec.moe_layers), spec.share.shape[-1]
        grid = np.stack(np.meshgrid(np.arange(L), np.arange(D), np.arange(E), indexing="ij"), -1).reshape(-1, 3)
        out["tables/domain_expert_share"] = pd.DataFrame({
            "layer": np.asarray(spec.moe_layers)[grid[:, 0]], "domain": np.asarray(spec.group_names)[grid[:, 1]],
            "expert": grid[:, 2], "share": np.asarray(spec.share)[grid[:, 0], grid[:, 1], grid[:, 2]],
            "baseline_k_over_E": spec.baseline})
    abl = r.get("ablation")
    if abl is not None:
        rows = [{"ablated": t, "domain": d, "delta_nats": float(abl.delta[i][j])} for i, t in enumerate(abl.targets)
                for j, d in enumerate(abl.domains)]
        est = getattr(abl, "estimate", None)
        if est is not None:
            for row, (i, j) in zip(rows, [(i, j) for i in range(len(abl.targets)) for j in range(len(abl.domains))]):
                row.update(ci_low=float(np.asarray(est.low)[i][j]), ci_high=float(np.asarray(est.high)[i][j]))
        out["tables/ablation"] = pd.DataFrame(rows)
    pr = r.get("pruning")
    if pr is not None:
        out["tables/pruning"] = pr.table()
    vocab = r.get("vocabulary_specialization")
    if vocab is not None and len(vocab.token_ids):
        li = len(vocab.moe_layers) - 1
        out["tables/vocabulary"] = pd.DataFrame({
            "token_id": vocab.token_ids,
            "token": [token_label(decode(int(t))) if decode else str(int(t)) for t in vocab.token_ids],
            "count": vocab.occurrences, "preferred_expert_last_layer": vocab.preferred_expert[:, li],
            "concentration_last_layer": vocab.concentration[:, li]})
    return out


def log_run(logger: WandbLogger, results: Any, headline: dict, figures: dict, report: Path, metrics: Path,
            decode: Any = None) -> None:
    """Everything above, into one open run: the series first (W&B steps only go forward), then tables and figures."""
    series = checkpoint_series(results)
    for step, row in series:
        logger.run.log(row, step=step)
    last = series[-1][0] if series else 0
    for key, df in result_tables(results, decode).items():
        logger.log_table(key, df, step=last)
    for name, fig in figures.items():
        logger.log_figure(f"figures/{name}", fig, step=last)
    logger.log_summary(flatten_metrics(headline, strict=False))
    arrays = metrics.parent / ARRAY_FILE  # metrics.json's big arrays (core.array_files), beside it
    files = [report, metrics] + ([arrays] if arrays.is_file() else [])
    logger.log_artifact(f"report-{logger.run.name or 'run'}", "report", files)
