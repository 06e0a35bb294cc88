"""One import point for every figure in the toolkit (the seed's ``viz/plotting.py``).

The figures live in theme modules; this module only gathers them so analyses and
experiments can write ``from viz.plotting import utilization_heatmap``.
"""

from viz._common import FigureInputError
from viz.figures_routing import (
    coactivation_heatmap,
    correlation_matrix,
    entropy_per_layer,
    router_similarity_heatmap,
    routing_paths_sankey,
    utilization_heatmap,
)
from viz.figures_specialization import (
    ablation_effects,
    collaboration_by_domain,
    collaboration_patterns,
    domain_specialization_heatmap,
    vocabulary_specialization,
)
from viz.figures_training import (
    affinity_heatmap,
    checkpoint_heatmap,
    drift_over_checkpoints,
    layer_metric_over_time,
    saturation_over_checkpoints,
    training_curves,
    utilization_over_time,
)
from viz.figures_lift import lift_by_layer
from viz.figures_nulls import estimate_vs_null, pruning_curves
from viz.figures_paper import domain_shares_per_expert, vocabulary_per_expert
from viz.figures_pickers import coactivation_by_layer, correlation_by_layer_pair, domain_specialization_by_layer
from viz.figures_weights import alignment_vs_baseline, hungarian_cosine_vs_null, svd_spectra

__all__ = [
    "FigureInputError",
    "ablation_effects",
    "affinity_heatmap",
    "alignment_vs_baseline",
    "checkpoint_heatmap",
    "coactivation_by_layer",
    "coactivation_heatmap",
    "collaboration_by_domain",
    "collaboration_patterns",
    "correlation_by_layer_pair",
    "correlation_matrix",
    "domain_shares_per_expert",
    "domain_specialization_by_layer",
    "domain_specialization_heatmap",
    "drift_over_checkpoints",
    "entropy_per_layer",
    "estimate_vs_null",
    "hungarian_cosine_vs_null",
    "layer_metric_over_time",
    "lift_by_layer",
    "pruning_curves",
    "router_similarity_heatmap",
    "routing_paths_sankey",
    "saturation_over_checkpoints",
    "svd_spectra",
    "training_curves",
    "utilization_heatmap",
    "utilization_over_time",
    "vocabulary_per_expert",
    "vocabulary_specialization",
]
