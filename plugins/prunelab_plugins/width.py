"""Strategy ``width``: remove MLP channels, attention heads and hidden channels (Minitron-style).

Each axis option is the fraction of that axis to remove (``mlp=0.25`` keeps 75 % of the MLP
channels), the same in every layer, so the pruned folder is a standard checkpoint with smaller
``intermediate_size`` / ``num_attention_heads`` / ``num_key_value_heads`` / ``hidden_size``;
``round_to`` keeps MLP and hidden counts a multiple of it (llama.cpp's block-quantized types). The
surgery, the GQA modes, the rounding and the checks live in ``prunelab.model`` (``width_targets``,
``prune_width``; the size axes, drawn at the achieved fraction, ``width_axes``); this module holds
the importance scores:

* ``activation`` (default; Minitron, Muralidharan et al. 2024): one pass over calibration text with
  forward hooks. Per sample, the mean over tokens of |activation| of each channel; over samples,
  the L2 norm of those means. MLP channel j: the input of ``down_proj`` (act(gate) * up); head h:
  the L2 norm of its ``head_dim`` slice of the attention output before ``o_proj``; hidden channel
  i: the outputs of every norm on the residual stream (each layer's, and the final norm), summed
  over those norms.
* ``magnitude`` (no calibration): the L2 norm of every weight that reads or writes the channel --
  MLP: its gate and up rows and its down column; a query head: its q rows and o columns, plus its
  KV head's k and v rows shared out over the group; hidden: its embedding (and untied head)
  column, the q/k/v/gate/up columns and the o/down rows of every layer.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from prunelab.model import (
    WidthScores,
    WidthSizes,
    WidthTargets,
    layer_parts,
    prune_width,
    stream_norms,
    width_axes,
    width_options,
    width_targets_from_options,
)
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import PruneContext, samples_for_context

IMPORTANCE = ("activation", "magnitude")


# ---------------------------------------------------------------------------- activation importance
class _Channels:
    """Per-channel L2 norm over samples of the per-sample token mean of a (tokens, channels) activation."""

    def __init__(self) -> None:
        self.sum_squares: torch.Tensor | None = None

    def add(self, per_token: torch.Tensor) -> None:
        mean = per_token.detach().double().flatten(0, -2).mean(0)
        self.sum_squares = mean.square() if self.sum_squares is None else self.sum_squares + mean.square()

    def norms(self) -> torch.Tensor:
        return self.sum_squares.sqrt().cpu()


def activation_scores(context: PruneContext, targets: WidthTargets) -> WidthScores:
    """Minitron's activation importance of every axis ``targets`` shrinks, from one calibration pass."""
    adapter, sizes = context.adapter, targets.sizes
    parts = [layer_parts(adapter, i) for i in range(sizes.layers)]
    mlp = [_Channels() for _ in parts] if targets.removes("mlp") else []
    heads = [_Channels() for _ in parts] if targets.removes("heads") else []
    norms = ([n for p in parts for n in p.norms] + stream_norms(adapter, sizes.hidden)) if targets.removes("hidden") else []
    hidden = [_Channels() for _ in norms]
    handles = []
    for part, stat in zip(parts, mlp, strict=False):
        handles.append(part.down.register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0].abs())))
    for part, stat in zip(parts, heads, strict=False):
        handles.append(part.o.register_forward_pre_hook(
            lambda _m, args, s=stat: s.add(args[0].unflatten(-1, (sizes.heads, sizes.head_dim)).norm(dim=-1))))
    for norm, stat in zip(norms, hidden, strict=True):
        handles.append(norm.register_forward_hook(lambda _m, _args, out, s=stat: s.add(out.abs())))
    samples = samples_for_context(context, adapter)
    device = next(adapter.model.parameters()).device
    try:
        with torch.no_grad():
            for row in range(samples.shape[0]):
                adapter.decoder(input_ids=samples[row : row + 1].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return WidthScores(mlp=[s.norms() for s in mlp] or None, heads=[s.norms() for s in heads] or None,
                       hidden=torch.stack([s.norms() for s in hidden]).sum(0) if hidden else None)


# ---------------------------------------------------------------------------- magnitude importance
def _rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().square().sum(1)


def _columns(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().square().sum(0)


def _per_head(squares: torch.Tensor, heads: int) -> torch.Tensor:
    return squares.reshape(heads, -1).sum(1)


def _head_magnitude(part, sizes: WidthSizes) -> torch.Tensor:
    query = _per_head(_rows(part.q.weight), sizes.heads) + _per_head(_columns(part.o.weight), sizes.heads)
    kv = _per_head(_rows(part.k.weight) + _rows(part.v.weight), sizes.kv_heads) / sizes.group
    return (query + kv.repeat_interleave(sizes.group)).sqrt().cpu()


def magnitude_scores(context: PruneContext, targets: WidthTargets) -> WidthScores:
    """Weight-norm importance of every channel (no calibration)."""
    adapter, sizes = context.adapter, targets.sizes
    parts = [layer_parts(adapter, i) for i in range(sizes.layers)]
    scores = WidthScores()
    if targets.removes("mlp"):
        scores.mlp = [(_rows(p.gate.weight) + _rows(p.up.weight) + _columns(p.down.weight)).sqrt().cpu() for p in parts]
    if targets.removes("heads"):
        scores.heads = [_head_magnitude(p, sizes) for p in parts]
    if targets.removes("hidden"):
        total = _columns(adapter.embedding.weight)
        if not adapter.tied:
            total = total + _columns(adapter.head.weight)
        for p in parts:
            total = total + sum(_columns(lin.weight) for lin in (p.q, p.k, p.v, p.gate, p.up))
            total = total + _rows(p.o.weight) + _rows(p.down.weight)
        scores.hidden = total.sqrt().cpu()
    return scores


def prune(model: nn.Module, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    """Check the fractions against the model, score the channels, keep the best; report what was kept."""
    start = time.perf_counter()
    targets = width_targets_from_options(context.adapter, options)  # the checks come before any calibration
    score = activation_scores if options["importance"] == "activation" else magnitude_scores
    report = prune_width(context.adapter, targets, score(context, targets))
    return {**report, "importance": options["importance"], "seconds": round(time.perf_counter() - start, 3)}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="width",
        description="remove MLP channels, attention heads and hidden channels (Minitron); a smaller standard checkpoint",
        prune=prune,
        options=(
            *width_options(),
            Option("importance", str, "activation",
                   "'activation' (calibration activations, Minitron) or 'magnitude' (weight norms)", choices=IMPORTANCE),
        ),
        needs_calibration=lambda options: options.get("importance", "activation") == "activation",
        check_model=width_targets_from_options,  # a study checks every grid point once the model is loaded
        size=width_axes(),  # a width chart per axis; the size comparison places it by its parameters
    )]
