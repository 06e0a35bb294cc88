"""Stage 2 of the main run: every analysis of the toolkit that applies, on the run's caches and model.

Each analysis is one call into ``core``; this module only decides what to feed it (the final
checkpoint's routing, per dataset or pooled; every checkpoint for the dynamics) and keeps
the plain results together for the report and the findings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from core import (
    CollaborationMiner,
    ExpertAnalyzer,
    RouterAnalyzer,
    ablation_study,
    correlation_difference,
    correlations_by_group,
    cross_layer_correlation,
    domain_specialization,
    most_used_targets,
    router_weight_drift,
    routing_consistency,
    routing_paths,
    vocabulary_specialization,
)
from core.checkpoint_dynamics import checkpoint_dynamics
from core.coactivation import coactivation
from core.routing_stats import routing_stats
from core.routing_cache import CacheStream, RoutingCache
from data import TokenizedDataset


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

    def __getitem__(self, name: str) -> Any:
        return self.results[name]

    def get(self, name: str) -> Any:
        return self.results.get(name)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "datasets": self.datasets, "tokens": self.tokens, "checkpoints": self.checkpoints,
               "skipped": self.skipped, "timings_s": self.timings}
        for name, res in self.results.items():
            if hasattr(res, "to_dict"):
                out[name] = res.to_dict()
            elif isinstance(res, dict):
                out[name] = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in res.items()}
            else:
                out[name] = res
        return out


def run_analyses(
    wrapper: Any,
    sweep: dict[str, list[tuple[str, int | None, RoutingCache]]],
    router_weights: list[dict[int, torch.Tensor]],
    tokenized: dict[str, Any],
    *,
    ablation: bool = True,
    ablation_tokens: int = 4000,
    collaboration: bool = True,
    micro: bool = False,
    progress: bool = True,
) -> RunResults:
    """All analyses: routing statistics, correlations, paths, specialization, weights, dynamics, collaboration, ablation.

    Routing is streamed from the caches shard by shard (each analysis re-reads them), so memory
    does not grow with the number of tokens or checkpoints.
    """
    import time

    datasets = list(sweep)
    per_dataset = {name: caches[-1][2] for name, caches in sweep.items()}  # final checkpoint
    pooled = CacheStream(list(per_dataset.values()))
    ckpt_rows = sweep[datasets[0]]
    res = RunResults(
        model=wrapper.describe(),
        datasets=datasets,
        tokens={name: cache.num_tokens for name, cache in per_dataset.items()},
        checkpoints=[{"name": name, "step": step} for name, step, _ in ckpt_rows],
    )
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("routing_stats", lambda: routing_stats(pooled)),
        ("routing_stats_by_dataset", lambda: {n: routing_stats(cache) for n, cache in per_dataset.items()}),
        ("correlation_topk", lambda: cross_layer_correlation(pooled, feature="topk")),
        ("correlation_probs", lambda: cross_layer_correlation(pooled, feature="probs") if pooled.has_logits else None),
        ("correlation_by_dataset", lambda: correlations_by_group(pooled, by="dataset", feature="topk")),
        ("coactivation", lambda: coactivation(pooled)),
        ("routing_paths", lambda: routing_paths(pooled, top_n=20)),
        ("domain_specialization", lambda: domain_specialization(pooled, by="domain")),
        ("dataset_specialization", lambda: domain_specialization(pooled, by="dataset")),
        ("vocabulary_specialization", lambda: vocabulary_specialization(pooled, min_count=5 if micro else 20)),
        ("routing_consistency", lambda: routing_consistency(pooled)),
        ("router_similarity", lambda: RouterAnalyzer(wrapper).compute_router_similarity_matrix()),
        ("router_subspaces", lambda: RouterAnalyzer(wrapper).analyze_router_subspaces()),
        ("expert_alignment", lambda: ExpertAnalyzer(wrapper, device=wrapper.device).analyze_expert_router_alignment(
            num_random=50 if micro else 200)),  # one SVD per expert: on the model's device (a GPU for real models)
    ]
    if len(ckpt_rows) > 1:
        steps += [
            ("checkpoint_dynamics", lambda: checkpoint_dynamics(
                [(name, step if step is not None else i, CacheStream([sweep[d][i][2] for d in datasets]))
                 for i, (name, step, _) in enumerate(ckpt_rows)])),
            ("router_drift", lambda: router_weight_drift(router_weights, names=[n for n, _, _ in ckpt_rows])),
        ]
    else:
        res.skipped["checkpoint_dynamics"] = "one checkpoint only: pass --checkpoints to study routing over training"
    if collaboration:
        steps.append(("collaboration", lambda: CollaborationMiner(n_components=8 if micro else 16, max_iter=50 if micro else 200).fit(pooled)))
    else:
        res.skipped["collaboration"] = "turned off (--no-collaboration)"
    bar = tqdm(steps, desc="analyses", unit="analysis", disable=not progress)
    for name, fn in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        value = fn()
        res.timings[name] = round(time.perf_counter() - t0, 3)
        if value is None:
            res.skipped[name] = "the cache holds no router logits (compact storage)"
        else:
            res.results[name] = value
    by_ds = res.results.get("correlation_by_dataset") or {}
    names = list(by_ds)
    if len(names) >= 2:
        res.results["correlation_difference"] = {
            f"{a} - {b}": correlation_difference(by_ds[a], by_ds[b]) for a, b in zip(names, names[1:])
        }
    if ablation:
        t0 = time.perf_counter()
        res.results["ablation"] = _ablation(wrapper, tokenized, res.results["routing_stats"], ablation_tokens, progress)
        res.timings["ablation"] = round(time.perf_counter() - t0, 3)
    else:
        res.skipped["ablation"] = "turned off (--no-ablation)"
    return res


def _ablation(wrapper: Any, tokenized: dict[str, Any], stats: Any, max_tokens: int, progress: bool) -> Any:
    """Ablate, at each layer, the most-used expert and (as a control) the least-used one."""
    merged = TokenizedDataset.concat([tok.head_tokens(max_tokens) for tok in tokenized.values()])
    targets, labels = most_used_targets(np.asarray(stats.utilization), list(stats.moe_layers))
    return ablation_study(wrapper, merged, targets, labels=labels, batch_size=16, progress=progress)
