"""The identity of a model already loaded: an in-memory model's weights digest, and a wrapper's identity.

What an identity holds and how two are compared is the store's (``core.store.identity``); this
is the part that reads a model: the digest of an ``nn.Module``'s state dict, and the identity of
whatever a wrapper was opened from (a folder, a Hub name or an in-memory model), for the
collector's cache header.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from core.store.identity import in_memory_identity, model_identity


def state_dict_digest(module: nn.Module, per_tensor_limit: int = 64 << 20) -> str:
    """A digest of an in-memory model's parameters and buffers (each tensor's bytes; head and tail past 64 MB)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        raw = t.view(torch.uint8).reshape(-1) if t.numel() else torch.zeros(0, dtype=torch.uint8)
        if raw.numel() > per_tensor_limit:
            raw = torch.cat([raw[: per_tensor_limit // 2], raw[-per_tensor_limit // 2 :]])
        h.update(raw.numpy().tobytes())
    return h.hexdigest()[:16]


def module_identity(module: nn.Module, dtype: Any = None, device: str = "cpu") -> dict[str, Any]:
    """The identity of an in-memory model as it will run: its class, weights digest and config digest."""
    cfg = getattr(module, "config", None)
    return in_memory_identity(type(module).__name__, state_dict_digest(module),
                              cfg.to_dict() if hasattr(cfg, "to_dict") else None, dtype, device)


def _weights_version(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or edited in place (torch counts in-place writes)."""
    return tuple((id(t), t._version) for t in [*module.parameters(), *module.buffers()])


def wrapper_identity(wrapper: Any) -> dict[str, Any]:
    """The identity of a loaded wrapper's model and of the routers it traces.

    A wrapper tracing another kind of router than the feed-forward one (JetMoE's attention routers)
    records it, so its caches are never taken for the feed-forward routing of the same model.
    Layers whose weights the toolkit computes as the block does, renormalized over the chosen experts
    (JetMoE, Doge: their experts are not handed the weights), record that rule: caches written
    before it (full-softmax weights) are then collected again, not reused.
    """
    out = _model_identity(wrapper)
    kind = getattr(wrapper, "router_kind", "feed_forward")
    if kind != "feed_forward":
        out = {**out, "router_kind": kind}
    layers = getattr(wrapper, "layers", None) or []
    if any(getattr(i, "experts_index_arg", 0) is None and getattr(i, "renormalize", False) for i in layers):
        out = {**out, "weight_rule": "renormalized over the chosen experts"}
    return out


def _model_identity(wrapper: Any) -> dict[str, Any]:
    """The identity of a loaded wrapper's model (a wrapper that does not say where it came from: its name).

    The wrapper is read by its attributes (``source``, ``revision``, ``dtype_option``, ``device``,
    ``model_name``). An in-memory model's digest reads its weights (seconds at OLMoE's size), so
    it is kept on the wrapper until a weight changes.
    """
    source = getattr(wrapper, "source", None)
    if source is None:
        return {"kind": "named", "name": str(getattr(wrapper, "model_name", type(wrapper).__name__)),
                "revision": getattr(wrapper, "revision", None)}
    revision, dtype, device = (getattr(wrapper, "revision", None), getattr(wrapper, "dtype_option", None),
                               getattr(wrapper, "device", "cpu"))
    if not isinstance(source, nn.Module):
        return model_identity(source, revision, dtype, device)
    key = ((revision, dtype, device), _weights_version(source))
    cached = getattr(wrapper, "_identity_memo", None)
    if cached is not None and cached[0] == key:
        return dict(cached[1])
    out = module_identity(source, dtype, device)
    try:
        wrapper._identity_memo = (key, dict(out))
    except AttributeError:  # a wrapper that takes no attributes: no memo
        pass
    return out
