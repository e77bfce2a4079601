"""Strategy ``drop-block``: remove the contiguous block of K layers with the smallest angular distance.

Gromov et al. (2024): the block l..l+K-1 whose input x^l and output x^(l+K) point in the most
similar direction on calibration text changes the residual stream least, so it is the one to drop.
"""

from __future__ import annotations

from typing import Any

from prunelab.model import drop_layers
from prunelab.plugin import Strategy, hookimpl
from prunelab.prune import (
    PruneContext,
    best_block,
    check_removal_count,
    layer_count_axis,
    layer_count_option,
    representation_stats,
    samples_for_context,
)


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    check_removal_count(options["k"], context.adapter.num_layers)  # before any calibration work
    samples = samples_for_context(context, context.adapter)
    stats = representation_stats(context.adapter, samples)
    start, distance = best_block(stats, options["k"])
    report = drop_layers(context.adapter, range(start, start + options["k"]))
    return {**report, "angular_distance": distance}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-block",
        description="remove the contiguous block of K layers with the smallest angular distance (Gromov et al.)",
        prune=prune,
        options=(layer_count_option(),),
        needs_calibration=True,
        size=(layer_count_axis(),),
    )]
