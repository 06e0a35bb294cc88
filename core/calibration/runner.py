"""Run every registered analysis's verdicts on simulated worlds: false-positive rate, power and interval coverage.

The same code as the study: each ``"pass"`` analysis of the registry that declares verdicts
(:func:`core.pipeline.spec.decisions_of`) is built from a run context and fed the world's routing
in chunks, exactly as the one pass over the caches feeds it; nothing here knows an analysis by
name. So an analysis is calibrated by being registered.

- false-positive rate: in a world that is a null for a verdict, the share of tested elements
  (layers, layer pairs, experts, domains) flagged, and the share of runs that flag any;
- power: in a planted world, the share of runs that flag the planted element (or, for an effect
  at every layer, the share of layers flagged);
- coverage: the share of 95% intervals that contain the statistic's expectation at this size
  (its mean over the seeds; for statistics that noise pushes up, a maximum or |r|, that is
  above its value with infinite data, which no interval over these documents can know).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.resampling import Estimate
from core.analysis.streaming import Pick
from core.calibration.worlds import Shape, World, simulate_checkpoints
from core.pipeline.context import RunContext
from core.pipeline.options import make_options
from core.pipeline.spec import decisions_of, registered
from core.routing_data import RoutingData

CHUNK = 4096  # tokens per chunk fed to the accumulators (cuts documents anywhere, as cache shards do)


@dataclass
class Outcome:
    """One verdict in one run: which elements were tested and flagged, and the intervals (Estimates only)."""

    flagged: np.ndarray
    tested: np.ndarray
    value: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    truth: np.ndarray | None = None  # the statistic's expectation in this run, where the world knows it (else: the mean over runs)


def outcome(decision: Any) -> Outcome:
    """An Estimate's verdict (tested: where it has a p-value, or a finite value) or a bool array's (all tested)."""
    if isinstance(decision, Estimate):
        value = np.asarray(decision.value, np.float64)
        p = decision.p_adjusted if decision.p_adjusted is not None else decision.p_value
        tested = np.isfinite(np.asarray(p, np.float64)) if p is not None else np.isfinite(value)
        return Outcome(np.asarray(decision.distinguishable, bool) & tested, tested, value,
                       np.asarray(decision.low, np.float64), np.asarray(decision.high, np.float64))
    flags = np.asarray(decision, bool)
    return Outcome(flags, np.ones_like(flags))


def chunks(rd: RoutingData, size: int = CHUNK) -> Iterator[RoutingData]:
    for lo in range(0, rd.num_tokens, size):
        yield rd.select(slice(lo, min(lo + size, rd.num_tokens)))


def frequent_ids(rd: RoutingData, n: int = 1024) -> list[int]:
    counts = np.bincount(rd.token_ids.numpy())
    order = np.argsort(-counts, kind="stable")
    return [int(t) for t in order[:n] if counts[t] > 0]


def _specs(only: Iterable[str] | None) -> list:
    """The registered "pass" analyses with verdicts (all, or those named in ``only``)."""
    keep = None if only is None else set(only)
    return [s for s in registered() if s.stage == "pass" and (s.decisions or s.estimates)
            and (keep is None or s.name in keep)]


CHECKPOINTS = SimpleNamespace(checkpoints=[SimpleNamespace(name="early", step=1), SimpleNamespace(name="final", step=2)])


def run_once(world: World, shape: Shape, seed: int, resamples: int = 200, only: Iterable[str] | None = None
             ) -> dict[str, tuple[str, Outcome]]:
    """Every registered verdict (or those of the analyses ``only``) on one draw of ``world``: {key: (analysis, outcome)}.

    As in the run: analyses over training get the early and the final checkpoint side by side,
    the others the final one.
    """
    early, final = simulate_checkpoints(world, shape, seed)
    ctx = RunContext(make_options(resamples=resamples, seed=seed), None, CHECKPOINTS, {}, token_ids=frequent_ids(final))
    specs = [s for s in _specs(only) if not (s.skip and s.skip(ctx))]
    accs = {s.name: s.build(ctx) if s.all_checkpoints else Pick(s.build(ctx)) for s in specs}
    for item in zip(chunks(early), chunks(final)):
        for acc in accs.values():
            acc.update(list(item))
    out: dict[str, tuple[str, Outcome]] = {}
    for s in specs:
        out.update({k: (s.name, outcome(v)) for k, v in decisions_of(s, accs[s.name].result()).items()})
    return out


def owners(world: World) -> dict[str, str]:
    """Which analysis states each verdict, learnt on a tiny draw of ``world`` (so a planted world runs only its target's)."""
    tiny = Shape(layers=12, experts=8, top_k=2, docs=8, doc_len=40, vocab=50)
    return {k: name for k, (name, _) in run_once(replace(world, docs=None, doc_len=None), tiny, 0, resamples=20).items()}


@dataclass
class Tally:
    """One verdict in one world over the seeds."""

    runs: list[Outcome] = field(default_factory=list)

    def rates(self, target: tuple[str, Any] | None, key: str) -> dict[str, float]:
        tested = sum(int(o.tested.sum()) for o in self.runs)
        flagged = sum(int((o.flagged & o.tested).sum()) for o in self.runs)
        row = {"runs": len(self.runs), "tested": tested / max(len(self.runs), 1),
               "element_rate": flagged / tested if tested else np.nan,
               "any_rate": float(np.mean([bool((o.flagged & o.tested).any()) for o in self.runs])) if self.runs else np.nan}
        if target is not None and target[0] == key:
            el = target[1]
            hits = [o.flagged[el] if el is not None else (o.flagged & o.tested).sum() / max(o.tested.sum(), 1)
                    for o in self.runs]
            row["power"] = float(np.mean(hits))
        row["coverage"] = self.coverage()
        return row

    def coverage(self) -> float:
        """Share of finite 95% intervals that hold the run's truth where known, else the mean over seeds of the value."""
        runs = [o for o in self.runs if o.low is not None]
        if len(runs) < 2:
            return np.nan
        with warnings.catch_warnings():  # an element no run had a value for has no truth
            warnings.simplefilter("ignore", RuntimeWarning)
            truth = np.nanmean(np.stack([o.value for o in runs]), 0)
        hit, n = 0, 0
        for o in runs:
            t = truth if o.truth is None else o.truth
            ok = np.isfinite(o.low) & np.isfinite(o.high) & np.isfinite(t)
            hit += int(((o.low <= t + 1e-12) & (t <= o.high + 1e-12) & ok).sum())
            n += int(ok.sum())
        return hit / n if n else np.nan


def _task(args: tuple) -> tuple[str, dict[str, Outcome]]:
    world, shape, seed, resamples, only = args
    return world.name, {k: o for k, (_, o) in run_once(world, shape, seed, resamples, only).items()}


def calibrate(entries: list[tuple[World, tuple[str, ...]]], shape: Shape, seeds: Iterable[int], resamples: int = 200,
              jobs: int = 1, progress: bool = True, analyses: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per (world, verdict): false-positive rate where the world is a null for it, else power; and coverage.

    Null worlds run every analysis (or those named in ``analyses``: a longer look at a few cells);
    a planted world only the analysis that states its target. ``jobs`` > 1 runs draws in that many
    processes (each draw is independent).
    """
    from tqdm.auto import tqdm

    seeds = list(seeds)
    tasks = []
    for world, _ in entries:
        only = (None if analyses is None else list(analyses)) if world.null else [owners(world)[world.target[0]]]
        tasks += [(world, shape, seed, resamples, only) for seed in seeds]
    tallies: dict[tuple[str, str], Tally] = {}
    bar = tqdm(total=len(tasks), desc="calibration draws", disable=not progress)
    for name, outs in _map(_task, tasks, jobs):
        for key, o in outs.items():
            tallies.setdefault((name, key), Tally()).runs.append(o)
        bar.update()
    bar.close()
    rows = []
    for world, affects in entries:
        for (name, key), tally in tallies.items():
            if name != world.name:
                continue
            r = tally.rates(world.target, key)
            role = "power" if "power" in r else ("affected" if key in affects else "null")
            rows.append({"world": world.name, "verdict": key, "role": role, **r})
    return pd.DataFrame(rows)


def _map(fn: Any, tasks: list, jobs: int) -> Iterator:
    """``fn`` over ``tasks``, in order, in ``jobs`` processes (one: here)."""
    if jobs <= 1:
        yield from map(fn, tasks)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(fn, tasks)
