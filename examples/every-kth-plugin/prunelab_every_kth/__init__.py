"""Strategy ``every-kth``: remove every k-th decoder layer (layers k-1, 2k-1, ...).

An example of a depth strategy whose layers depend on the model: ``k = 5`` removes 6 of a 30-layer
model's layers, 4 of a 24-layer one's. It declares them with the two-argument form of
``removes_layers`` -- ``removed(options, num_layers)`` is handed the model's decoder layer count --
so a variant that removes one layer shares a study's layer sweep and is drawn on the layer chart,
as the built-in ``drop-layers`` is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.model import drop_layers
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import PruneContext


def removed(options: Mapping[str, Any], num_layers: int) -> list[int]:
    """The layers a variant removes from a model of ``num_layers`` decoder layers: every k-th one."""
    k = int(options["k"])
    return [i for i in range(num_layers) if (i + 1) % k == 0]


def prune(model: torch.nn.Module, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Remove the layers ``removed`` names; ``drop_layers`` keeps the KV-cache indices and the config consistent."""
    layers = removed(options, context.adapter.num_layers)
    if not layers:
        raise PrunelabError(f"every-kth: k={options['k']} removes nothing from {context.adapter.num_layers} layers")
    return drop_layers(context.adapter, layers)


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="every-kth",
        description="remove every k-th decoder layer (example third-party depth strategy; layers depend on the model)",
        prune=prune,
        options=(Option("k", int, None, "remove layers k-1, 2k-1, ... (1-based: every k-th)", required=True,
                        check=lambda v: None if v >= 2 else f"must be >= 2, got {v}"),),
        removes_layers=removed,
    )]
