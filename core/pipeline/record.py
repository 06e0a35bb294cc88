"""One run, as one immutable record: options, model card, data, typed results, findings, warnings, timings.

The suite makes it (``core.pipeline.suite``), the findings stage returns a copy with the
headline, findings and warnings (``core.pipeline.findings.conclude``), and every sink
(metrics.json, the report, summary.md, W&B, static images) writes from it. Nothing changes it
once made: its mappings are read-only views and its sequences tuples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from core.pipeline.spec import AnalysisSpec, Finding, registered
from core.safe_io import to_jsonable


@dataclass(frozen=True)
class RunRecord:
    """What a run was and what it found; ``results`` maps each analysis's name to its typed result."""

    options: Mapping[str, Any]  # the run's options, serialized once (RunOptions.to_dict())
    model: Mapping[str, Any]  # the model card: family, layers, experts, checkpoints, which data it saw
    datasets: tuple[str, ...]
    tokens: Mapping[str, int]
    checkpoints: tuple[Mapping[str, Any], ...]
    results: Mapping[str, Any]
    skipped: Mapping[str, str] = field(default_factory=dict)  # analysis -> why it did not run
    timings: Mapping[str, float] = field(default_factory=dict)
    processes: Mapping[str, Any] = field(default_factory=dict)  # how many processes analysed which share of the tokens
    headline: Mapping[str, Any] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()
    warnings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping) and not isinstance(value, MappingProxyType):
                object.__setattr__(self, f.name, MappingProxyType(dict(value)))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def get(self, name: str) -> Any:
        return self.results.get(name)

    def present(self) -> list[tuple[AnalysisSpec, Any]]:
        """(spec, result) of every registered analysis with a result here, in registry order: what each sink writes."""
        return [(spec, self.results[spec.name]) for spec in registered() if self.results.get(spec.name) is not None]

    def header(self) -> dict[str, Any]:
        """What the run was (model, data, timings), JSON-ready; the analyses' results are in ``results``."""
        return to_jsonable({"model": dict(self.model), "datasets": list(self.datasets), "tokens": dict(self.tokens),
                            "checkpoints": [dict(c) for c in self.checkpoints], "skipped": dict(self.skipped),
                            "timings_s": dict(self.timings), "processes": dict(self.processes)})

    def metrics(self) -> dict[str, Any]:
        """What metrics.json holds: the sections a person quotes first, then the header and every result (arrays kept)."""
        return {"options": dict(self.options), "headline": dict(self.headline), "findings": [f.text for f in self.findings],
                "warnings": list(self.warnings), **self.header(), **self.results}
