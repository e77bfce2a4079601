"""The Python API: ``prune(model, strategy, **options)`` runs a registered strategy and reports what it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter, adapt, as_adapter
from prunelab.model.surgery import check_config_shapes
from prunelab.prune.masks import MaskSet, check_achieved_sparsity, validate_options


@dataclass
class PruneContext:
    """What a strategy may need besides the model and its options.

    ``calibration`` describes where calibration text comes from (the calibration code defines the
    keys); ``masks`` is where a weight-pruning strategy leaves its ``MaskSet`` so callers keep it.
    """

    adapter: Adapter
    tokenizer: Any = None
    seed: int = 0
    calibration: dict[str, Any] | None = None
    source: str | None = None  # the model the user asked for, when known
    masks: MaskSet | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator seeded with ``seed``: random choices are reproducible from the recipe."""
        return torch.Generator(device=device).manual_seed(self.seed)


class PruneReport(dict):
    """The JSON-able report of a prune (a dict), with the strategy's masks attached as ``.masks``.

    ``removed_layers`` (also in the dict): the decoder layers that are no longer in the model,
    read from the model after the strategy ran, whatever the strategy says about itself.
    """

    masks: MaskSet | None = None


def prune(model_or_loaded, strategy_name: str, *, seed: int = 0, calibration: dict[str, Any] | None = None,
          registry=None, **options) -> PruneReport:
    """Prune a model in place with a registered strategy and return what was done.

    ``prune(loaded, "magnitude", sparsity=50, pattern="2:4")``. Options are validated first (so a
    typo fails before any work); the report records strategy, options, seed, calibration source,
    parameter counts and whatever the strategy reports (its achieved sparsity).
    """
    from prunelab.registry import default_registry

    registry = registry or default_registry()
    strategy = registry.strategy(strategy_name)
    validated = validate_options(strategy, options)
    adapter = as_adapter(model_or_loaded)
    context = PruneContext(
        adapter=adapter,
        tokenizer=getattr(model_or_loaded, "tokenizer", None),
        seed=seed,
        calibration=calibration,
        source=getattr(model_or_loaded, "source", None),
    )
    strategy.check_for_model(adapter, validated)  # before any calibration or change
    params_before = sum(p.numel() for p in adapter.model.parameters())
    original = {id(layer): index for index, layer in enumerate(adapter.layers)}
    result = strategy.prune(adapter.model, validated, context) or {}
    check_config_shapes(context.adapter.model, f"strategy '{strategy.name}'")  # before anyone saves or scores it
    removed = removed_layers(original, adapt(context.adapter.model))
    check_declared_layers(strategy, validated, removed)
    check_achieved_sparsity(strategy, validated, context.masks)  # the variant's name must be what was done
    report = PruneReport(
        strategy=strategy.name,
        plugin=registry.identity("strategy", strategy.name),  # package, version, source hash
        options=validated,
        seed=seed,
        calibration=context.calibration,
        parameters={"before": params_before, "after": sum(p.numel() for p in context.adapter.model.parameters())},
        **result,
    )
    report["removed_layers"] = removed
    report.masks = context.masks
    return report


def removed_layers(original: dict[int, int], after: Adapter) -> list[int]:
    """The original indices of the decoder layers no longer in the model (by module identity).

    ``original``: id of each decoder layer module before pruning -> its index then.
    """
    kept = {original[id(layer)] for layer in after.layers if id(layer) in original}
    return sorted(set(original.values()) - kept)


def check_declared_layers(strategy, options: dict[str, Any], removed: list[int]) -> None:
    """A strategy that declares its layers (``removes_layers``) must have removed exactly those:
    the layer sweep and the layer chart trust the declaration without building the model."""
    declared = strategy.removed_layers(options)
    if declared is not None and sorted(declared) != removed:
        raise PrunelabError(f"strategy '{strategy.name}' declares it removes layers {sorted(declared)} "
                            f"but removed {removed}")
