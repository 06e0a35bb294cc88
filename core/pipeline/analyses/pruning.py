"""Expert pruning: the loss change when every layer loses a share of its experts, chosen by each criterion, against random."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from core.analysis.pruning import lowest, pruning_scores, pruning_study
from core.pipeline.findings_text import nats, span
from core.pipeline.reuse import reuse_identity, value_digest
from core.pipeline.spec import AnalysisSpec, Finding, register
from viz import plotting as P
from viz.run_report import ReportPage

CAUSAL_MAX_PASSES = 64  # single-expert ablations the pruning study's causal criterion may cost


def _sentence(pr: Any) -> str:
    """The fraction where a criterion does best against random (else the largest), and who beats random where."""
    names = {"weight_mass": "router weight mass", "collaboration": "collaboration share", "usage": "usage",
             "causal": "single-expert ablation", "random": "random"}
    rnd, F = pr.criteria.index("random"), len(pr.fractions)
    wins = [j for j in range(F) if np.asarray(pr.beats_random)[:, j].any()]
    j = wins[-1] if wins else F - 1
    c = min((i for i in range(len(pr.criteria)) if i != rnd), key=lambda i: pr.overall[i, j], default=rnd)
    verdict = "beats random" if pr.beats_random[c, j] else "not shown to beat random"
    ci = lambda i: f"{nats(pr.overall[i, j])} " + (  # noqa: E731
        f"(95% CI {span(pr.overall_low[i, j], pr.overall_high[i, j], nats)})"
        if np.isfinite(pr.overall_low[i, j]) and np.isfinite(pr.overall_high[i, j]) else "(no interval: too few documents)")
    beats = [f"{names.get(n, n)} at {int(pr.beats_random[i].sum())}" for i, n in enumerate(pr.criteria)
             if i != rnd and pr.beats_random[i].any()]
    est = pr.versus_random
    holm = (f" (t test on the seeds, Holm over {est.family}: ≈ {est.expected_false:.2g} false per run)"
            if est is not None and est.family > 1 else "")
    if est is not None and not np.isfinite(np.asarray(est.p_value, float)).any():
        holm = f" (no verdict: {est.why_none})"
    return (f"Pruning (loss change, nats per token; random: {len(pr.random_seed_overall)} seeds): pruning "
            f"{pr.fractions[j]:.1%} of each layer's experts ({pr.experts_pruned[j]} of {pr.num_experts}), the best criterion, "
            f"{names.get(pr.criteria[c], pr.criteria[c])}, costs {ci(c)} against random {ci(rnd)}: {verdict}. "
            + (f"Beats random, of {F} fractions: " + ", ".join(beats) if beats
               else f"No criterion beats random at any of {F} fractions") + holm + ".")


def _pruning_section(r: Mapping[str, Any], page: ReportPage) -> None:
    """Loss change when each criterion prunes each share of every layer's experts, against random."""
    pr = r.get("pruning")
    if pr is None:
        return
    page.section("Expert pruning", "Every MoE layer loses the same share of its experts at once (routing renormalized "
                    "over the rest), chosen by each criterion: least router weight mass, least share in the collaboration "
                    "patterns, least used, least loss when ablated alone, or at random (several seeds: the baseline). "
                    "A criterion beats random when its loss change is below what random choices give, tested as one more "
                    "random draw (t test on the seeds, Holm over criteria and fractions). " + " ".join(pr.notes))
    page.figure("Expert pruning", "pruning", P.pruning_curves(pr.fractions, pr.criteria, pr.overall, pr.overall_low, pr.overall_high),
        pr.table(), caption="Token-weighted over domains, with 95% bands over documents; per-domain numbers in the table.")


VERSION = "1"  # bump by hand when the pruning study's computation changes: results stored by the old code are not reused
BATCH_SIZE = 16


def _inputs(results: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[int], bool]:
    """What pruning reads of the run's results: each criterion's scores, the MoE layers, and whether the causal one runs."""
    stats = results["routing_stats"]
    L, E = np.asarray(stats.utilization).shape
    return pruning_scores(stats, results.get("collaboration")), list(stats.moe_layers), L * E <= CAUSAL_MAX_PASSES


def _compute(ctx: Any, results: Mapping[str, Any]) -> Any:
    """Prune each fraction of every layer's experts by each criterion, against random (``core.analysis.pruning``).

    The causal criterion costs one forward pass per expert: it is left out (and said so) past ``CAUSAL_MAX_PASSES``.
    """
    scores, layers, causal = _inputs(results)
    out = pruning_study(ctx.wrapper, ctx.model_tokens(ctx.options.analysis.pruning_tokens), scores, layers,
                        fractions=ctx.options.analysis.pruning_fractions, causal=causal, batch_size=BATCH_SIZE,
                        progress=ctx.progress, random_seeds=ctx.options.analysis.pruning_random_seeds,
                        resamples=ctx.resamples, seed=ctx.seed)
    L, E = np.asarray(results["routing_stats"].utilization).shape
    if not causal:
        out.notes.append(f"causal criterion left out: it needs {L * E} single-expert ablations (more than {CAUSAL_MAX_PASSES})")
    return out


def _reuse_key(ctx: Any, results: Mapping[str, Any]) -> dict[str, Any]:
    """What pruning depends on: model, tokens, resamples and seed, its scores (routing_stats, collaboration), settings, code."""
    scores, layers, causal = _inputs(results)
    a = ctx.options.analysis
    # the study reads its scores only through the experts each criterion prunes at each fraction: keyed on those,
    # scores equal but for the last bit (a restored array summed in another order) still find the stored result
    pruned = [[name, [lowest(s, layers, float(f)) for f in a.pruning_fractions]] for name, s in scores.items()]
    return reuse_identity(ctx, a.pruning_tokens, code=f"pruning/{VERSION}", pruned=value_digest([pruned, layers]),
                          causal=causal, fractions=[float(f) for f in a.pruning_fractions],
                          random_seeds=int(a.pruning_random_seeds), batch_size=BATCH_SIZE)


register(AnalysisSpec(
    "pruning", "after", order=90, lead=70, compute=_compute, reuse_key=_reuse_key,
    skip=lambda ctx: None if ctx.options.analysis.pruning else "turned off (--no-pruning)",
    decisions=lambda pr: {"pruning_vs_random": pr.versus_random},
    headline=lambda pr, record: {"pruning_best": {f"{f:g}": b for f, b in zip(pr.fractions, pr.best)}},
    findings=lambda pr, record: [Finding("pruning", _sentence(pr), ("pruning",))],
    report=lambda pr, record, page: _pruning_section(record.results, page),
    wandb_tables=lambda pr, record, decode: {"tables/pruning": pr.table()},
    notes="pruning by router weight mass, collaboration share, usage or single-expert ablation, against random seeds (t test on the seeds, Holm)",
))
