"""Stage 2 of the main run: every analysis of the toolkit that applies, on the run's caches and model.

Routing analyses are accumulators fed by one :func:`core.analysis.streaming.fold` over the
sweep: each dataset's caches at every checkpoint are read side by side, shard by shard, once
(checksums verified once). The final checkpoint's chunk feeds the per-token analyses; all
checkpoints feed the dynamics. Weight analyses use the final checkpoint's router weights as
the sweep returned them; ablation runs the model. Memory does not grow with the number of
tokens (one shard per checkpoint at a time). Under torchrun the one pass is shared: each
process folds its part of the caches (``exp.analysis_shares``) and rank 0 gets the merge.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from core.analysis.ablation import ablation_study, most_and_least_used_experts
from core.analysis.checkpoint_dynamics import CheckpointDynamicsAccumulator, router_weight_drift
from core.analysis.coactivation import CoactivationAccumulator, RoutingPathsAccumulator
from core.analysis.collaboration import CollaborationMiner
from core.analysis.consistency import ConsistencyAccumulator
from core.analysis.correlations import CorrelationAccumulator, correlation_difference
from core.analysis.expert_alignment import ExpertAnalyzer
from core.analysis.pruning import FRACTIONS, pruning_scores, pruning_study
from core.analysis.router_weights import RouterAnalyzer
from core.analysis.routing_stats import RoutingStatsAccumulator
from core.analysis.specialization import DomainSpecializationAccumulator
from core.analysis.streaming import Accumulator, PerGroup, Pick, WhenRecorded, feed, merge_all, results_of
from core.analysis.vocabulary import MAX_TOKEN_IDS, VocabularyAccumulator
from core.distributed import Ranks
from core.collection.sweep import Sweep
from core.safe_io import to_jsonable
from data import TokenizedDataset
from exp.analysis_shares import share_tokens, sweep_stream
from exp.stage_clock import StageClock

ONE_PASS = "analyses: one pass over the caches"
CAUSAL_MAX_PASSES = 64  # single-expert ablations the pruning study's causal criterion may cost


@dataclass
class RunResults:
    """The plain results of one run, by analysis name; ``skipped`` says what did not apply and why."""

    model: dict[str, Any]
    datasets: list[str]
    tokens: dict[str, int]
    checkpoints: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    processes: dict[str, Any] = field(default_factory=dict)  # how many processes analysed which share of the tokens

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def get(self, name: str) -> Any:
        return self.results.get(name)

    def header(self) -> dict[str, Any]:
        """What the run was (model, data, timings), JSON-ready; the analyses' results are in ``results``."""
        return to_jsonable({"model": self.model, "datasets": self.datasets, "tokens": self.tokens, "checkpoints": self.checkpoints,
                            "skipped": self.skipped, "timings_s": self.timings, "processes": self.processes})

    def to_dict(self) -> dict[str, Any]:
        return {**self.header(), **to_jsonable(self.results)}


def frequent_token_ids(tokenized: dict[str, TokenizedDataset], n: int = MAX_TOKEN_IDS) -> list[int]:
    """The ``n`` most frequent token ids of the run's data (the ids vocabulary specialization tracks)."""
    counts: np.ndarray = np.zeros(0, np.int64)
    for tok in tokenized.values():
        ids = tok.input_ids[tok.attention_mask.bool()].numpy().astype(np.int64)
        c = np.bincount(ids)
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[: len(c)] += c
    order = np.argsort(-counts, kind="stable")
    return [int(t) for t in order[:n] if counts[t] > 0]


