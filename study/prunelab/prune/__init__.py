"""The prune stage: the ``prune()`` API, the mask library and its targets, calibration text, the
layer-wise driver, OWL allocation, layer scores and removal plans, and healing.

Public names (what plugins and scripts may import from ``prunelab.prune``) are listed in ``__all__``.
"""

from prunelab.prune.api import PruneContext, PruneReport, prune
from prunelab.prune.calibrated import calibrated_prune
from prunelab.prune.calibration import CalibrationSpec, calibration_samples
from prunelab.prune.layer_scores import (
    METRICS,
    best_block,
    check_removal_count,
    layer_count_axis,
    layer_count_option,
    plan_greedy,
    plan_greedy_by_task,
    representation_stats,
    samples_for_context,
    score_layers,
)
from prunelab.prune.layerwise import InputNorms, LayerStep, Statistic, run_layerwise
from prunelab.prune.masks import (
    ORDERS,
    SCOPES,
    MaskSet,
    apply_mask,
    count_to_prune,
    magnitude_scores,
    mask_from_scores,
    nm_mask,
    pattern_option,
    resolve_sparsity,
    sparsity_option,
    sparsity_report,
    targets_from_options,
    weight_pruning_options,
    weights_axis,
)
from prunelab.prune.owl import allocation_options, layer_sparsities, target_fractions, wanda_scores
from prunelab.prune.recovery import RecoveryContext

__all__ = [
    "METRICS", "ORDERS", "SCOPES", "CalibrationSpec", "InputNorms", "LayerStep", "MaskSet", "PruneContext",
    "PruneReport", "RecoveryContext", "Statistic", "allocation_options", "apply_mask", "best_block",
    "calibrated_prune", "calibration_samples", "check_removal_count", "count_to_prune", "layer_count_axis", "layer_count_option",
    "layer_sparsities", "magnitude_scores", "mask_from_scores", "nm_mask", "pattern_option", "plan_greedy",
    "plan_greedy_by_task", "prune", "representation_stats", "resolve_sparsity", "run_layerwise",
    "samples_for_context", "score_layers", "sparsity_option", "sparsity_report", "target_fractions",
    "targets_from_options", "wanda_scores", "weight_pruning_options", "weights_axis",
]
