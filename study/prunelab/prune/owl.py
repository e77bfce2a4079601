"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2024), for any weight-pruning strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter
from prunelab.options import Option
from prunelab.prune.calibration import samples_for
from prunelab.prune.layerwise import InputNorms, LayerStep, run_layerwise
from prunelab.prune.masks import layer_index_of

# --------------------------------------------------------------------------------------------
# OWL: outlier-weighted layer-wise sparsity
# --------------------------------------------------------------------------------------------

OWL_M = 5.0
OWL_LAMBDA = 0.08


def allocation_options() -> tuple[Option, ...]:
    """``allocation`` (uniform | owl) with OWL's M and lambda: shared by magnitude, Wanda and SparseGPT."""
    return (
        Option("allocation", str, "uniform", "per-layer sparsity: uniform, or owl (outlier-weighted, "
               "needs calibration data; unstructured only)", choices=("uniform", "owl")),
        Option("owl_m", float, OWL_M, "OWL: a weight is an outlier when |W|*||X|| > M x the layer mean",
               check=lambda v: None if v > 0 else "must be positive"),
        Option("owl_lambda", float, OWL_LAMBDA, "OWL: per-layer sparsities span target +- lambda",
               check=lambda v: None if 0 <= v <= 0.5 else "must be in [0, 0.5]"),
    )


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """Share of a layer's scores (all its Linears together) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's allocation (fractions): outlier ratios min-max scaled to [0, 2*lam], centred on the target.

    Layers with more outliers keep more weights. The mean of the result is ``sparsity`` (before
    clipping to [0, 1]); equal ratios give the uniform allocation.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(r) == 0 or r.max() <= r.min():
        return [float(sparsity)] * len(r)
    spread = r.max() - r.min()
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(min(1.0, max(0.0, 1 - d))) for d in density]


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score |W_ij| * ||X_j||_2 (float32), the metric OWL counts outliers of."""
    return weight.detach().abs().float() * norms.to(weight.device, torch.float32)[None, :]


def owl_layer_ratios(adapter: Adapter, samples: torch.Tensor, m: float = OWL_M,
                     linear_filter: Callable[[int, str], bool] | None = None) -> list[float]:
    """Per-layer outlier ratios of the dense model, propagated layer by layer (nothing is pruned)."""
    ratios: list[float] = []

    def measure(step: LayerStep) -> bool:
        scores = [wanda_scores(mod.weight, step.stats[name].norms) for name, mod in step.linears.items()]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        return False

    run_layerwise(adapter, samples, measure, InputNorms, linear_filter)
    return ratios


def owl_layer_sparsities(
    adapter: Adapter, samples: torch.Tensor, sparsity: float, m: float = OWL_M, lam: float = OWL_LAMBDA,
    linear_filter: Callable[[int, str], bool] | None = None,
) -> tuple[list[float], list[float]]:
    """(per-layer sparsity fractions, per-layer outlier ratios) by OWL for a target ``sparsity`` fraction."""
    ratios = owl_layer_ratios(adapter, samples, m, linear_filter)
    return owl_sparsities(ratios, sparsity, lam), ratios


def layer_sparsities(adapter: Adapter, options: Mapping[str, Any], sparsity: float, nm, context=None,
                     samples: torch.Tensor | None = None,
                     linear_filter: Callable[[int, str], bool] | None = None) -> tuple[list[float], dict[str, Any]]:
    """Per-layer sparsity fractions from the ``allocation`` options, and what to report about them.

    ``uniform``: the target everywhere. ``owl``: needs calibration (``samples``, or drawn from
    ``context``) and an unstructured pattern (N:M fixes every layer's sparsity).
    """
    allocation = options.get("allocation", "uniform") or "uniform"
    if allocation == "uniform":
        return [sparsity] * adapter.num_layers, {"allocation": "uniform"}
    if nm is not None:
        raise PrunelabError("allocation 'owl' varies the sparsity per layer; it cannot be combined with an N:M pattern")
    if samples is None:
        if context is None:
            raise PrunelabError("allocation 'owl' needs calibration data")
        samples, _ = samples_for(context, adapter)
    m = float(options.get("owl_m", OWL_M))
    lam = float(options.get("owl_lambda", OWL_LAMBDA))
    per_layer, ratios = owl_layer_sparsities(adapter, samples, sparsity, m, lam, linear_filter)
    info = {"allocation": "owl", "owl_m": m, "owl_lambda": lam,
            "outlier_ratio_pct": [round(100 * r, 4) for r in ratios],
            "layer_sparsity_pct": [round(100 * s, 4) for s in per_layer]}
    return per_layer, info


def target_fractions(names, per_layer: Sequence[float], default: float) -> dict[str, float]:
    """The sparsity fraction of each target name: its layer's (OWL) fraction, ``default`` outside layers.

    For strategies that prune a dict of targets at once (magnitude): ``layer_sparsities`` gives the
    per-layer list, this maps it onto the adapter-relative target names.
    """
    fractions = {}
    for name in names:
        index = layer_index_of(name)
        fractions[name] = per_layer[index] if index is not None else default
    return fractions