def routing_accumulators(sweep: Sweep, *, micro: bool, collaboration: bool, resamples: int = 200,
                         seed: int = 0, frequent_ids: list[int] | None = None) -> dict[str, Accumulator]:
    """The streaming analyses of a run, each reading the final checkpoint's chunk (dynamics: all of them).

    The headline analyses keep what their nulls and intervals over documents need (``resamples``).
    ``frequent_ids``: the token ids vocabulary specialization tracks (most frequent first).
    """
    r = dict(resamples=resamples, seed=seed)
    final: dict[str, Accumulator] = {
        "routing_stats": RoutingStatsAccumulator(**r),
        "routing_stats_by_dataset": PerGroup(RoutingStatsAccumulator, by="dataset"),
        "correlation_topk": CorrelationAccumulator("topk", **r),
        "correlation_probs": WhenRecorded(CorrelationAccumulator("probs"), "router_logits"),
        "correlation_by_dataset": PerGroup(partial(CorrelationAccumulator, "topk"), by="dataset"),
        "coactivation": CoactivationAccumulator(),
        "routing_paths": RoutingPathsAccumulator(top_n=20),
        "domain_specialization": DomainSpecializationAccumulator("domain", permutations=resamples, **r),
        "dataset_specialization": DomainSpecializationAccumulator("dataset", permutations=0, resamples=0),
        "vocabulary_specialization": VocabularyAccumulator(min_count=5 if micro else 20,
                                                           permutations=20 if resamples else 0, seed=seed,
                                                           token_ids=frequent_ids),
        "routing_consistency": ConsistencyAccumulator(**r),
    }
    if collaboration:
        miner = CollaborationMiner(n_components=8 if micro else 16, max_iter=50 if micro else 200)
        final["collaboration"] = miner.accumulator()
    accs: dict[str, Accumulator] = {name: Pick(acc) for name, acc in final.items()}
    if len(sweep.checkpoints) > 1:
        steps = [c.step if c.step is not None else i for i, c in enumerate(sweep.checkpoints)]
        accs["checkpoint_dynamics"] = CheckpointDynamicsAccumulator([c.name for c in sweep.checkpoints], steps, **r)
    return accs


def weight_analyses(wrapper: Any, sweep: Sweep, *, micro: bool, seed: int = 0,
                    progress: bool = False) -> list[tuple[str, Callable[[], Any]]]:
    """Analyses of the router and expert weights; routers as the sweep read them, once per checkpoint."""
    routers = sweep.router_weights[-1]
    score_fn = getattr(wrapper, "score_fn", "softmax")  # softmax routers are compared with their rows centred
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("router_similarity", lambda: RouterAnalyzer(score_fn=score_fn).compute_router_similarity_matrix(
            routers, num_null=20 if micro else 100, seed=seed)),
        ("router_subspaces", lambda: RouterAnalyzer(score_fn=score_fn).analyze_router_subspaces(routers)),
        ("expert_alignment", lambda: ExpertAnalyzer(wrapper, device=wrapper.device, progress=progress)
            .analyze_expert_router_alignment(router_weights=routers, num_permutations=200 if micro else 1000, seed=seed)),
    ]
    if len(sweep.checkpoints) > 1:
        names = [c.name for c in sweep.checkpoints]
        steps.append(("router_drift", lambda: router_weight_drift(sweep.router_weights, names=names, score_fn=score_fn)))
    return steps


