"""The sinks of a run, each written from its :class:`~core.pipeline.record.RunRecord`: the report, W&B, static images.

Each asks the registered analyses for their part (``report``, ``wandb_tables``,
``wandb_series``); none reads a result by a name of its own or matches sentences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd
import plotly.graph_objects as go

from core.pipeline.findings import first_screen
from core.pipeline.record import RunRecord
from viz.report import Report
from viz.run_report import ReportPage


def report_summary(record: RunRecord) -> dict[str, Any]:
    """The parameters at the top of the report: what was studied, on which data, with which intervals."""
    model = record.model
    return {
        "model": model.get("name"),
        "revision": model.get("revision") or model.get("final_checkpoint"),
        "weights digest": model.get("weights_digest") or "(Hub revision)",
        "family": model.get("family"),
        "MoE layers": model.get("moe_layers"),
        "experts / top-k": f"{model.get('num_experts')} / {model.get('top_k')}",
        "datasets": ", ".join(record.datasets),
        "tokens": ", ".join(f"{n}: {c}" for n, c in record.tokens.items()),
        "checkpoints": ", ".join(c["name"] for c in record.checkpoints),
        "data the model saw": model.get("training_data") or "not recorded by this toolkit (the model's own training data)",
        "intervals": f"95% over documents, {record.options.get('analysis', {}).get('resamples')} bootstrap resamples; nulls from shuffled data",
    }


def build_report(record: RunRecord, decode: Callable[[int], str] | None = None, title: str | None = None,
                 summary: dict[str, Any] | None = None) -> tuple[Report, dict[str, go.Figure]]:
    """The report (findings first, each linked to the first figure it names) and its figures by name."""
    title = title or f"MoE routing report: {record.model.get('name', 'model')}"
    page = ReportPage(Report(title, summary=report_summary(record) if summary is None else summary,
                             warnings=record.warnings), decode=decode)
    ordered, page.report.lead_shown = first_screen(record.findings)
    page.report.lead = ([(f.text, f.figure_keys[0] if f.figure_keys else None) for f in ordered]
                        or [("No findings: no analysis ran.", None)])
    for spec, result in record.present():
        if spec.report is not None:
            spec.report(result, record, page)
    return page.report, page.figures


def wandb_parts(record: RunRecord, decode: Callable[[int], str] | None = None
                ) -> tuple[list[tuple[int, dict[str, float]]], dict[str, pd.DataFrame]]:
    """What W&B shows of the analyses: the series over checkpoints (W&B steps) and the tables, by key."""
    series: list[tuple[int, dict[str, float]]] = []
    tables: dict[str, pd.DataFrame] = {}
    for spec, result in record.present():
        if spec.wandb_series is not None:
            series += spec.wandb_series(result, record)
        if spec.wandb_tables is not None:
            tables.update(spec.wandb_tables(result, record, decode))
    return sorted(series, key=lambda row: row[0]), tables


def log_wandb(record: RunRecord, run_dir: Path, figures: dict[str, go.Figure], report: Path,
              decode: Callable[[int], str] | None) -> Path:
    """A W&B run grouped by model: checkpoints as steps, tables, figures, the report as an artifact (``viz.wandb_dashboard``)."""
    from viz.wandb_dashboard import log_run
    from viz.wandb_logger import WandbLogger

    model = record.model.get("name")
    config = {**record.options, "model": model, "model_options": record.options.get("model"), "datasets": list(record.datasets),
              "checkpoints": [c["name"] for c in record.checkpoints]}
    logger = WandbLogger(record.options["output"]["wandb_project"], run_dir, name=run_dir.name, config=config, group=model)
    try:
        series, tables = wandb_parts(record, decode)
        log_run(logger, series, tables, dict(record.headline), figures, report, run_dir / "metrics.json")
    except BaseException:
        logger.finish(exit_code=1)
        raise
    return logger.finish()
