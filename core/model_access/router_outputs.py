"""What a router's forward returned, read as routing: its scores, one row of expert logits per token, the selection.

Families differ in what a router hands back (a tensor, or a tuple of logits, weights and
indices; product-key score pairs) and in how the block turns scores into weights. Both engines
(PyTorch hooks and nnsight) and the training monitor read router outputs through these.
"""

from __future__ import annotations

from typing import Any

import torch

from core.model_access.discovery import MoELayerInfo, NoRoutersError

__all__ = ["expert_logits", "router_scores", "scores_and_indices", "topk_weights"]


def scores_and_indices(out: Any, info: MoELayerInfo) -> bool:
    """The router returned ``(logits, top-k weights, top-k indices, ...)``: integer indices, k per token."""
    if not (isinstance(out, (tuple, list)) and len(out) >= 3):
        return False
    w, idx = out[1], out[2]
    return (
        isinstance(w, torch.Tensor) and isinstance(idx, torch.Tensor) and not idx.is_floating_point()
        and idx.dim() >= 1 and idx.shape[-1] == info.top_k
    )


def router_scores(out: Any, info: MoELayerInfo) -> Any:
    """The scores tensor in what a router returned (some return a tuple)."""
    return out[info.router_output_index] if isinstance(out, (tuple, list)) else out


def expert_logits(lg: torch.Tensor, info: MoELayerInfo) -> torch.Tensor:
    """One row of ``[N, E]`` logits per token (in the router's precision, on its device), from what the router returned.

    Product-key routers (Doge) return two ``[2, N, sqrt(E)]`` score sets; expert ``i * sqrt(E) + j``
    scores ``x_i + y_j``, as the family ranks them.
    """
    n_exp = info.num_experts
    keys = round(n_exp**0.5)
    if lg.dim() == 3 and lg.shape[0] == 2 and keys * keys == n_exp and lg.shape[-1] == keys:
        lg = (lg[0][:, :, None] + lg[1][:, None, :]).reshape(-1, n_exp)
    if lg.shape[-1] != n_exp:
        raise NoRoutersError(
            f"router {info.router_path} returned {lg.shape[-1]} scores per token, but {n_exp} experts were expected; "
            "pass a MoESpec with num_experts"
        )
    return lg.reshape(-1, n_exp)


def topk_weights(logits: torch.Tensor, info: MoELayerInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts and their weights as the block computes them from ``[N, E]`` scores, where it does not hand them over.

    A block that renormalizes takes, for softmax routers, the softmax of the k chosen logits
    (JetMoE, Doge: computed as they compute it, so equal to the last bit), for sigmoid ones the
    chosen scores over their sum; otherwise the weights are the full distribution's scores.
    """
    logits = logits.float()
    if info.score_fn == "softmax" and info.renormalize:
        top, idx = logits.topk(info.top_k, dim=-1)
        return idx, torch.softmax(top, dim=-1)
    probs = torch.sigmoid(logits) if info.score_fn == "sigmoid" else torch.softmax(logits, dim=-1)
    w, idx = probs.topk(info.top_k, dim=-1)
    return idx, (w / w.sum(dim=-1, keepdim=True) if info.renormalize else w)
