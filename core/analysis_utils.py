"""Small pieces every analyzer shares: chunked input, input checks, JSON-ready results.

Analyzers accept either one ``RoutingData`` or an iterable of chunks (streaming); results are
dataclasses of numpy arrays that must save as plain JSON, so the conversion lives here once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import torch

from core.routing_data import RoutingData


def as_chunks(routing: RoutingData | Iterable[RoutingData]) -> Iterator[RoutingData]:
    """Yield RoutingData chunks from one RoutingData or an iterable of them."""
    if isinstance(routing, RoutingData):
        yield routing
        return
    if not hasattr(routing, "__iter__"):
        raise TypeError(f"expected RoutingData or an iterable of RoutingData, got {type(routing).__name__}")
    for chunk in routing:
        if not isinstance(chunk, RoutingData):
            raise TypeError(f"expected RoutingData chunks, got {type(chunk).__name__}")
        yield chunk


def require(rd: RoutingData, *names: str, why: str = "this analysis") -> None:
    """Raise a one-line error when a field the analysis needs was not recorded."""
    missing = [n for n in names if getattr(rd, n) is None]
    if missing:
        raise ValueError(f"{why} needs routing with {', '.join(missing)} recorded; this routing has none")


def check_same_layout(rd: RoutingData, layers: list[int], num_experts: int, top_k: int) -> None:
    """Chunks of one stream must describe the same layers and experts."""
    if (list(rd.moe_layers), rd.num_experts, rd.top_k) != (list(layers), num_experts, top_k):
        raise ValueError(
            f"chunk has layers {rd.moe_layers}, E={rd.num_experts}, k={rd.top_k}; "
            f"stream started with layers {layers}, E={num_experts}, k={top_k}"
        )


def selection_np(rd: RoutingData) -> np.ndarray:
    """Selected-expert mask ``[N, L, E]`` as float64 numpy (1 where selected)."""
    require(rd, "topk_idx", why="routing statistics")
    return rd.selection_mask().numpy().astype(np.float64)


def top1_np(rd: RoutingData) -> np.ndarray:
    """Top-1 expert per token and layer ``[N, L]``: the selected expert with the largest weight."""
    require(rd, "topk_idx", why="top-1 routing")
    idx = rd.topk_idx
    if rd.topk_weight is not None:
        pick = rd.topk_weight.float().masked_fill(idx < 0, float("-inf")).argmax(dim=-1, keepdim=True)
        return idx.gather(-1, pick).squeeze(-1).numpy()
    return idx[..., 0].numpy()


def normalized_probs_np(rd: RoutingData) -> np.ndarray:
    """Router probabilities ``[N, L, E]`` renormalised to sum to 1 (sigmoid routers do not)."""
    p = rd.probs().double().numpy()
    return p / np.clip(p.sum(-1, keepdims=True), 1e-300, None)


def to_numpy(x: Any) -> np.ndarray:
    """A weight given as a torch tensor (any device/dtype) or array, as float64 numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=axis)


def to_jsonable(obj: Any) -> Any:
    """Recursively turn arrays, tensors, numpy scalars and dataclasses into JSON-ready values.

    Non-finite floats become ``None`` so the output is strict JSON.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy())
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            return to_jsonable(obj.tolist())
        return obj.tolist()
    if callable(getattr(obj, "to_dict", None)) and (is_dataclass(obj) or hasattr(obj, "columns")):
        return to_jsonable(obj.to_dict())  # result dataclasses and pandas tables
    if is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


class ResultMixin:
    """Gives a result dataclass ``to_dict()`` (all fields, JSON-serializable)."""

    def to_dict(self) -> dict:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]
