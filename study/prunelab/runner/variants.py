"""A study's variants: the dense baseline, then every grid point of every strategy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.model.surgery import parse_layer_indices
from prunelab.prune.recovery import healed_name
from prunelab.records import DENSE
from prunelab.runner.studyfile import EACH_LAYER, Study, check_variant_count, grid_points


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the dense baseline or one grid point of a strategy."""

    name: str
    strategy: str
    params: dict[str, Any]
    recovery: str | None = None  # a healed twin: pruned with ``pruned_by``, then healed by this method

    @property
    def params_json(self) -> str:
        return json.dumps(self.params)

    @property
    def pruned_by(self) -> str:
        return self.strategy.removesuffix(f"+{self.recovery}") if self.recovery else self.strategy


DENSE_VARIANT = Variant(DENSE, DENSE, {})


def expand_variants(study: Study, num_layers: int) -> list[Variant]:
    """The dense baseline, then every grid point of every strategy (``layers = "each"`` -> each layer).

    With ``[recovery]`` each variant of a healed strategy is followed by its healed twin
    (``<variant>+lora``), so every statistic compares it with dense like any other variant.
    """
    variants = [DENSE_VARIANT]
    grids = [{k: [layer for value in values for layer in (range(num_layers) if value == EACH_LAYER else [value])]
              if k in block.each_layer else values for k, values in block.grid.items()} for block in study.strategies]
    healed = [bool(study.recovery and block.name in study.recovery["strategies"]) for block in study.strategies]
    check_variant_count(sum(math.prod(map(len, grid.values())) * (1 + twin) for grid, twin in zip(grids, healed, strict=True)),
                        f"{study.path}", f"its [[strategies]] grids (\"each\" = {num_layers} layers)")
    for block, grid in zip(study.strategies, grids, strict=True):
        for point in grid_points(grid):
            _check_layers(block.name, point, num_layers)
            settings = ",".join(f"{k}={v}" for k, v in point.items())
            variants.append(Variant(f"{block.name}[{settings}]" if settings else block.name, block.name, point))
            if study.recovery and block.name in study.recovery["strategies"]:  # its healed twin right after it
                method = study.recovery["method"]
                variants.append(Variant(healed_name(variants[-1].name, method), healed_name(block.name, method),
                                        point, method))
    seen: set[str] = set()
    for variant in variants:
        if variant.name in seen:
            raise PrunelabError(f"variant {variant.name} appears twice in {study.path}")
        seen.add(variant.name)
    return variants


def _check_layers(strategy: str, point: dict[str, Any], num_layers: int) -> None:
    """Layer indices beyond the model fail before any variant runs, not half-way through the study."""
    if "layers" in point:
        try:
            beyond = [i for i in parse_layer_indices(point["layers"]) if i >= num_layers]
        except PrunelabError:  # not a layer list in this strategy's sense: its own checks apply
            return
        if beyond:
            raise PrunelabError(f"strategy '{strategy}': layers {beyond} out of range, the model has "
                                f"layers 0-{num_layers - 1}")
