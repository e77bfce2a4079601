"""Strategy ``drop-layers``: depth pruning, removing whole decoder layers by index."""

from __future__ import annotations

from typing import Any

from prunelab.model import check_layer_spec, drop_layers, parse_layer_indices
from prunelab.plugin import Option, SizeAxis, Strategy, hookimpl
from prunelab.prune import PruneContext


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Remove the layers (re-indexing the KV cache slots and the config) and report what went."""
    return drop_layers(context.adapter, options["layers"])


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-layers",
        description="remove whole decoder layers (depth pruning); the rest are re-indexed",
        prune=prune,
        options=(Option("layers", str, None, "layer indices to remove, e.g. 3,7,12 or 0-3 (inclusive)",
                        check=check_layer_spec, required=True),),
        removes_layers=lambda options: parse_layer_indices(options["layers"]),
        each_layer=("layers",),  # a study's layers = "each": one variant per decoder layer
        size=(SizeAxis("layers", option="layers", label="layers removed"),),
    )]
