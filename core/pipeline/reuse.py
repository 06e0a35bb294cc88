"""When an ``"after"`` analysis's stored result is reused: its identity (what it depends on) and the reuse-or-compute step.

A spec that declares ``reuse_key`` returns the settings it depends on; :func:`reuse_identity`
adds what every forward-pass analysis depends on (the loaded model's identity, with its weights
digest, dtype and device type; a digest of the very token rows it scores, their documents and
domains; resamples and seed). :func:`value_digest` digests an upstream input (arrays bit for
bit). :func:`compute_or_reuse` then takes the stored result of that identity, verified, or
computes it and stores it; ``--recompute NAME`` (or ``all``) skips the lookup.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from core.pipeline.result_codec import encode
from core.pipeline.result_store import ResultStore

TOKEN_FIELDS = ("input_ids", "attention_mask", "doc_ids", "positions", "domain_ids", "dataset_ids")


def value_digest(value: Any) -> str:
    """A digest of any value the result codec stores (arrays by dtype, shape and bytes; dict keys with their types)."""
    arrays: dict[str, np.ndarray] = {}
    doc = encode(value, arrays)
    h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode())
    for key in sorted(arrays):
        a = arrays[key]
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    return h.hexdigest()[:16]


def tokens_digest(tokenized: Any) -> str:
    """A digest of the token rows a forward pass scores: ids, mask, documents, positions, domains and their names."""
    tensors = {name: getattr(tokenized, name).detach().cpu().numpy() for name in TOKEN_FIELDS}
    return value_digest({**tensors, "domain_names": list(tokenized.domain_names),
                         "dataset_names": list(tokenized.dataset_names), "max_length": int(tokenized.max_length),
                         "packed": bool(tokenized.packed)})


def reuse_identity(ctx: Any, max_tokens: int, **settings: Any) -> dict[str, Any]:
    """What a forward-pass analysis on ``ctx.model_tokens(max_tokens)`` depends on, with its own ``settings``."""
    from core.collection.loaded_identity import wrapper_identity

    return {"model": wrapper_identity(ctx.wrapper), "tokens": tokens_digest(ctx.model_tokens(max_tokens)),
            "max_tokens": int(max_tokens), "resamples": ctx.resamples, "seed": ctx.seed, **settings}


def routers_digest(routers: Mapping[int, Any]) -> str:
    """A digest of one checkpoint's router weights (``{layer: tensor}``): each layer's dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    for layer in sorted(routers):
        t = routers[layer].detach().cpu().contiguous()
        h.update(f"{int(layer)}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def weights_identity(ctx: Any, with_model: bool, **settings: Any) -> dict[str, Any]:
    """What a weight analysis of the final routers depends on: them, the score function, seed, the code version, its ``settings``.

    ``with_model``: it also reads the loaded model's weights (the experts), so the model's identity is part of it."""
    from core.pipeline.code_version import code_version

    out = {"routers": routers_digest(ctx.sweep.router_weights[-1]), "score_fn": ctx.score_fn, "seed": ctx.seed,
           "code": code_version(), **settings}
    if with_model:
        from core.collection.loaded_identity import wrapper_identity

        out["model"] = wrapper_identity(ctx.wrapper)
    return out


def recompute_asked(options: Any, name: str) -> bool:
    """Whether ``--recompute`` names this analysis (or ``all``)."""
    asked = set(getattr(options.analysis, "recompute", None) or ())
    return name in asked or "all" in asked


def compute_or_reuse(spec: Any, ctx: Any, results: Mapping[str, Any]) -> tuple[Any, bool]:
    """The spec's result and whether it was reused: the verified stored one of the same identity, else computed (and stored)."""
    if spec.reuse_key is None:
        return spec.compute(ctx, results), False
    identity = {"analysis": spec.name, **spec.reuse_key(ctx, results)}
    store = ResultStore(ctx.options.cache_root)
    if not recompute_asked(ctx.options, spec.name):
        stored = store.load(spec.name, identity)
        if stored is not None:
            return stored, True
    value = spec.compute(ctx, results)
    if value is not None:
        store.save(spec.name, identity, value)
    return value, False
