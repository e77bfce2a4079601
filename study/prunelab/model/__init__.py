"""The model stage: load a checkpoint, find its decoder layers (any architecture), change its structure,
export it, measure its size and speed.

Public names (what plugins and scripts may import from ``prunelab.model``) are listed in ``__all__``;
everything else is internal to the stage.
"""

from prunelab.model.adapter import Adapter, adapt, as_adapter, layer_output
from prunelab.model.export import read_recipe, save_pruned
from prunelab.model.loading import LoadedModel, load_model
from prunelab.model.surgery import check_layer_spec, drop_layers, parse_layer_indices, single_layer
from prunelab.model.windows import consecutive_windows, text_width, window_bos, window_count, windows_at

__all__ = [
    "Adapter", "LoadedModel", "adapt", "as_adapter", "check_layer_spec", "consecutive_windows", "drop_layers",
    "layer_output", "load_model", "parse_layer_indices", "read_recipe", "save_pruned", "single_layer", "text_width", "window_bos", "window_count", "windows_at",
]