def run_analyses(
    wrapper: Any,
    sweep: Sweep,
    tokenized: dict[str, TokenizedDataset],
    *,
    ablation: bool = True,
    ablation_tokens: int = 4000,
    collaboration: bool = True,
    micro: bool = False,
    progress: bool = True,
    resamples: int = 200,
    seed: int = 0,
    clock: StageClock | None = None,
    ranks: Ranks | None = None,
    pruning: Sequence[float] = FRACTIONS,
    pruning_tokens: int = 1500,
) -> RunResults | None:
    """All analyses: routing statistics, correlations, paths, specialization, weights, dynamics, collaboration, ablation.

    ``clock``, if given, records each stage's seconds and peak memory (the one pass as one stage,
    its analyses' seconds listed under it); ``timings`` of the result has the seconds either way.
    Under torchrun (``ranks``), every process folds its share of the caches and the merged
    accumulators reach rank 0, which does the rest; the other ranks get None.
    """
    clock, ranks = clock or StageClock(), ranks or Ranks()
    res = RunResults(
        model=wrapper.describe(),
        datasets=sweep.datasets,
        tokens={name: sweep.final(name).num_tokens for name in sweep.datasets},
        checkpoints=[{"name": c.name, "step": c.step} for c in sweep.checkpoints],
    )
    if len(sweep.checkpoints) == 1:
        res.skipped["checkpoint_dynamics"] = "one checkpoint only: pass --checkpoints to study routing over training"
    if not collaboration:
        res.skipped["collaboration"] = "turned off (--no-collaboration)"
    accs = routing_accumulators(sweep, micro=micro, collaboration=collaboration, resamples=resamples, seed=seed,
                                frequent_ids=frequent_token_ids(tokenized) if tokenized else None)
    with clock.stage(ONE_PASS):
        found = _one_pass(sweep, accs, ranks, progress, res.timings)
    if found is None:
        return None
    res.processes = {"world_size": ranks.world_size, "tokens_per_process": share_tokens(sweep, ranks.world_size)}
    clock.add_parts(ONE_PASS, res.timings)
    steps = weight_analyses(wrapper, sweep, micro=micro, seed=seed, progress=progress) if sweep.router_weights else []
    if not sweep.router_weights:
        for name in ("router_similarity", "router_subspaces", "expert_alignment") + (("router_drift",) * (len(sweep.checkpoints) > 1)):
            res.skipped[name] = "the model ran on NDIF: its weights are not here"
    for name, fn in steps:
        with clock.stage(name):
            found[name] = fn()
        res.timings[name] = clock.rows[-1].seconds
    for name, value in found.items():
        if value is None:
            res.skipped[name] = "the cache holds no router logits (compact storage)"
        else:
            res.results[name] = value
    by_ds = res.results.get("correlation_by_dataset")
    names = list(by_ds or [])
    if len(names) >= 2:
        res.results["correlation_difference"] = {
            f"{a} - {b}": correlation_difference(by_ds[a], by_ds[b]) for a, b in zip(names, names[1:])
        }
    if ablation:
        with clock.stage("ablation"):
            res.results["ablation"] = _ablation(wrapper, tokenized, res.results["routing_stats"], ablation_tokens,
                                               progress, resamples, seed)
        res.timings["ablation"] = clock.rows[-1].seconds
    else:
        res.skipped["ablation"] = "turned off (--no-ablation)"
    if pruning:
        with clock.stage("pruning"):
            res.results["pruning"] = _pruning(wrapper, tokenized, res.results, pruning_tokens, pruning, progress, resamples, seed)
        res.timings["pruning"] = clock.rows[-1].seconds
    else:
        res.skipped["pruning"] = "turned off (--no-pruning)"
    return res


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


def _model_tokens(tokenized: dict[str, Any], max_tokens: int) -> TokenizedDataset:
    """The first ``max_tokens`` of every dataset: what the ablation and pruning forward passes score."""
    return TokenizedDataset.concat([tok.head_tokens(max_tokens) for tok in tokenized.values()])


def _pruning(wrapper: Any, tokenized: dict[str, Any], results: dict[str, Any], max_tokens: int, fractions: Sequence[float],
             progress: bool, resamples: int, seed: int) -> Any:
    """Prune each fraction of every layer's experts by each criterion, against random (``core.analysis.pruning``).

    The causal criterion costs one forward pass per expert: it is left out (and said so) past ``CAUSAL_MAX_PASSES``.
    """
    stats = results["routing_stats"]
    L, E = np.asarray(stats.utilization).shape
    causal = L * E <= CAUSAL_MAX_PASSES
    out = pruning_study(wrapper, _model_tokens(tokenized, max_tokens), pruning_scores(stats, results.get("collaboration")),
                        list(stats.moe_layers), fractions=fractions, causal=causal, batch_size=16, progress=progress,
                        resamples=resamples, seed=seed)
    if not causal:
        out.notes.append(f"causal criterion left out: it needs {L * E} single-expert ablations (more than {CAUSAL_MAX_PASSES})")
    return out


def _ablation(wrapper: Any, tokenized: dict[str, Any], stats: Any, max_tokens: int, progress: bool,
              resamples: int, seed: int) -> Any:
    """Ablate, at each layer, the most-used expert and (as a control) the least-used one."""
    merged = _model_tokens(tokenized, max_tokens)
    targets, labels = most_and_least_used_experts(np.asarray(stats.utilization), list(stats.moe_layers))
    return ablation_study(wrapper, merged, targets, labels=labels, batch_size=16, progress=progress,
                          resamples=resamples, seed=seed)
