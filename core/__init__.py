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
    # analyses
    "RouterAnalyzer": "core.router_analyzer",
    "RouterSimilarity": "core.router_analyzer",
    "RouterSubspaces": "core.router_analyzer",
    "ExpertAnalyzer": "core.expert_analyzer",
    "ExpertSubspaces": "core.expert_analyzer",
    "AlignmentResult": "core.expert_analyzer",
    "routing_stats": "core.routing_stats",
    "RoutingStats": "core.routing_stats",
    "RoutingStatsAccumulator": "core.routing_stats",
    "CollapseThresholds": "core.routing_stats",
    "cross_layer_correlation": "core.correlations",
    "correlations_by_group": "core.correlations",
    "correlation_difference": "core.correlations",
    "activation_correlations": "core.correlations",
    "CrossLayerCorrelation": "core.correlations",
    "CorrelationDifference": "core.correlations",
    "coactivation": "core.coactivation",
    "routing_paths": "core.coactivation",
    "Coactivation": "core.coactivation",
    "RoutingPaths": "core.coactivation",
    "domain_specialization": "core.specialization",
    "vocabulary_specialization": "core.specialization",
    "routing_consistency": "core.specialization",
    "DomainSpecialization": "core.specialization",
    "VocabularySpecialization": "core.specialization",
    "RoutingConsistency": "core.specialization",
    "saturation": "core.checkpoint_dynamics",
    "checkpoint_dynamics": "core.checkpoint_dynamics",
    "router_weight_drift": "core.checkpoint_dynamics",
    "CheckpointDynamics": "core.checkpoint_dynamics",
    "RouterDrift": "core.checkpoint_dynamics",
    "CollaborationMiner": "core.collaboration",
    "CollaborationResult": "core.collaboration",
    "ablation_study": "core.ablation",
    "AblationResult": "core.ablation",
    "most_used_targets": "core.ablation",
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
