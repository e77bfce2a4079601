"""Strategy ``drop-greedy``: remove K layers one at a time, each the least harmful one.

After every removal the remaining layers are scored again on the smaller model, so interactions
between removed layers are taken into account (unlike ``drop-least-important``). "Least harmful" is
measured on calibration text (perplexity, the default) or on a small evaluation subset
(``guide = "mmlu"`` or ``"wikitext"``: the task's loss on ``guide_limit`` items per subject / windows,
drawn with the seed; each step scores every candidate through one layer sweep). Cost: about K x N
forward passes over the guide data.

A guide subset drawn from a test split can overlap the items a study later evaluates on: the
report lists the guide's item ids so the overlap can be checked, and a small guide keeps it small.
"""

from __future__ import annotations

from typing import Any

from prunelab.evaluate import DataSource, Subset
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import (
    PruneContext,
    check_removal_count,
    layer_count_axis,
    layer_count_option,
    plan_greedy,
    plan_greedy_by_task,
    samples_for_context,
)

GUIDES = ("calibration", "mmlu", "wikitext")


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    check_removal_count(options["k"], context.adapter.num_layers)  # before any calibration work
    if options["guide"] == "calibration":
        samples = samples_for_context(context, context.adapter)
        return plan_greedy(context.adapter, samples, options["k"])
    return plan_greedy_by_task(context.adapter, context.tokenizer, guide_task(options, context.seed), options["k"])


def guide_task(options: dict[str, Any], seed: int):
    """The guide's items: ``guide_limit`` per MMLU subject (or WikiText windows), a seeded sample."""
    from prunelab.evaluate import prepare_tasks

    subset = Subset(limit=options["guide_limit"], sample="random", seed=seed)
    (task,) = prepare_tasks([options["guide"]], DataSource.resolve(options["data_dir"]), subset,
                            {"seqlen": options["guide_seqlen"]})
    return task


def _uses_calibration(options) -> bool:
    return options.get("guide", "calibration") == "calibration"


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-greedy",
        description="remove K layers greedily: each step drops the layer whose removal hurts calibration "
                    "perplexity (or a small evaluation subset's loss) least",
        prune=prune,
        options=(
            layer_count_option(),
            Option("guide", str, "calibration", "what measures harm: calibration perplexity, or the loss "
                   "on a small mmlu / wikitext subset", choices=GUIDES),
            Option("guide_limit", int, 2, "guide items: questions per MMLU subject, or WikiText windows",
                   check=lambda v: None if v >= 1 else "must be at least 1"),
            Option("guide_seqlen", int, 512, "WikiText guide window length in tokens",
                   check=lambda v: None if v >= 2 else "must be at least 2"),
            Option("data_dir", str, None, "local data folder for the guide task (default $PRUNELAB_DATA, else the Hub)"),
        ),
        needs_calibration=_uses_calibration,
        size=(layer_count_axis(),),
    )]
