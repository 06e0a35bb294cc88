"""How routing settles over training checkpoints.

Router saturation (OLMoE paper, sec. 5): the share of each token's top-k experts at an
intermediate checkpoint that are also its top-k at the final checkpoint, on the same
tokens. Alongside it: how utilization and entropy drift across checkpoints, and how much
each layer's router weights move between consecutive checkpoints and relative to the final.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from core.analysis.measures import center_router_rows, require_score_fn
from core.analysis.resampling import (BlockSums, DocumentRuns, Estimate, block_of, document_keys, jackknife_paired_estimate,
                                      jackknife_weights, no_verdict, too_few_documents)
from core.analysis.results import ResultMixin
from core.analysis.routing_stats import RoutingStatsAccumulator
from core.analysis.streaming import Layout, align, fold, require
from core.analysis.features import selection_np
from core.routing_data import RoutingData


def _check_same_tokens(a: RoutingData, b: RoutingData) -> None:
    if (list(a.moe_layers), a.num_experts, a.top_k) != (list(b.moe_layers), b.num_experts, b.top_k):
        raise ValueError(
            f"checkpoints differ in layout: layers {a.moe_layers} E={a.num_experts} k={a.top_k} "
            f"vs layers {b.moe_layers} E={b.num_experts} k={b.top_k}"
        )
    if a.num_tokens != b.num_tokens:
        raise ValueError(
            f"saturation needs the same tokens at both checkpoints: {a.num_tokens} vs {b.num_tokens} tokens"
        )
    for name in ("token_ids", "doc_ids", "positions"):
        ta, tb = getattr(a, name), getattr(b, name)
        if (ta is None) != (tb is None):
            raise ValueError(f"saturation needs the same tokens: {name} recorded at only one checkpoint")
        if ta is not None and not torch.equal(ta, tb):
            raise ValueError(f"saturation needs the same tokens at both checkpoints: {name} differ")


@dataclass
class Saturation(ResultMixin):
    """Per MoE layer, mean over tokens of |top-k at t ∩ top-k at final| / k, in [0, 1]."""

    moe_layers: list[int]
    num_tokens: int
    per_layer: np.ndarray  # [L]
    chance: np.ndarray | None = None  # [L] within-document shuffle
    estimate: Estimate | None = None  # per layer, with intervals over documents

    @property
    def mean(self) -> float:
        return float(np.mean(self.per_layer))


@dataclass
class CheckpointDynamics(ResultMixin):
    """Routing over checkpoints (axis 0, in the given order; the last is the reference "final").

    ``saturation[c, l]`` against the final checkpoint, with ``saturation_chance`` (the same overlap
    between a token at c and a random token of its document at the final checkpoint: what routing
    that knows only the document would score) and intervals over documents in ``estimates``;
    ``utilization[c, l, e]`` shares;
    ``utilization_tv[c, l]`` = total-variation distance of the utilization from the final's;
    entropies normalized by log E (token entropy NaN when logits were not stored).
    """

    names: list[str]
    steps: list[int]
    moe_layers: list[int]
    saturation: np.ndarray  # [C, L]
    utilization: np.ndarray  # [C, L, E]
    utilization_entropy_norm: np.ndarray  # [C, L]
    token_entropy_norm: np.ndarray  # [C, L]
    cv: np.ndarray  # [C, L]
    utilization_tv: np.ndarray  # [C, L]
    saturation_chance: np.ndarray | None = None  # [C, L] saturation with each document's tokens shuffled
    estimates: dict[str, Estimate] = field(default_factory=dict)  # "saturation" [C, L], "saturation_mean" [C]

    def table(self) -> pd.DataFrame:
        """Long table: one row per (checkpoint, layer)."""
        C, L = self.saturation.shape
        return pd.DataFrame(
            {
                "checkpoint": np.repeat(self.names, L),
                "step": np.repeat(self.steps, L),
                "layer": np.tile(self.moe_layers, C),
                "saturation": self.saturation.ravel(),
                "utilization_entropy_norm": self.utilization_entropy_norm.ravel(),
                "token_entropy_norm": self.token_entropy_norm.ravel(),
                "cv": self.cv.ravel(),
                "utilization_tv_to_final": self.utilization_tv.ravel(),
            }
        )


class CheckpointDynamicsAccumulator:
    """Streaming routing statistics of every checkpoint and saturation against the final one.

    ``update(chunks)`` takes the same tokens at every checkpoint (one chunk each, in checkpoint
    order, the final last), as :func:`core.analysis.streaming.align` yields them.
    """

    def __init__(self, names: Sequence[str], steps: Sequence[int], resamples: int = 200, seed: int = 0) -> None:
        if not names or len(names) != len(steps):
            raise ValueError(f"need one step per checkpoint name, got {len(names)} names and {len(steps)} steps")
        self.names, self.steps = [str(n) for n in names], [int(s) for s in steps]
        self.stats = [RoutingStatsAccumulator() for _ in self.names]
        self.layout: Layout | None = None
        self.overlap: np.ndarray | None = None  # [C, L] summed |top-k(c) ∩ top-k(final)| / k
        self.num_tokens = 0
        self.docs, self.sums = DocumentRuns(), BlockSums()
        self.resamples, self.seed = resamples, seed

    def update(self, chunks: Sequence[RoutingData]) -> "CheckpointDynamicsAccumulator":
        if len(chunks) != len(self.names):
            raise ValueError(f"got routing of {len(chunks)} checkpoints for {len(self.names)} checkpoint names")
        final = chunks[-1]
        if self.layout is None:
            self.layout = Layout.of(final)
            self.overlap = np.zeros((len(chunks), self.layout.num_layers))
        for rd, stats in zip(chunks, self.stats):
            _check_same_tokens(rd, final)
            require(rd, "topk_idx", why="router saturation")
            stats.update(rd)
        if final.num_tokens:
            self._add_overlaps(chunks)
            self.num_tokens += final.num_tokens
        return self

    def merge(self, other: "CheckpointDynamicsAccumulator") -> "CheckpointDynamicsAccumulator":
        """Fold in the dynamics of the tokens that follow this share's (the next share of the stream)."""
        if other.layout is None:
            return self
        if self.layout is None:
            return other
        self.layout.check_same(other.layout)
        self.stats = [a.merge(b) for a, b in zip(self.stats, other.stats)]
        self.overlap += other.overlap
        self.num_tokens += other.num_tokens
        self._close(*self.docs.merge(other.docs))
        self.sums.merge(other.sums)
        return self

    def _add_overlaps(self, chunks: Sequence[RoutingData]) -> None:
        """Per-token overlap with the final top-k, summed per document with each checkpoint's expert counts."""
        final, k = chunks[-1], chunks[-1].top_k
        keys = document_keys(final)
        starts = DocumentRuns.starts(keys)
        sel_final = selection_np(final)
        overlap, counts = [], []
        for c, rd in enumerate(chunks):
            sel = sel_final if c == len(chunks) - 1 else selection_np(rd)
            per_token = (sel * sel_final).sum(2) / k  # [N, L]
            self.overlap[c] += per_token.sum(0)
            overlap.append(np.add.reduceat(per_token, starts, axis=0))
            counts.append(np.add.reduceat(sel, starts, axis=0))
        n = np.diff(np.r_[starts, len(keys)])[:, None].astype(np.float64)
        runs = np.concatenate([n, np.stack(overlap, 1).reshape(len(n), -1), np.stack(counts, 1).reshape(len(n), -1)], 1)
        self._close(*self.docs.add_runs(keys[starts], runs))

    def _close(self, keys: np.ndarray, totals: np.ndarray) -> None:
        """Finished documents: tokens, overlaps and the within-document shuffle expectation, into block sums."""
        if not len(keys):
            return
        C, L, E, k = len(self.names), self.layout.num_layers, self.layout.num_experts, self.layout.top_k
        n = totals[:, 0]
        overlap = totals[:, 1 : 1 + C * L].reshape(-1, C, L)
        a = totals[:, 1 + C * L :].reshape(-1, C, L, E)
        null = (a * a[:, -1:]).sum(-1) / k / n[:, None, None]  # E over a shuffle of the document's tokens
        units = block_of(keys, self.sums.num_units)
        self.sums.add("tokens", units, n)
        self.sums.add("overlap", units, overlap)
        self.sums.add("overlap_null", units, null)

    def _estimates(self) -> dict[str, Estimate]:
        """Saturation against the within-document shuffle: jackknife over document blocks, t test, Holm over checkpoints."""
        self._close(*self.docs.flush())
        sums = self.sums.sums
        used = sums["tokens"] > 0
        w = np.concatenate([used[None].astype(np.float64), jackknife_weights(used)])  # all blocks, then each left out
        tot = {k: np.tensordot(w, v, axes=(1, 0)) for k, v in sums.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            obs, null = tot["overlap"] / tot["tokens"][:, None, None], tot["overlap_null"] / tot["tokens"][:, None, None]
        out, why = {}, too_few_documents(used) or ("" if self.resamples else "resampling turned off")
        for name, reduce in (("saturation", lambda x: x), ("saturation_mean", lambda x: x.mean(-1))):
            v, n = reduce(obs), reduce(null)
            est = jackknife_paired_estimate(v[0], n[0], v[1:], n[1:], "within-document shuffle", bounds=(0.0, 1.0),
                                            correct=False)
            est.p_value = np.asarray(est.p_value, np.float64).copy()
            est.p_value[-1] = np.nan  # the final checkpoint against itself is not a test
            out[name] = no_verdict(est, why) if why else est.corrected()
        return out

    def result(self) -> CheckpointDynamics:
        if self.num_tokens == 0:
            raise ValueError("no tokens were given to the checkpoint dynamics")
        stats = [acc.result() for acc in self.stats]
        util = np.stack([s.utilization for s in stats])
        L = self.layout.num_layers
        tok = np.stack([s.token_entropy_norm if s.token_entropy_norm is not None else np.full(L, np.nan) for s in stats])
        est = self._estimates()
        return CheckpointDynamics(
            estimates=est,
            saturation_chance=est["saturation"].null,
            names=self.names,
            steps=self.steps,
            moe_layers=list(self.layout.moe_layers),
            saturation=self.overlap / self.num_tokens,
            utilization=util,
            utilization_entropy_norm=np.stack([s.utilization_entropy_norm for s in stats]),
            token_entropy_norm=tok,
            cv=np.stack([s.cv for s in stats]),
            utilization_tv=0.5 * np.abs(util - util[-1][None]).sum(-1),
        )


def saturation(
    routing_t: RoutingData | Iterable[RoutingData], routing_final: RoutingData | Iterable[RoutingData]
) -> Saturation:
    """Saturation of checkpoint t against the final one; both must hold the same tokens in the same order."""
    acc = CheckpointDynamicsAccumulator(["t", "final"], [0, 1])
    dyn = fold(align([routing_t, routing_final]), {"d": acc})["d"]
    return Saturation(dyn.moe_layers, acc.num_tokens, dyn.saturation[0], dyn.saturation_chance[0],
                      dyn.estimates["saturation"].at(0))


def checkpoint_dynamics(checkpoints: Sequence[tuple[str, int, RoutingData | Iterable[RoutingData]]]) -> CheckpointDynamics:
    """Saturation and drift of routing over ``[(name, step, routing), ...]`` (last = final), in one pass.

    All checkpoints must be traced on the same tokens. ``routing`` is a RoutingData or a
    re-iterable stream of chunks (a ``RoutingCache``); the streams are read once, side by side.
    """
    if not checkpoints:
        raise ValueError("checkpoint_dynamics needs at least one (name, step, RoutingData)")
    for item in checkpoints:
        ok = len(item) == 3 and (isinstance(item[2], RoutingData) or (isinstance(item[2], Iterable) and not isinstance(item[2], Iterator)))
        if not ok:
            raise ValueError("each checkpoint must be a (name, step, RoutingData or re-iterable stream of RoutingData) tuple")
    acc = CheckpointDynamicsAccumulator([n for n, _, _ in checkpoints], [s for _, s, _ in checkpoints])
    return fold(align([r for _, _, r in checkpoints]), {"d": acc})["d"]


@dataclass
class RouterDrift(ResultMixin):
    """How router weights move across checkpoints (axis 0 in the given order; last = final).

    ``*_prev[c]`` compares checkpoint c with c-1 (row 0 is NaN); ``*_final[c]`` with the last.
    ``cosine`` = mean over experts of the cosine between matched router rows;
    ``rel_change`` = ||W_c - W_ref||_F / ||W_ref||_F. Rows are centred first when ``centered``
    (softmax routers, ``score_fn``): a shift shared by all rows does not change routing, so it is
    not counted as drift.
    """

    names: list[str]
    layers: list[int]
    cosine_prev: np.ndarray  # [C, L]
    rel_change_prev: np.ndarray  # [C, L]
    cosine_final: np.ndarray  # [C, L]
    rel_change_final: np.ndarray  # [C, L]
    score_fn: str
    centered: bool


def _row_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmean((a * b).sum(1) / (na * nb)))


