"""A study's variants: the dense baseline, then every grid point of every strategy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.prune.recovery import healed_name
from prunelab.records import DENSE
from prunelab.registry import default_registry
from prunelab.runner.studyfile import EACH_LAYER, Study, check_variant_count, grid_points


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the dense baseline or one grid point of a strategy."""

    name: str
    strategy: str
    params: dict[str, Any]
    recovery: str | None = None  # a healed twin: pruned with ``pruned_by``, then healed by this method
    #: The decoder layers it removes, as its strategy declares them for the study's model
    #: (``Strategy.removes_layers``, handed the layer count); None where nothing is declared.
    layers: tuple[int, ...] | None = None

    @property
    def params_json(self) -> str:
        return json.dumps(self.params)

    @property
    def pruned_by(self) -> str:
        return self.strategy.removesuffix(f"+{self.recovery}") if self.recovery else self.strategy

    @property
    def unhealed(self) -> str:
        """The variant a healed twin was healed from (its own name for any other variant)."""
        return self.name.removesuffix(f"+{self.recovery}") if self.recovery else self.name


DENSE_VARIANT = Variant(DENSE, DENSE, {})


def expand_variants(study: Study, num_layers: int) -> list[Variant]:
    """The dense baseline, then every grid point of every strategy (``layers = "each"`` -> each layer).

    With ``[recovery]`` each variant of a healed strategy is followed by its healed twin
    (``<variant>+lora``), so every statistic compares it with dense like any other variant; and,
    unless ``control = false``, the dense model healed the same way (``dense+lora``) follows dense:
    what healing does to a model nothing was removed from is adaptation, not recovery.
    """
    variants = [DENSE_VARIANT]
    if study.recovery and study.recovery.get("control", True):
        method = study.recovery["method"]
        variants.append(Variant(healed_name(DENSE, method), healed_name(DENSE, method), {}, method))
    grids = [{k: [layer for value in values for layer in (range(num_layers) if value == EACH_LAYER else [value])]
              if k in block.each_layer else values for k, values in block.grid.items()} for block in study.strategies]
    healed = [bool(study.recovery and block.name in study.recovery["strategies"]) for block in study.strategies]
    check_variant_count(sum(math.prod(map(len, grid.values())) * (1 + twin) for grid, twin in zip(grids, healed, strict=True)),
                        f"{study.path}", f"its [[strategies]] grids (\"each\" = {num_layers} layers)")
    for block, grid in zip(study.strategies, grids, strict=True):
        for point in grid_points(grid):
            layers = declared_layers(block.name, point, num_layers)
            settings = ",".join(f"{k}={v}" for k, v in point.items())
            variants.append(Variant(f"{block.name}[{settings}]" if settings else block.name, block.name, point,
                                    layers=layers))
            if study.recovery and block.name in study.recovery["strategies"]:  # its healed twin right after it
                method = study.recovery["method"]
                variants.append(Variant(healed_name(variants[-1].name, method), healed_name(block.name, method),
                                        point, method, layers))
    seen: set[str] = set()
    for variant in variants:
        if variant.name in seen:
            raise PrunelabError(f"variant {variant.name} appears twice in {study.path}")
        seen.add(variant.name)
    return variants


def declared_layers(strategy: str, point: dict[str, Any], num_layers: int) -> tuple[int, ...] | None:
    """The layers a grid point removes, as its strategy declares for a model of ``num_layers`` layers.

    Indices beyond the model fail before any variant runs, not half-way through the study.
    """
    found = default_registry().strategies.get(strategy)
    layers = found[0].removed_layers(point, num_layers) if found else None
    if layers is None:
        return None
    beyond = [i for i in layers if not 0 <= i < num_layers]
    if beyond:
        raise PrunelabError(f"strategy '{strategy}': layers {beyond} out of range, the model has "
                            f"layers 0-{num_layers - 1}")
    return tuple(layers)
