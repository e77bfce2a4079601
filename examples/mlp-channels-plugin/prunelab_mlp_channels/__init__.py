"""Strategy ``mlp-channels``: remove a fraction of every decoder layer's MLP channels (structured width pruning).

An example of a width strategy: the gated MLP of Llama-style models (``gate_proj``, ``up_proj``,
``down_proj``) computes ``down(act(gate(x)) * up(x))``; channel ``j`` is row ``j`` of ``gate`` and
``up`` and column ``j`` of ``down``. The strategy keeps the channels with the largest
``||up[j]|| * ||down[:, j]||`` (a magnitude score), slices the three tensors -- the model really
shrinks -- and sets ``intermediate_size`` in the config, so the saved folder loads with plain
transformers. Every layer keeps the same number of channels: ``round((1 - fraction) * intermediate_size)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.plugin import Option, SizeAxis, Strategy, hookimpl
from prunelab.prune import PruneContext


def _sliced(linear: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the kept output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, keep).clone()
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, keep))
    return new


def prune(model: torch.nn.Module, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    config = context.adapter.text_config
    width = int(config.intermediate_size)
    kept = round((1 - options["fraction"]) * width)
    if not 1 <= kept < width:
        raise PrunelabError(f"mlp-channels: fraction {options['fraction']} keeps {kept} of {width} channels")
    for layer in context.adapter.layers:
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise PrunelabError("mlp-channels: needs gated MLPs with gate_proj, up_proj and down_proj")
        score = mlp.up_proj.weight.detach().float().norm(dim=1) * mlp.down_proj.weight.detach().float().norm(dim=0)
        keep = torch.topk(score, kept).indices.sort().values.to(mlp.up_proj.weight.device)
        mlp.gate_proj = _sliced(mlp.gate_proj, keep, 0)
        mlp.up_proj = _sliced(mlp.up_proj, keep, 0)
        mlp.down_proj = _sliced(mlp.down_proj, keep, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = kept
    config.intermediate_size = kept
    return {"intermediate_size": {"before": width, "after": kept}, "channels_removed_fraction": (width - kept) / width}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="mlp-channels",
        description="remove a fraction of every MLP's channels, shrinking intermediate_size (example width strategy)",
        prune=prune,
        options=(Option("fraction", float, None, "share of MLP channels to remove, in (0, 1)", required=True,
                        check=lambda v: None if 0 < v < 1 else f"must be in (0, 1), got {v}"),),
        # a width chart of MLP channels, each variant drawn at the share its report says it removed
        # (whole channels: fraction 0.3 of 128 removes 38, 0.296875)
        size=(SizeAxis("width", option="fraction", label="MLP channels", achieved=_achieved),),
    )]


def _achieved(report: dict[str, Any]) -> float:
    """``SizeAxis.achieved``: the share of channels this strategy's own report says it removed."""
    return report["channels_removed_fraction"]
