"""Strategy ``drop-greedy``: remove K layers one at a time, each the least harmful to calibration perplexity.

After every removal the remaining layers are scored again on the smaller model, so interactions
between removed layers are taken into account (unlike ``drop-least-important``). Cost: about
K x N forward passes over the calibration samples.
"""

from __future__ import annotations

from typing import Any

from prunelab.hookspecs import Strategy, hookimpl
from prunelab.importance import check_removal_count, layer_count_option, plan_greedy, samples_for_context
from prunelab.pruning import PruneContext


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    check_removal_count(options["k"], context.adapter.num_layers)  # before any calibration work
    samples = samples_for_context(context, context.adapter)
    return plan_greedy(context.adapter, samples, options["k"])


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-greedy",
        description="remove K layers greedily: each step drops the layer whose removal raises calibration perplexity least",
        prune=prune,
        options=(layer_count_option(),),
        needs_calibration=True,
    )]
