"""What an analysis of the study is, declared once: :class:`AnalysisSpec`, its :class:`Finding`s, and the registry.

Every stage of a run loops over the registered specs: the one pass builds each ``"pass"``
spec's accumulator, the later stages run each ``"after"`` spec, and every sink (findings,
metrics.json, the report, summary.md, W&B, static images) asks each spec for its part. A new
analysis is one module that calls :func:`register` (the built-in ones are the modules of
``core.pipeline.analyses``, found by :func:`registered`), plus its test; nothing else lists it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

# What the spec's functions are handed: the run's context while computing (RunContext), the
# finished run while writing (core.pipeline.record.RunRecord), and the report page (viz.run_report.ReportPage).
Build = Callable[[Any], Any]  # RunContext -> an Accumulator (stage "pass") or None where it does not apply
Compute = Callable[[Any, Mapping[str, Any]], Any]  # RunContext, results so far -> result (stage "after")
Skip = Callable[[Any], "str | None"]  # RunContext -> why the analysis does not run (None: it runs)
# RunContext, results so far -> everything the result depends on (stage "after"): its stored result is reused when
# this is the same (core.pipeline.reuse adds nothing; the spec names model, tokens, settings, inputs, code version)
ReuseKey = Callable[[Any, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Finding:
    """One finding: its sentence (numbers, null, interval), the analysis it is from and the figures behind it."""

    key: str  # the spec's name (or name/part where a spec states several)
    text: str
    figure_keys: tuple[str, ...] = ()  # report figures that show it, the first one linked from the finding
    estimate: Any = None  # the core.analysis.resampling.Estimate it quotes, if one

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class AnalysisSpec:
    """One analysis of the study: how it runs and what each output shows of it (every hook but ``name`` optional).

    ``stage``: ``"pass"`` analyses are accumulators fed by the one pass over the caches (the final
    checkpoint's chunk, or every checkpoint's with ``all_checkpoints``); ``"after"`` analyses run
    once the pass is done (weights, forward passes, results derived from others), in ``order``.
    """

    name: str
    stage: Literal["pass", "after"]
    order: int  # where it runs and where its report section goes (ascending); also the W&B and metrics order
    build: Build | None = None  # stage "pass"
    compute: Compute | None = None  # stage "after"
    skip: Skip | None = None
    reuse_key: ReuseKey | None = None  # stage "after": declared, a result of the same key is reused (core.pipeline.reuse)
    all_checkpoints: bool = False
    lead: int = 100  # where its findings go in "What we learned" (ascending)
    headline: Callable[[Any, Any], dict[str, Any]] | None = None  # (result, record) -> headline numbers
    estimates: Callable[[Any], dict[str, Any]] | None = None  # result -> {headline key: Estimate}
    # result -> {key: Estimate or bool array}: every yes/no verdict its findings count, which core.calibration
    # measures (false-positive rate, power, coverage) on simulated worlds; default: ``estimates``
    decisions: Callable[[Any], dict[str, Any]] | None = None
    findings: Callable[[Any, Any], Sequence[Finding]] | None = None  # (result, record)
    warnings: Callable[[Any, Any], Sequence[str]] | None = None  # (result, record)
    report: Callable[[Any, Any, Any], None] | None = None  # (result, record, page)
    wandb_tables: Callable[[Any, Any, Any], dict[str, pd.DataFrame]] | None = None  # (result, record, decode)
    wandb_series: Callable[[Any, Any], list[tuple[int, dict[str, float]]]] | None = None  # (result, record)
    notes: str = field(default="", compare=False)  # what the analysis measures, for a reader of the registry

    def __post_init__(self) -> None:
        if self.stage not in ("pass", "after"):
            raise ValueError(f"analysis {self.name}: stage must be 'pass' or 'after', not {self.stage!r}")
        if (self.stage == "pass") != (self.build is not None) or (self.stage == "after") != (self.compute is not None):
            raise ValueError(f"analysis {self.name}: a 'pass' analysis needs build, an 'after' one compute")
        if self.reuse_key is not None and self.stage != "after":
            raise ValueError(f"analysis {self.name}: only an 'after' analysis declares reuse_key")


_REGISTRY: dict[str, AnalysisSpec] = {}
_BUILTINS_LOADED = False


def register(spec: AnalysisSpec) -> AnalysisSpec:
    """Add ``spec`` to the study (a second spec of the same name replaces the first); returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an analysis from the study (tests that register a toy analysis clean up with this)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    """Import every module of ``core.pipeline.analyses``: each registers its specs when imported."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    package = importlib.import_module("core.pipeline.analyses")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _BUILTINS_LOADED = True


def decisions_of(spec: AnalysisSpec, result: Any) -> dict[str, Any]:
    """Every verdict of ``spec``'s findings on ``result``: its ``decisions`` hook, else its estimates."""
    hook = spec.decisions or spec.estimates
    return {k: v for k, v in (hook(result) if hook else {}).items() if v is not None}


def reusable_names() -> list[str]:
    """What ``--recompute`` may name besides ``all``: ``pass`` (every pass analysis) and each ``"after"`` one that declares reuse."""
    return ["pass"] + [s.name for s in registered() if s.reuse_key is not None]


def registered() -> list[AnalysisSpec]:
    """Every analysis of the study, in ``order``."""
    _load_builtins()
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))
