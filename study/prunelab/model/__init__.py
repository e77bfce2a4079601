"""The model stage: load a checkpoint, find its decoder layers (any architecture), change its structure (depth and width),
export it, measure its size and speed.

Public names (what plugins and scripts may import from ``prunelab.model``) are listed in ``__all__``;
everything else is internal to the stage.
"""

from prunelab.model.adapter import Adapter, adapt, as_adapter, layer_output
from prunelab.model.export import read_recipe, save_pruned
from prunelab.model.loading import LoadedModel, load_model
from prunelab.model.surgery import check_layer_spec, drop_layers, parse_layer_indices, single_layer
from prunelab.model.width import (
    AXES,
    HEAD_MODES,
    LayerParts,
    WidthPlan,
    WidthScores,
    WidthSizes,
    WidthTargets,
    apply_width,
    keep_columns,
    keep_heads,
    keep_hidden_channels,
    keep_mlp_channels,
    keep_rows,
    kept_count,
    layer_parts,
    plan_width,
    prune_width,
    stream_norms,
    top_indices,
    width_axes,
    width_options,
    width_sizes,
    width_targets,
    width_targets_from_options,
)
from prunelab.model.windows import consecutive_windows, text_width, window_bos, window_count, windows_at

__all__ = [
    "AXES", "HEAD_MODES", "LayerParts", "WidthPlan", "WidthScores", "WidthSizes", "WidthTargets", "apply_width",
    "keep_columns", "keep_heads", "keep_hidden_channels", "keep_mlp_channels", "keep_rows", "kept_count", "layer_parts",
    "plan_width", "prune_width", "stream_norms", "top_indices", "width_axes", "width_options", "width_sizes", "width_targets",
    "width_targets_from_options",
    "Adapter", "LoadedModel", "adapt", "as_adapter", "check_layer_spec", "consecutive_windows", "drop_layers",
    "layer_output", "load_model", "parse_layer_indices", "read_recipe", "save_pruned", "single_layer", "text_width", "window_bos", "window_count", "windows_at",
]
