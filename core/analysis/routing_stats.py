"""Per-layer, per-expert routing statistics: utilization, entropy, load balance, collapse.

These are the first numbers to look at for any MoE: whether all experts get used, how
peaked each token's routing is, and whether a layer has collapsed onto a few experts.
Computed with a streaming accumulator, so memory does not grow with the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.analysis.diagnosis import CollapseThresholds, diagnose, load_cv, load_entropy_norm, uniform_routing_counts  # noqa: F401
from core.analysis.measures import entropy
from core.analysis.resampling import (BlockSums, Estimate, block_of, document_keys, jackknife_interval, jackknife_weights,
                                      no_verdict, permutation_estimate, too_few_documents)
from core.analysis.results import ResultMixin
from core.analysis.streaming import RoutingAccumulator, fold_one
from core.analysis.features import normalized_probs_np, selection_np
from core.routing_data import RoutingData

LOAD_NULL_DRAWS = 400  # relabellings (at least 20 per layer: enough for a Holm-corrected permutation p)


@dataclass
class RoutingStats(ResultMixin):
    """Routing statistics per MoE layer (axis 0) and expert (axis 1).

    Shares sum to 1 per layer; entropies are in nats, ``*_norm`` divided by log E.
    ``token_entropy*`` and ``mean_prob`` are ``None`` when the routing had no logits; for
    sigmoid routers the probabilities are renormalized to sum to 1 before taking entropies.
    """

    moe_layers: list[int]
    num_experts: int
    top_k: int
    num_tokens: int
    counts: np.ndarray  # [L, E] top-k assignments
    utilization: np.ndarray  # [L, E] share of the layer's assignments (sums to 1)
    selection_rate: np.ndarray  # [L, E] fraction of tokens that selected the expert (sums to k)
    utilization_entropy: np.ndarray  # [L] nats
    utilization_entropy_norm: np.ndarray  # [L] in [0, 1]
    cv: np.ndarray  # [L] std/mean of the expert loads
    max_over_mean: np.ndarray  # [L]
    dead: np.ndarray  # [L, E] bool
    dominant: np.ndarray  # [L, E] bool
    collapsed: np.ndarray  # [L] bool
    diagnosis: list[str]  # [L] "collapsed" | "imbalanced" | "healthy"
    reasons: list[list[str]]  # [L] why the diagnosis was made
    thresholds: CollapseThresholds
    null_note: str = ""  # the sampling-noise null every threshold is judged against
    token_entropy: np.ndarray | None = None  # [L] mean per-token routing entropy, nats
    token_entropy_norm: np.ndarray | None = None  # [L] divided by log E
    mean_prob: np.ndarray | None = None  # [L, E] mean router probability
    notes: list[str] = field(default_factory=list)
    estimates: dict[str, Estimate] = field(default_factory=dict)  # "utilization_entropy_norm" [L], when resampled

    def layer_table(self) -> pd.DataFrame:
        """One row per layer: the summary numbers a dashboard shows."""
        return pd.DataFrame(
            {
                "layer": self.moe_layers,
                "utilization_entropy_norm": self.utilization_entropy_norm,
                "token_entropy_norm": (self.token_entropy_norm if self.token_entropy_norm is not None else np.nan),
                "cv": self.cv,
                "max_over_mean": self.max_over_mean,
                "num_dead": self.dead.sum(1),
                "num_dominant": self.dominant.sum(1),
                "diagnosis": self.diagnosis,
            }
        )

    def expert_table(self) -> pd.DataFrame:
        """Long table (layer, expert, utilization, selection_rate, dead, dominant)."""
        L, E = self.utilization.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(self.moe_layers, E),
                "expert": np.tile(np.arange(E), L),
                "utilization": self.utilization.ravel(),
                "selection_rate": self.selection_rate.ravel(),
                "dead": self.dead.ravel(),
                "dominant": self.dominant.ravel(),
            }
        )


class RoutingStatsAccumulator(RoutingAccumulator):
    """Streaming routing statistics: ``update(chunk)`` per chunk, then ``result()``."""

    name = "the routing statistics"
    needs = ("topk_idx",)

    def __init__(self, thresholds: CollapseThresholds | None = None, resamples: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.thresholds = thresholds or CollapseThresholds()
        self.resamples, self.seed = resamples, seed
        self.blocks = BlockSums()
        self.prob_tokens = 0
        self.missing_logits = False

    def _start(self) -> None:
        L, E = self.layout.num_layers, self.layout.num_experts
        self.counts = np.zeros((L, E))
        self.entropy_sum = np.zeros(L)
        self.prob_sum = np.zeros((L, E))

    def _add(self, chunk: RoutingData) -> None:
        sel = selection_np(chunk)
        self.counts += sel.sum(0)
        if self.resamples:
            self.blocks.add("counts", block_of(document_keys(chunk)), sel)
        if chunk.router_logits is None:
            self.missing_logits = True
        else:
            p = normalized_probs_np(chunk)
            self.entropy_sum += entropy(p).sum(0)
            self.prob_sum += p.sum(0)
            self.prob_tokens += chunk.num_tokens

    def _merge(self, other: "RoutingStatsAccumulator") -> None:
        self.counts += other.counts
        self.entropy_sum += other.entropy_sum
        self.prob_sum += other.prob_sum
        self.blocks.merge(other.blocks)
        self.prob_tokens += other.prob_tokens
        self.missing_logits |= other.missing_logits

    def _result(self) -> RoutingStats:
        th, E, n, k = self.thresholds, self.layout.num_experts, self.num_tokens, self.layout.top_k
        layers = list(self.layout.moe_layers)
        counts = self.counts
        total = counts.sum(1, keepdims=True)
        util = counts / np.clip(total, 1e-300, None)
        logE = np.log(E) if E > 1 else 1.0
        u_ent = entropy(util)
        cv = load_cv(counts)
        mom = counts.max(1) / np.clip(counts.mean(1), 1e-300, None)
        rate = counts / n
        blocks = self.blocks.sums.get("counts") if self.resamples else None
        judged = diagnose(th, counts, n, k, blocks, self.resamples, self.seed)
        collapsed = [d == "collapsed" for d in judged.diagnosis]
        notes = []
        tok_ent = tok_norm = mean_prob = None
        if self.missing_logits:
            notes.append(
                "some or all chunks had no router logits (compact storage): token entropy and mean probability skipped"
            )
        elif self.prob_tokens:
            tok_ent = self.entropy_sum / self.prob_tokens
            tok_norm = tok_ent / logE
            mean_prob = self.prob_sum / self.prob_tokens
        return RoutingStats(
            estimates=self._estimates() if self.resamples else {},
            moe_layers=layers,
            num_experts=E,
            top_k=k,
            num_tokens=n,
            counts=counts,
            utilization=util,
            selection_rate=rate,
            utilization_entropy=u_ent,
            utilization_entropy_norm=u_ent / logE,
            cv=cv,
            max_over_mean=mom,
            dead=judged.dead,
            dominant=judged.dominant,
            collapsed=np.array(collapsed),
            diagnosis=judged.diagnosis,
            reasons=judged.reasons,
            thresholds=th,
            null_note=judged.null_note,
            token_entropy=tok_ent,
            token_entropy_norm=tok_norm,
            mean_prob=mean_prob,
            notes=notes,
        )


    def _estimates(self) -> dict[str, Estimate]:
        """Load balance with an interval over documents, against a balanced load with the run's document clustering.

        The interval is a jackknife over document blocks: a bootstrap repeats documents, which lowers
        an entropy, so its interval sat below the value (1.000 with a 95% CI of 0.999–0.999). The
        null relabels the experts of each document block at random: every expert's expected load is
        then the same, while each document keeps how concentrated its routing is. Uniform routing of
        independent tokens (the earlier null) flagged balanced routing whenever documents differ.
        """
        blocks = self.blocks.sums["counts"]  # [U, L, E]
        used = blocks.sum((1, 2)) > 0
        value = load_entropy_norm(blocks.sum(0))
        loo = load_entropy_norm(np.tensordot(jackknife_weights(used), blocks, axes=(1, 0)))
        draws = jackknife_interval(value, loo, bounds=(0.0, 1.0))
        null_draws = load_entropy_norm(relabelled_loads(blocks[used], max(LOAD_NULL_DRAWS, int(np.ceil(20 * blocks.shape[1]))), self.seed))  # [R, L]
        est = permutation_estimate(value, draws, null_draws, "experts relabelled in each document block", len(loo),
                                   alternative="less")
        why = too_few_documents(used)
        return {"utilization_entropy_norm": no_verdict(est, why) if why else est}


def relabelled_loads(blocks: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """``[draws, L, E]`` loads with each block's expert labels permuted at random (per layer): balanced in expectation."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws,) + blocks.shape[1:])
    for r in range(draws):
        out[r] = rng.permuted(blocks, axis=-1).sum(0)  # each (block, layer) row shuffled on its own
    return out


def routing_stats(
    routing: RoutingData | Iterable[RoutingData], thresholds: CollapseThresholds | None = None
) -> RoutingStats:
    """Routing statistics of one RoutingData or a stream of chunks."""
    return fold_one(routing, RoutingStatsAccumulator(thresholds))
