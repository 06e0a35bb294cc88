"""Core of moe-router-study: the model wrapper, routing cache, analyzers and the toolkit's own MoE.

Functions named like their module (``routing_stats``, ``coactivation``, ``checkpoint_dynamics``)
are imported from that module (``from core.routing_stats import routing_stats``): as attributes of
``core`` they would be shadowed by the submodule. Names are imported lazily so ``import core`` stays cheap (no torch/transformers/nnsight until
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
    # the toolkit's own MoE
    "StudyMoeConfig": "core.moe_model",
    "StudyMoeModel": "core.moe_model",
    "StudyMoeForCausalLM": "core.moe_model",
    "StudyMoeTopKRouter": "core.moe_layer",
    "StudyMoeExperts": "core.moe_layer",
    "StudyMoeSparseBlock": "core.moe_layer",
    "load_balancing_loss": "core.moe_layer",
    "router_z_loss": "core.moe_layer",
    "TrainConfig": "core.moe_training",
    "train": "core.moe_training",
    "ensure_default_model": "core.moe_training",
    "load_checkpoint_list": "core.moe_training",
    "evaluate_model": "core.moe_evaluation",
    "train_bpe_tokenizer": "core.tokenizer_training",
    # collection and cache
    "ActivationCollector": "core.activation_collector",
    "TokenRows": "core.activation_collector",
    "RoutingCache": "core.routing_cache",
    "RoutingCacheWriter": "core.routing_cache",
    "CacheError": "core.routing_cache",
    "CacheMismatchError": "core.routing_cache",
    "CacheCorruptError": "core.routing_cache",
    "CacheIncompleteError": "core.routing_cache",
    "Checkpoint": "core.checkpoints",
    "CheckpointError": "core.checkpoints",
    "parse_checkpoint_name": "core.checkpoints",
    "list_hub_checkpoints": "core.checkpoints",
    "list_local_checkpoints": "core.checkpoints",
    "select_checkpoints": "core.checkpoints",
    "checkpoint_loader": "core.checkpoints",
    "sweep_checkpoints": "core.checkpoints",
    "load_sweep_index": "core.checkpoints",
    "open_sweep": "core.checkpoints",
    # analyses
    "RouterAnalyzer": "core.router_analyzer",
    "RouterSimilarity": "core.router_analyzer",
    "RouterSubspaces": "core.router_analyzer",
    "ExpertAnalyzer": "core.expert_analyzer",
    "ExpertSubspaces": "core.expert_analyzer",
    "AlignmentResult": "core.expert_analyzer",
    "RoutingStats": "core.routing_stats",
    "RoutingStatsAccumulator": "core.routing_stats",
    "CollapseThresholds": "core.routing_stats",
    "cross_layer_correlation": "core.correlations",
    "correlations_by_group": "core.correlations",
    "correlation_difference": "core.correlations",
    "activation_correlations": "core.correlations",
    "CrossLayerCorrelation": "core.correlations",
    "CorrelationDifference": "core.correlations",
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
