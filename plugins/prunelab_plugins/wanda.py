"""Strategy ``wanda``: prune by |W| x ||X||, per output row, with no weight update (Sun et al., 2023).

The score of weight W_ij is |W_ij| times the L2 norm of input feature j over all calibration tokens,
compared within each output row i (unstructured) or within each group of M consecutive inputs (N:M).
The calibration pass, the layer-by-layer propagation and OWL come from ``prunelab.prune.calibration``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.plugin import Strategy, hookimpl
from prunelab.prune import (
    InputNorms,
    PruneContext,
    allocation_options,
    calibrated_prune,
    mask_from_scores,
    nm_mask,
    pattern_option,
    sparsity_option,
    wanda_scores,
    weights_axis,
)


def wanda_keep_mask(weight: torch.Tensor, norms: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of one weight: the lowest |W| x ||X|| of every row (or of every N:M group) go."""
    scores = wanda_scores(weight, norms)
    if nm is not None:
        return nm_mask(scores, *nm)
    return mask_from_scores(scores, sparsity, scope="row")


def _prune_linear(module: nn.Linear, stat: InputNorms, sparsity: float, nm) -> torch.Tensor:
    return wanda_keep_mask(module.weight, stat.norms, sparsity, nm)


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    return calibrated_prune(model, options, context, InputNorms, _prune_linear)


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="wanda",
        description="Wanda: prune the lowest |W| x ||X|| per output row from calibration activations",
        prune=prune,
        options=(sparsity_option(), pattern_option(), *allocation_options()),
        needs_calibration=True,
        size=(weights_axis(),),
    )]
