"""Strategy ``magnitude``: prune the weights with the smallest (or largest) |w|, unstructured or N:M."""

from __future__ import annotations

from typing import Any

from prunelab.errors import PrunelabError
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import (
    ORDERS,
    SCOPES,
    MaskSet,
    PruneContext,
    allocation_options,
    apply_mask,
    layer_sparsities,
    magnitude_scores,
    mask_from_scores,
    nm_mask,
    resolve_sparsity,
    sparsity_report,
    target_fractions,
    targets_from_options,
    weight_pruning_options,
    weights_axis,
)


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Mask the chosen targets by |w|; with an N:M pattern the scope is the group of M weights.

    With ``allocation = "owl"`` each decoder layer gets its own sparsity (OWL: layers with more
    activation outliers keep more weights), which needs calibration text; the threshold is then
    per layer or per row, never global (a global threshold would override the allocation).
    """
    targets = targets_from_options(context.adapter, options)
    fraction, nm = resolve_sparsity(options)
    order, scope = options["order"], options["scope"]
    owl = options.get("allocation") == "owl"
    if owl and scope == "global":
        raise PrunelabError("magnitude: allocation 'owl' sets each layer's sparsity; use scope 'layer' or 'row'")
    per_layer, allocation = layer_sparsities(context.adapter, options, fraction, nm, context=context)
    fractions = target_fractions(targets, per_layer, fraction)
    if nm is not None:
        masks = {name: nm_mask(magnitude_scores(p), *nm, order=order) for name, p in targets.items()}
    elif scope == "global":
        masks = mask_from_scores({name: magnitude_scores(p) for name, p in targets.items()}, fraction, scope, order)
    else:  # one tensor at a time: no copy of every weight at once
        masks = {name: mask_from_scores(magnitude_scores(p), fractions[name], scope, order)
                 for name, p in targets.items()}
    for name, keep in masks.items():
        apply_mask(targets[name], keep)
    context.masks = MaskSet(masks)
    return {"sparsity": sparsity_report(targets), **allocation}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="magnitude",
        description="prune the smallest |w| (or the largest, as the original study also tried)",
        prune=prune,
        options=(
            *weight_pruning_options(),
            Option("order", str, "smallest", "prune the smallest or the largest |w|", choices=ORDERS),
            Option("scope", str, "layer",
                   "rank globally, per layer (each Linear weight) or per output row; ignored for N:M",
                   choices=SCOPES),
            *allocation_options(),
        ),
        needs_calibration=lambda options: options.get("allocation") == "owl",  # OWL ranks outliers on calibration text
        size=(weights_axis(),),
    )]
