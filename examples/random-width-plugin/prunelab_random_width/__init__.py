"""Strategy ``random-width``: remove a seeded random choice of MLP channels, heads and hidden channels.

The baseline any width importance should beat. Everything structural -- the checks against the
model, the options, the GQA modes, the surgery, the config, the record in ``prunelab.json`` -- is prunelab's
(``width_targets``, ``prune_width``); the plugin only scores channels, here at random.
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.model import WidthScores, prune_width, width_axes, width_options, width_targets_from_options
from prunelab.plugin import Strategy, hookimpl


def prune(model, options: dict[str, Any], context) -> dict[str, Any]:
    targets = width_targets_from_options(context.adapter, options)
    sizes, generator = targets.sizes, context.generator()  # seeded: the recipe's seed reproduces the choice
    scores = WidthScores(
        mlp=[torch.rand(sizes.intermediate, generator=generator) for _ in range(sizes.layers)],
        heads=[torch.rand(sizes.heads, generator=generator) for _ in range(sizes.layers)],
        hidden=torch.rand(sizes.hidden, generator=generator),
    )
    return prune_width(context.adapter, targets, scores)


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="random-width",
        description="remove a seeded random choice of MLP channels, heads and hidden channels (a width baseline)",
        prune=prune,
        options=width_options(),  # mlp, heads, hidden, heads_mode, round_to: the same as the built-in width's
        check_model=width_targets_from_options,  # checked against the model before any variant is pruned
        size=width_axes(),  # a width chart per axis, at the achieved fraction; the size comparison by parameters
    )]
