"""summary.md: a run's findings, warnings and stage table in Markdown, pointing to the report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunSummary:
    """Where a run wrote its outputs, and its headline numbers."""

    run_dir: Path
    report: Path
    metrics: Path
    headline: dict[str, Any]
    findings: list[str]
    warnings: list[str]
    seconds: float
    wandb_dir: Path | None = None
    training_data: str | None = None  # which data the model saw, where the toolkit trained it
    stages: Any = None  # the run's StageClock: seconds and peak memory of each stage


def md_escape(text: object) -> str:
    """Text from the data (names, tokens, findings) with Markdown's inline markup escaped, as the HTML report escapes it."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", " ".join(str(text).split("\n")))


def summary_markdown(s: RunSummary, model: str) -> str:
    """summary.md: links to the report and metrics, the findings, warnings and the stage table."""
    lines = [f"# Routing analysis of {md_escape(model)}", "", f"Report: [{s.report.name}]({s.report.name})  ",
             f"Metrics: [{s.metrics.name}]({s.metrics.name})", "", "## Findings", ""] + [f"- {md_escape(f)}" for f in s.findings]
    if s.training_data:
        lines += ["", f"Data the model saw: {md_escape(s.training_data)}"]
    if s.warnings:
        lines += ["", "## Warnings", ""] + [f"- {md_escape(w)}" for w in s.warnings]
    lines += ["", f"Run time: {s.seconds:.1f} s"]
    if s.stages is not None and s.stages.rows:
        lines += ["", "## Stages", "", "Seconds and peak memory of each stage (resident set; the one pass's analyses "
                  "are listed under it, with the seconds each took).", "", s.stages.markdown()]
    return "\n".join(lines) + "\n"
