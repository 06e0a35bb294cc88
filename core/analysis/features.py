"""Per-chunk views every analysis builds on: selection masks, top-1 experts, renormalised probabilities."""

from __future__ import annotations

import numpy as np
import torch

from core.analysis.streaming import require
from core.routing_data import RoutingData

def selection_np(rd: RoutingData) -> np.ndarray:
    """Selected-expert mask ``[N, L, E]`` as float64 numpy (1 where selected)."""
    require(rd, "topk_idx", why="routing statistics")
    return rd.selection_mask().numpy().astype(np.float64)


def top1_np(rd: RoutingData) -> np.ndarray:
    """Top-1 expert per token and layer ``[N, L]``: the selected expert with the largest weight.

    Slots that were not selected (-1, or capacity drops) never count; a token with none gets -1.
    """
    require(rd, "topk_idx", why="top-1 routing")
    idx, ok = rd.topk_idx, rd.selected_slots()
    w = rd.topk_weight.float() if rd.topk_weight is not None else -torch.arange(idx.shape[-1]).float().expand(idx.shape)
    pick = w.masked_fill(~ok, float("-inf")).argmax(dim=-1, keepdim=True)
    top = idx.gather(-1, pick).squeeze(-1)
    return torch.where(ok.any(-1), top, -1).numpy()


def normalized_probs_np(rd: RoutingData) -> np.ndarray:
    """Router probabilities ``[N, L, E]`` renormalised to sum to 1 (sigmoid routers do not)."""
    p = rd.probs().double().numpy()
    return p / np.clip(p.sum(-1, keepdims=True), 1e-300, None)
