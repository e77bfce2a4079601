"""Strategy ``drop-range``: remove ``count`` consecutive decoder layers starting at ``start``.

An example of a third-party depth strategy: it only uses prunelab's plugin API, and by declaring
which layers a variant removes (``removes_layers``) and that ``start = "each"`` means every layer
(``each_layer``) it gets what the built-in ``drop-layers`` gets -- a shared layer sweep for its
single-layer variants in a study, and a place on the layer chart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.model import drop_layers
from prunelab.plugin import Option, SizeAxis, Strategy, hookimpl
from prunelab.prune import PruneContext


def removed(options: Mapping[str, Any]) -> list[int]:
    """The layers a variant removes, from its options alone: ``start .. start + count - 1``."""
    start, count = int(options["start"]), int(options.get("count", 1))
    return list(range(start, start + count))


def prune(model: torch.nn.Module, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Remove the range; ``drop_layers`` keeps the KV-cache indices and the config consistent."""
    layers = removed(options)
    if layers[-1] >= context.adapter.num_layers:
        raise PrunelabError(f"drop-range: layers {layers} go past the model's {context.adapter.num_layers} layers")
    return drop_layers(context.adapter, layers)


def _non_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def _positive(value: int) -> str | None:
    return None if value >= 1 else f"must be >= 1, got {value}"


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="drop-range",
        description="remove count consecutive decoder layers from start (example third-party depth strategy)",
        prune=prune,
        options=(Option("start", int, None, "first layer to remove", check=_non_negative, required=True),
                 Option("count", int, 1, "how many consecutive layers", check=_positive)),
        removes_layers=removed,
        each_layer=("start",),
        size=(SizeAxis("layers", option="count", label="layers removed"),),  # counted on the model, not read from count
    )]
