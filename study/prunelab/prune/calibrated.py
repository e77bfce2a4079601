"""What every calibrated method shares: a per-layer sparsity (uniform or OWL), then the layer-wise driver.

``calibrated_prune`` turns a per-Linear mask function (Wanda's, SparseGPT's) into a whole strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from prunelab.model.adapter import as_adapter
from prunelab.prune.calibration import samples_for
from prunelab.prune.layerwise import LayerStep, Statistic, StatisticFactory, run_layerwise
from prunelab.prune.masks import MaskSet, apply_mask, resolve_sparsity, sparsity_report
from prunelab.prune.owl import layer_sparsities

# prune_linear(module, statistic, sparsity_fraction, nm) -> keep-mask (True = keep); it may also
# update the module's weights (SparseGPT), the zeros are applied by the caller.
LinearPruner = Callable[[nn.Linear, Statistic, float, "tuple[int, int] | None"], torch.Tensor]


def calibrated_prune(
    model: nn.Module,
    options: Mapping[str, Any],
    context,
    statistic: StatisticFactory,
    prune_linear: LinearPruner,
) -> dict[str, Any]:
    """Prune every decoder Linear weight layer by layer with ``prune_linear``; return the report.

    Shared by Wanda and SparseGPT: draws the calibration samples, resolves sparsity/pattern and
    the per-layer allocation (OWL), runs the driver, keeps the masks in ``context.masks`` and
    reports the achieved sparsity, the calibration used and the time taken.
    """
    adapter = context.adapter if getattr(context, "adapter", None) is not None else as_adapter(model)
    sparsity, nm = resolve_sparsity(options)
    start = time.perf_counter()
    samples, spec = samples_for(context, adapter)
    context.calibration = spec.as_dict()
    per_layer, allocation = layer_sparsities(adapter, options, sparsity, nm, samples=samples)
    masks = MaskSet()
    targets: dict[str, torch.Tensor] = {}

    def prune_layer(step: LayerStep) -> bool:
        for name, module in step.linears.items():
            keep = prune_linear(module, step.stats[name], per_layer[step.index], nm)
            apply_mask(module.weight, keep)
            key = f"layers.{step.index}.{name}.weight"
            masks[key] = keep.to("cpu")
            targets[key] = module.weight
        return True

    run_layerwise(adapter, samples, prune_layer, statistic)
    context.masks = masks
    return {
        "sparsity": sparsity_report(targets),
        "requested_sparsity_pct": round(100 * sparsity, 6),
        "pattern": f"{nm[0]}:{nm[1]}" if nm else "unstructured",
        **allocation,
        "seconds": round(time.perf_counter() - start, 3),
    }
