"""Strategy ``random-width``: remove a seeded random choice of MLP channels, heads and hidden channels.

The baseline any width importance should beat. Everything structural -- the checks against the
model, the GQA modes, the surgery, the config, the record in ``prunelab.json`` -- is prunelab's
(``width_targets``, ``prune_width``); the plugin only scores channels, here at random.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.model import AXES, HEAD_MODES, WidthScores, prune_width, width_targets
from prunelab.plugin import Option, Strategy, hookimpl


def prune(model, options: dict[str, Any], context) -> dict[str, Any]:
    targets = width_targets(context.adapter, **{axis: options[axis] for axis in AXES}, heads_mode=options["heads_mode"])
    sizes, generator = targets.sizes, context.generator()  # seeded: the recipe's seed reproduces the choice
    scores = WidthScores(
        mlp=[torch.rand(sizes.intermediate, generator=generator) for _ in range(sizes.layers)],
        heads=[torch.rand(sizes.heads, generator=generator) for _ in range(sizes.layers)],
        hidden=torch.rand(sizes.hidden, generator=generator),
    )
    return prune_width(context.adapter, targets, scores)


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "a fraction to remove must be in [0, 1)"


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="random-width",
        description="remove a seeded random choice of MLP channels, heads and hidden channels (a width baseline)",
        prune=prune,
        options=(
            *(Option(axis, float, 0.0, f"fraction of the {axis} axis to remove", check=_fraction) for axis in AXES),
            Option("heads_mode", str, "query", "GQA: query heads within each group, or whole KV groups",
                   choices=HEAD_MODES),
        ),
    )]
