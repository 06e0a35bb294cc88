"""The analyses of a run: every registered analysis that applies, on the run's caches and model.

``"pass"`` analyses are accumulators fed by one :func:`core.analysis.streaming.feed` over the
sweep: each dataset's caches at every checkpoint are read side by side, shard by shard, once
(checksums verified once). The final checkpoint's chunk feeds the per-token analyses; all
checkpoints feed those that ask for them (dynamics). ``"after"`` analyses then run in order
(weights, forward passes, results derived from others). Memory does not grow with the number
of tokens (one shard per checkpoint at a time). Under torchrun the one pass is shared: each
process folds its part of the caches (``core.pipeline.shares``) and rank 0 gets the merge.
A pass analysis whose caches, settings and code are unchanged takes its stored result
(``core.pipeline.pass_reuse``); the pass feeds only the others, and none when all are stored.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from core.analysis.streaming import Accumulator, Pick, feed, merge_all, results_of
from core.collection.sweep import Sweep
from core.distributed import Ranks
from core.pipeline.context import RunContext
from core.pipeline.pass_reuse import PassResults
from core.pipeline.record import RunRecord
from core.pipeline.reuse import compute_or_reuse
from core.pipeline.shares import share_tokens, sweep_stream
from core.pipeline.spec import AnalysisSpec, registered
from core.pipeline.stage_clock import StageClock

ONE_PASS = "analyses: one pass over the caches"
NO_LOGITS = "the cache holds no router logits (compact storage)"


def _applicable(ctx: RunContext, stage: str, skipped: dict[str, str]) -> list[AnalysisSpec]:
    """The registered analyses of ``stage`` that apply to this run; each of the others goes into ``skipped`` with why."""
    out = []
    for spec in registered():
        why = spec.skip(ctx) if spec.stage == stage and spec.skip else None
        if why:
            skipped[spec.name] = why
        elif spec.stage == stage:
            out.append(spec)
    return out


def pass_accumulators(ctx: RunContext) -> tuple[dict[str, Accumulator], dict[str, str]]:
    """The accumulator of every ``"pass"`` analysis that applies, and why each of the others does not."""
    accs: dict[str, Accumulator] = {}
    skipped: dict[str, str] = {}
    for spec in _applicable(ctx, "pass", skipped):
        acc = spec.build(ctx)
        accs[spec.name] = acc if spec.all_checkpoints else Pick(acc)
    return accs, skipped


def run_analyses(ctx: RunContext, model: Mapping[str, Any], clock: StageClock | None = None,
                 ranks: Ranks | None = None) -> RunRecord | None:
    """Every analysis: the one pass, then the ``"after"`` analyses; the record of the run without its findings yet.

    ``clock``, if given, records each stage's seconds and peak memory (the one pass as one stage,
    its analyses' seconds listed under it); the record's ``timings`` has the seconds either way.
    Under torchrun (``ranks``), every process folds its share of the caches and the merged
    accumulators reach rank 0, which does the rest; the other ranks get None.
    """
    clock, ranks = clock or StageClock(), ranks or Ranks()
    accs, skipped = pass_accumulators(ctx)
    timings: dict[str, float] = {}
    with clock.stage(ONE_PASS):
        found = _pass_results(ctx, accs, ranks, timings)
    if found is None:
        return None
    if len(found.reused) == len(accs):
        clock.note_last("reused: no cache read")
    clock.add_parts(ONE_PASS, timings)
    results = {}
    for name, value in found.items():
        if value is None:
            skipped[name] = NO_LOGITS
        else:
            results[name] = value
    _after_pass(ctx, results, skipped, timings, clock)
    sweep = ctx.sweep
    return RunRecord(options=ctx.options.to_dict(), model=model, datasets=tuple(sweep.datasets),
                     tokens={name: sweep.final(name).num_tokens for name in sweep.datasets},
                     checkpoints=tuple({"name": c.name, "step": c.step} for c in sweep.checkpoints), results=results,
                     skipped=skipped, timings=timings,
                     processes={"world_size": ranks.world_size, "tokens_per_process": share_tokens(sweep, ranks.world_size)})


def _after_pass(ctx: RunContext, results: dict[str, Any], skipped: dict[str, str], timings: dict[str, float],
                clock: StageClock) -> None:
    """Each ``"after"`` analysis in order, as a stage of its own; one that returns None has nothing to say.

    One that declares ``reuse_key`` takes its stored result when its inputs are unchanged (shown "name (reused)")."""
    for spec in _applicable(ctx, "after", skipped):
        with clock.stage(spec.name):
            value, reused = compute_or_reuse(spec, ctx, results)
        if reused:
            clock.note_last("reused")
        if value is not None:
            results[spec.name] = value
            timings[spec.name] = clock.rows[-1].seconds


class _Found(dict):
    """The pass's results by analysis, with the names of those taken from the store (``reused``)."""

    reused: tuple[str, ...] = ()


def _pass_results(ctx: RunContext, accs: dict[str, Accumulator], ranks: Ranks,
                  timings: dict[str, float]) -> _Found | None:
    """Each pass analysis's stored result where its inputs are unchanged; the one pass feeds only the others."""
    t0 = time.perf_counter()
    stored = PassResults(ctx, ranks.world_size)
    found = _Found(stored.load(list(accs)))
    found.reused = tuple(found)
    if found.reused:
        timings["stored results read"] = round(time.perf_counter() - t0, 3)
    todo = {name: acc for name, acc in accs.items() if name not in found}
    if todo:
        fresh = _one_pass(ctx.sweep, todo, ranks, ctx.progress, timings)
        if fresh is None:
            return None
        stored.save(fresh)
        found.update(fresh)
    out = _Found({name: found[name] for name in accs})  # in the registry's order, whichever way each was found
    out.reused = found.reused
    return out


def _one_pass(sweep: Sweep, accs: dict[str, Accumulator], ranks: Ranks, progress: bool,
              timings: dict[str, float]) -> dict[str, Any] | None:
    """Each process folds its share of the caches; the accumulators are merged onto rank 0, which returns the results."""
    clock: dict[str, float] = {}
    fed = feed(sweep_stream(sweep, ranks), accs, progress=progress, desc="analyses (one pass over the caches)",
               clock=clock)
    if ranks.world_size > 1:
        t0 = time.perf_counter()
        fed = ranks.reduce(fed, lambda a, b: merge_all([a, b]))
        if fed is None:
            return None
        clock[f"merging {ranks.world_size} processes' shares"] = time.perf_counter() - t0
    return results_of(fed, clock, timings)
