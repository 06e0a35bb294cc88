"""Core of moe-router-study: the model wrapper, routing cache, analyzers and the toolkit's own MoE.

Names are imported lazily so ``import core`` stays cheap (no torch/transformers/nnsight until
something that needs them is used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # model access
    "MoEModelWrapper": "core.model_wrapper",
    "ModelLoadError": "core.model_wrapper",
    "MoESpec": "core.moe_discovery",
    "MoELayerInfo": "core.moe_discovery",
    "NoRoutersError": "core.moe_discovery",
    "discover_moe_layers": "core.moe_discovery",
    "expert_matrices": "core.expert_weights",
    "RoutingData": "core.routing_data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
