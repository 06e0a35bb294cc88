"""moe-router-study's core, one room per concern (see docs/CONTRACTS.md):

- ``core.model_access``: open any Hugging Face MoE, find its routers and experts, trace and edit routing;
- ``core.store``: the on-disk routing caches (format, read/write, parts of torchrun ranks, identity), no model;
- ``core.collection``: the collector, checkpoints and checkpoint sweeps, which fill the store;
- ``core.analysis``: every analysis, as accumulators folded over one pass of a cache;
- ``core.study_moe``: the toolkit's own small MoE (layer, model, corpus, training, evaluation).

``core.routing_data.RoutingData`` is the one contract between them; ``core.distributed`` says
which share of the work a torchrun process does. Every public name is importable from ``core``
(``from core import MoEModelWrapper, routing_stats``), lazily, so ``import core`` stays cheap (no
torch/transformers/nnsight until something needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # model access (core.model_access)
    "MoEModelWrapper": "core.model_access.wrapper",
    "ModelLoadError": "core.model_access.loading",
    "MoESpec": "core.model_access.discovery",
    "MoELayerInfo": "core.model_access.discovery",
    "NoRoutersError": "core.model_access.discovery",
    "discover_moe_layers": "core.model_access.discovery",
    "expert_matrices": "core.model_access.expert_weights",
    # the one contract between the rooms
    "RoutingData": "core.routing_data",
    # collection (core.collection) and the caches it fills (core.store)
    "ActivationCollector": "core.collection.collector",
    "TokenRows": "core.collection.collector",
    "RoutingCache": "core.store.cache",
    "RoutingCacheWriter": "core.store.cache",
    "CacheStream": "core.store.cache",
    "CacheError": "core.store.cache_format",
    "CacheMismatchError": "core.store.cache_format",
    "CacheCorruptError": "core.store.cache_format",
    "CacheIncompleteError": "core.store.cache_format",
    "Checkpoint": "core.collection.checkpoints",
    "CheckpointError": "core.collection.checkpoints",
    "parse_checkpoint_name": "core.collection.checkpoints",
    "list_hub_checkpoints": "core.collection.checkpoints",
    "list_local_checkpoints": "core.collection.checkpoints",
    "select_checkpoints": "core.collection.checkpoints",
    "Sweep": "core.collection.sweep",
    "checkpoint_loader": "core.collection.sweep",
    "sweep_checkpoints": "core.collection.sweep",
    "load_sweep_index": "core.collection.sweep",
    "open_sweep": "core.collection.sweep",
    "weights_digest": "core.store.identity",
    # analyses (core.analysis)
    "Accumulator": "core.analysis.streaming",
    "RoutingAccumulator": "core.analysis.streaming",
    "fold": "core.analysis.streaming",
    "fold_one": "core.analysis.streaming",
    "align": "core.analysis.streaming",
    "PerGroup": "core.analysis.streaming",
    "WhenRecorded": "core.analysis.streaming",
    "Pick": "core.analysis.streaming",
    "GroupedResults": "core.analysis.streaming",
    "RouterAnalyzer": "core.analysis.router_weights",
    "RouterSimilarity": "core.analysis.router_weights",
    "RouterSubspaces": "core.analysis.router_weights",
    "ExpertAnalyzer": "core.analysis.expert_alignment",
    "ExpertSubspaces": "core.analysis.expert_alignment",
    "AlignmentResult": "core.analysis.expert_alignment",
    "routing_stats": "core.analysis.routing_stats",
    "RoutingStats": "core.analysis.routing_stats",
    "RoutingStatsAccumulator": "core.analysis.routing_stats",
    "CollapseThresholds": "core.analysis.routing_stats",
    "cross_layer_correlation": "core.analysis.correlations",
    "correlations_by_group": "core.analysis.correlations",
    "correlation_difference": "core.analysis.correlations",
    "activation_correlations": "core.analysis.correlations",
    "CrossLayerCorrelation": "core.analysis.correlations",
    "CorrelationDifference": "core.analysis.correlations",
    "CorrelationAccumulator": "core.analysis.correlations",
    "ActivationCorrelations": "core.analysis.correlations",
    "coactivation": "core.analysis.coactivation",
    "routing_paths": "core.analysis.coactivation",
    "Coactivation": "core.analysis.coactivation",
    "RoutingPaths": "core.analysis.coactivation",
    "CoactivationAccumulator": "core.analysis.coactivation",
    "RoutingPathsAccumulator": "core.analysis.coactivation",
    "domain_specialization": "core.analysis.specialization",
    "DomainSpecialization": "core.analysis.specialization",
    "DomainSpecializationAccumulator": "core.analysis.specialization",
    "vocabulary_specialization": "core.analysis.vocabulary",
    "VocabularySpecialization": "core.analysis.vocabulary",
    "VocabularyAccumulator": "core.analysis.vocabulary",
    "routing_consistency": "core.analysis.consistency",
    "RoutingConsistency": "core.analysis.consistency",
    "ConsistencyAccumulator": "core.analysis.consistency",
    "checkpoint_dynamics": "core.analysis.checkpoint_dynamics",
    "saturation": "core.analysis.checkpoint_dynamics",
    "router_weight_drift": "core.analysis.checkpoint_dynamics",
    "CheckpointDynamics": "core.analysis.checkpoint_dynamics",
    "Saturation": "core.analysis.checkpoint_dynamics",
    "RouterDrift": "core.analysis.checkpoint_dynamics",
    "CheckpointDynamicsAccumulator": "core.analysis.checkpoint_dynamics",
    "CollaborationMiner": "core.analysis.collaboration",
    "CollaborationResult": "core.analysis.collaboration",
    "CollaborationAccumulator": "core.analysis.collaboration",
    "ablation_study": "core.analysis.ablation",
    "AblationResult": "core.analysis.ablation",
    "most_and_least_used_experts": "core.analysis.ablation",
    # the toolkit's own MoE (core.study_moe)
    "StudyMoeConfig": "core.study_moe.model",
    "StudyMoeModel": "core.study_moe.model",
    "StudyMoeForCausalLM": "core.study_moe.model",
    "StudyMoeTopKRouter": "core.study_moe.layer",
    "StudyMoeExperts": "core.study_moe.layer",
    "StudyMoeSparseBlock": "core.study_moe.layer",
    "load_balancing_loss": "core.study_moe.layer",
    "router_z_loss": "core.study_moe.layer",
    "TrainConfig": "core.study_moe.config",
    "train": "core.study_moe.training",
    "ensure_default_model": "core.study_moe.training",
    "evaluate_model": "core.study_moe.evaluation",
    "train_bpe_tokenizer": "core.study_moe.tokenizer",
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
