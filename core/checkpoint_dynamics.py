"""How routing settles over training checkpoints.

Router saturation (OLMoE paper, sec. 5): the share of each token's top-k experts at an
intermediate checkpoint that are also its top-k at the final checkpoint, on the same
tokens. Alongside it: how utilization and entropy drift across checkpoints, and how much
each layer's router weights move between consecutive checkpoints and relative to the final.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.analysis_utils import ResultMixin, as_chunks, require, selection_np, to_numpy
from core.routing_data import RoutingData
from core.routing_stats import RoutingStats, RoutingStatsAccumulator


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


def saturation(
    routing_t: RoutingData | Iterable[RoutingData], routing_final: RoutingData | Iterable[RoutingData]
) -> np.ndarray:
    """Per MoE layer, mean over tokens of |top-k at t ∩ top-k at final| / k, in [0, 1].

    Both arguments must hold the same tokens in the same order (chunks are zipped).
    """
    return _saturation_pass(routing_t, routing_final)


def _saturation_pass(
    routing_t: RoutingData | Iterable[RoutingData],
    routing_final: RoutingData | Iterable[RoutingData],
    stats: RoutingStatsAccumulator | None = None,
) -> np.ndarray:
    """:func:`saturation`, also feeding each chunk of ``routing_t`` to ``stats`` (one read, two results)."""
    inter = None
    n = 0
    for a, b in zip(as_chunks(routing_t), as_chunks(routing_final), strict=True):
        _check_same_tokens(a, b)
        require(a, "topk_idx", why="router saturation")
        require(b, "topk_idx", why="router saturation")
        if stats is not None:
            stats.update(a)
        if a.num_tokens == 0:
            continue
        both = (selection_np(a) * selection_np(b)).sum((0, 2)) / a.top_k
        inter = both if inter is None else inter + both
        n += a.num_tokens
    if n == 0:
        raise ValueError("no tokens were given to the saturation analysis")
    return inter / n


@dataclass
class CheckpointDynamics(ResultMixin):
    """Routing over checkpoints (axis 0, in the given order; the last is the reference "final").

    ``saturation[c, l]`` against the final checkpoint; ``utilization[c, l, e]`` shares;
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


def checkpoint_dynamics(checkpoints: Sequence[tuple[str, int, RoutingData | Iterable[RoutingData]]]) -> CheckpointDynamics:
    """Saturation and drift of routing over ``[(name, step, routing), ...]`` (last = final).

    All checkpoints must be traced on the same tokens. ``routing`` is a RoutingData or a
    re-iterable stream of chunks (a ``RoutingCache``), read chunk by chunk: each checkpoint once
    (statistics and saturation in one pass, zipped with the final), the final once per checkpoint.
    """
    if not checkpoints:
        raise ValueError("checkpoint_dynamics needs at least one (name, step, RoutingData)")
    for item in checkpoints:
        ok = len(item) == 3 and (isinstance(item[2], RoutingData) or (isinstance(item[2], Iterable) and not isinstance(item[2], Iterator)))
        if not ok:
            raise ValueError("each checkpoint must be a (name, step, RoutingData or re-iterable stream of RoutingData) tuple")
    final = checkpoints[-1][2]
    stats: list[RoutingStats] = []
    sats = []
    for _, _, rd in checkpoints:
        acc = RoutingStatsAccumulator()
        sats.append(_saturation_pass(rd, final, acc))
        stats.append(acc.result())
    sat = np.stack(sats)
    util = np.stack([s.utilization for s in stats])
    L = len(stats[-1].moe_layers)
    tok = np.stack([s.token_entropy_norm if s.token_entropy_norm is not None else np.full(L, np.nan) for s in stats])
    return CheckpointDynamics(
        names=[str(n) for n, _, _ in checkpoints],
        steps=[int(s) for _, s, _ in checkpoints],
        moe_layers=list(stats[-1].moe_layers),
        saturation=sat,
        utilization=util,
        utilization_entropy_norm=np.stack([s.utilization_entropy_norm for s in stats]),
        token_entropy_norm=tok,
        cv=np.stack([s.cv for s in stats]),
        utilization_tv=0.5 * np.abs(util - util[-1][None]).sum(-1),
    )


@dataclass
class RouterDrift(ResultMixin):
    """How router weights move across checkpoints (axis 0 in the given order; last = final).

    ``*_prev[c]`` compares checkpoint c with c-1 (row 0 is NaN); ``*_final[c]`` with the last.
    ``cosine`` = mean over experts of the cosine between matched router rows;
    ``rel_change`` = ||W_c - W_ref||_F / ||W_ref||_F.
    """

    names: list[str]
    layers: list[int]
    cosine_prev: np.ndarray  # [C, L]
    rel_change_prev: np.ndarray  # [C, L]
    cosine_final: np.ndarray  # [C, L]
    rel_change_final: np.ndarray  # [C, L]


def _row_cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmean((a * b).sum(1) / (na * nb)))


def router_weight_drift(
    router_weights: Sequence[Mapping[int, torch.Tensor | np.ndarray]], names: Sequence[str] | None = None
) -> RouterDrift:
    """Cosine and relative Frobenius change of each layer's router between checkpoints."""
    if not router_weights:
        raise ValueError("router_weight_drift needs at least one checkpoint's router weights")
    names = [str(i) for i in range(len(router_weights))] if names is None else [str(n) for n in names]
    if len(names) != len(router_weights):
        raise ValueError(f"{len(names)} names for {len(router_weights)} checkpoints")
    layers = sorted(router_weights[-1])
    for c, w in enumerate(router_weights):
        if sorted(w) != layers:
            raise ValueError(f"checkpoint {names[c]} has router layers {sorted(w)}, final has {layers}")
    W = [[to_numpy(w[l]) for l in layers] for w in router_weights]
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
    return RouterDrift(names, layers, out["cp"], out["rp"], out["cf"], out["rf"])
