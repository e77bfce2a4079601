"""Strategy ``drop-least-important``: remove the K layers with the lowest importance score.

The score (``bi``, ``angular`` or ``ppl``, see ``prunelab.prune.layer_scores``) is computed once on a few
calibration samples; the K lowest-scoring layers are then removed together, as ShortGPT does with
Block Influence. Unlike ``drop-greedy`` the rest are not re-scored after each removal.
"""

from __future__ import annotations

from typing import Any

from prunelab.model import drop_layers
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import (
    METRICS,
    PruneContext,
    check_removal_count,
    layer_count_axis,
    layer_count_option,
    samples_for_context,
    score_layers,
)


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    check_removal_count(options["k"], context.adapter.num_layers)  # before any calibration work
    samples = samples_for_context(context, context.adapter)
    scores = score_layers(context.adapter, samples, options["metric"])
    chosen = scores.least_important(options["k"])
    return {**drop_layers(context.adapter, chosen), "metric": scores.metric, "scores": scores.scores}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-least-important",
        description="remove the K decoder layers with the lowest importance (bi, angular or ppl) on calibration text",
        prune=prune,
        options=(layer_count_option(),
                 Option("metric", str, "bi", "importance score: bi (ShortGPT Block Influence), angular "
                        "(distance across one layer) or ppl (calibration perplexity without the layer)",
                        choices=METRICS)),
        needs_calibration=True,
        size=(layer_count_axis(),),
    )]
