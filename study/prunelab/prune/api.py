"""The Python API: ``prune(model, strategy, **options)`` runs a registered strategy and reports what it did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunelab.model.adapter import Adapter, as_adapter
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
    """The JSON-able report of a prune (a dict), with the strategy's masks attached as ``.masks``."""

    masks: MaskSet | None = None


def prune(model_or_loaded, strategy_name: str, *, seed: int = 0, calibration: dict[str, Any] | None = None,
          registry=None, **options) -> PruneReport:
    """Prune a model in place with a registered strategy and return what was done.

    ``prune(loaded, "magnitude", sparsity=50, pattern="2:4")``. Options are validated first (so a
    typo fails before any work); the report records strategy, options, seed, calibration source,
    parameter counts and whatever the strategy reports (its achieved sparsity).
    """
    from prunelab.registry import default_registry

    strategy = (registry or default_registry()).strategy(strategy_name)
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
    result = strategy.prune(adapter.model, validated, context) or {}
    check_achieved_sparsity(strategy, validated, context.masks)  # the variant's name must be what was done
    report = PruneReport(
        strategy=strategy.name,
        options=validated,
        seed=seed,
        calibration=context.calibration,
        parameters={"before": params_before, "after": sum(p.numel() for p in context.adapter.model.parameters())},
        **result,
    )
    report.masks = context.masks
    return report
