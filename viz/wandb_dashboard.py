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

import pandas as pd

from core.array_files import ARRAY_FILE
from viz.wandb_logger import WandbLogger, flatten_metrics


def log_run(logger: WandbLogger, series: list[tuple[int, dict[str, float]]], tables: dict[str, pd.DataFrame],
            headline: dict, figures: dict, report: Path, metrics: Path) -> None:
    """Everything above, into one open run: the series first (W&B steps only go forward), then tables and figures.

    ``series`` and ``tables`` come from the analyses (their ``wandb_series`` and ``wandb_tables``).
    """
    for step, row in series:
        logger.run.log(row, step=step)
    last = series[-1][0] if series else 0
    for key, df in tables.items():
        logger.log_table(key, df, step=last)
    for name, fig in figures.items():
        logger.log_figure(f"figures/{name}", fig, step=last)
    logger.log_summary(flatten_metrics(headline, strict=False))
    arrays = metrics.parent / ARRAY_FILE  # metrics.json's big arrays (core.array_files), beside it
    files = [report, metrics] + ([arrays] if arrays.is_file() else [])
    logger.log_artifact(f"report-{logger.run.name or 'run'}", "report", files)
