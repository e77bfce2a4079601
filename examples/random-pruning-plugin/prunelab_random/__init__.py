"""Strategy ``random``: prune a seeded random subset of the default targets.

A baseline every pruning score should beat, and an example of a third-party plugin: it only
uses prunelab's public pieces (shared options, target selection, exact masks, sparsity report).
"""

from __future__ import annotations

from typing import Any

import torch

from prunelab.plugin import Strategy, hookimpl
from prunelab.prune import (
    MaskSet,
    PruneContext,
    apply_mask,
    mask_from_scores,
    nm_mask,
    resolve_sparsity,
    sparsity_report,
    targets_from_options,
    weight_pruning_options,
    weights_axis,
)


def prune(model: torch.nn.Module, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Score every target weight with a seeded uniform random number and prune the lowest."""
    targets = targets_from_options(context.adapter, options)
    fraction, nm = resolve_sparsity(options)
    generator = context.generator()  # seeded from the recipe: the same seed prunes the same weights
    masks = {}
    for name, param in targets.items():
        scores = torch.rand(param.shape, generator=generator).to(param.device)
        masks[name] = nm_mask(scores, *nm) if nm else mask_from_scores(scores, fraction, "layer")
        apply_mask(param, masks[name])
    context.masks = MaskSet(masks)
    return {"sparsity": sparsity_report(targets)}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="random",
        description="seeded random pruning of the decoder Linear weights (a baseline)",
        prune=prune,
        options=weight_pruning_options(),
        size=(weights_axis(),),  # the sparsity chart and the size comparison place it by its sparsity
    )]