def router_weight_drift(
    router_weights: Sequence[Mapping[int, torch.Tensor | np.ndarray]],
    names: Sequence[str] | None = None,
    score_fn: str | None = None,
) -> RouterDrift:
    """Cosine and relative Frobenius change of each layer's router between checkpoints.

    ``score_fn`` (required, the wrapper's ``score_fn`` says which): "softmax" centres each router's
    rows first, "sigmoid" keeps them, since a shift shared by all rows moves a sigmoid router.
    """
    score_fn = require_score_fn(score_fn, "router_weight_drift")
    if not router_weights:
        raise ValueError("router_weight_drift needs at least one checkpoint's router weights")
    names = [str(i) for i in range(len(router_weights))] if names is None else [str(n) for n in names]
    if len(names) != len(router_weights):
        raise ValueError(f"{len(names)} names for {len(router_weights)} checkpoints")
    layers = sorted(router_weights[-1])
    for c, w in enumerate(router_weights):
        if sorted(w) != layers:
            raise ValueError(f"checkpoint {names[c]} has router layers {sorted(w)}, final has {layers}")
    W = [[center_router_rows(w[l], score_fn) for l in layers] for w in router_weights]
    C, L = len(W), len(layers)
    out = {k: np.full((C, L), np.nan) for k in ("cp", "rp", "cf", "rf")}
    for c in range(C):
        for li in range(L):
            cur = W[c][li]
            for ref, ck, rk in ((W[-1][li], "cf", "rf"), (W[c - 1][li] if c else None, "cp", "rp")):
                if ref is None:
                    continue
                if ref.shape != cur.shape:
                    raise ValueError(f"router of layer {layers[li]} changes shape {ref.shape} -> {cur.shape}")
                out[ck][c, li] = _row_cos(cur, ref)
                out[rk][c, li] = np.linalg.norm(cur - ref) / max(np.linalg.norm(ref), 1e-300)
    return RouterDrift(names, layers, out["cp"], out["rp"], out["cf"], out["rf"], score_fn, score_fn == "softmax")
