"""The layer-wise driver every calibrated method shares (Wanda, SparseGPT, OWL).

``run_layerwise`` feeds calibration samples through the decoder one layer at a time, so each layer
is measured (and pruned) on the outputs of the already-pruned layers below it; ``calibrated_prune``
turns a per-Linear mask function into a strategy. A method's own statistic (SparseGPT's Hessian)
lives with the method; ``InputNorms`` is here because OWL and Wanda both read it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter

# --------------------------------------------------------------------------------------------
# Statistics of a Linear's inputs
# --------------------------------------------------------------------------------------------


class Statistic(Protocol):
    """Accumulates something about a Linear's inputs, one (tokens, in_features) batch at a time."""

    def update(self, inputs: torch.Tensor) -> None: ...


class InputNorms:
    """Sum of squares of every input feature over all calibration tokens: ||X_j||_2^2 (Wanda, OWL)."""

    def __init__(self, module: nn.Linear) -> None:
        self.squares = torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.float()
        self.squares += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


StatisticFactory = Callable[[nn.Linear], Statistic]


# --------------------------------------------------------------------------------------------
# The layer-wise driver
# --------------------------------------------------------------------------------------------


class _InputsCaptured(Exception):
    """Raised by the recorders to stop the decoder once the inputs are captured."""


@dataclass
class LayerCall:
    """Everything the decoder passes to one layer besides its hidden states."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_as_kwarg: bool = False

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerStep:
    """What the driver hands the per-layer callback."""

    index: int
    layer: nn.Module
    linears: dict[str, nn.Linear]  # the hooked Linears, by name within the layer
    stats: dict[str, Statistic]  # their statistics (q/k/v and gate/up share one object)
    inputs: torch.Tensor  # (samples, seqlen, hidden): this layer's inputs


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), LayerCall((), rest, hidden_as_kwarg=True)


def _same_call(a: LayerCall, b: LayerCall) -> bool:
    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y, strict=True))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and (x is y or x == y)

    return a.hidden_as_kwarg == b.hidden_as_kwarg and same(a.args, b.args) and same(a.kwargs, b.kwargs)


@torch.no_grad()
def capture_layer_inputs(adapter: Adapter, samples: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """The first layer's input hidden states for every sample, and every layer's other arguments.

    Each layer's ``forward`` is replaced by a recorder that returns its input unchanged, so the
    decoder computes embeddings, masks and rotary tables but no layer math; the last recorder
    raises to stop before the final norm. All samples have the same length and no padding, so the
    per-layer arguments are the same for every sample (checked on layer 0).
    """
    layers = adapter.layers
    device = next(adapter.model.parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(layers)
    state = {"sample": 0}

    def recorder(index: int):
        def forward(*args, **kwargs):
            h, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h.detach())
                if calls[0] is not None and not _same_call(calls[0], call):
                    raise PrunelabError(
                        "this model passes per-sample arguments to its decoder layers; "
                        "layer-wise calibration does not support it"
                    )
            if calls[index] is None:
                calls[index] = call
            if state["sample"] > 0 or index == len(layers) - 1:
                raise _InputsCaptured
            return h
        return forward

    # An instance-level forward (e.g. an accelerate offload hook) is put back afterwards.
    previous = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        for row in range(samples.shape[0]):
            state["sample"] = row
            with contextlib.suppress(_InputsCaptured):
                adapter.decoder(input_ids=samples[row : row + 1].to(device), use_cache=False)
            if len(hidden) != row + 1:
                raise PrunelabError(f"{type(adapter.model).__name__}: its decoder did not call the first layer")
    finally:
        for layer, forward in zip(layers, previous, strict=True):
            del layer.forward  # back to the class's forward ...
            if forward is not None:
                layer.forward = forward  # ... or to the instance's own
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise PrunelabError(f"the decoder never called layer(s) {missing}; layer-wise calibration needs every layer")
    return torch.cat(hidden, dim=0), calls  # type: ignore[return-value]


class _Hooks:
    """Forward hooks that feed each Linear's inputs to its statistic; Linears fed the same tensor share it."""

    def __init__(self, linears: Mapping[str, nn.Linear], factory: StatisticFactory) -> None:
        self.factory = factory
        self.stats: dict[str, Statistic] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs already counted in this forward
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Linear, args: tuple, output) -> None:
            if not args:
                return
            x = args[0]
            for tensor, other in self._seen:
                if tensor is x:  # q/k/v (or gate/up) read the very same tensor: one statistic
                    self.stats.setdefault(name, self.stats[other])
                    return
            if name not in self.stats:
                self.stats[name] = self.factory(module)
            self._seen.append((x, name))
            self.stats[name].update(x.detach().reshape(-1, x.shape[-1]))
        return hook

    def new_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def run_layerwise(
    adapter: Adapter,
    samples: torch.Tensor,
    on_layer: Callable[[LayerStep], bool],
    statistic: StatisticFactory | None = None,
    linear_filter: Callable[[int, str], bool] | None = None,
) -> torch.Tensor:
    """Run the calibration samples through the decoder layer by layer (see the module docstring).

    ``on_layer(step)`` is called once per layer after the statistics of its Linears (those kept by
    ``linear_filter(layer_index, name)``) are collected; it returns True when it changed the
    layer's weights, which makes the driver recompute the layer's outputs. Returns the last layer's
    outputs (before the final norm).
    """
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with torch.no_grad():
            inputs, calls = capture_layer_inputs(adapter, samples)
            outputs = torch.empty_like(inputs)
            for index, layer in enumerate(adapter.layers):
                linears = {
                    name: module for name, module in adapter.linear_modules(index).items()
                    if linear_filter is None or linear_filter(index, name)
                }
                hooks = _Hooks(linears if statistic is not None else {}, statistic or InputNorms)
                try:
                    for row in range(inputs.shape[0]):
                        hooks.new_forward()
                        outputs[row : row + 1] = calls[index].run(layer, inputs[row : row + 1])
                finally:
                    hooks.remove()
                changed = on_layer(LayerStep(index, layer, linears, hooks.stats, inputs))
                del hooks
                if changed:
                    for row in range(inputs.shape[0]):
                        outputs[row : row + 1] = calls[index].run(layer, inputs[row : row + 1])
                inputs, outputs = outputs, inputs
    finally:
        adapter.model.train(was_training)
    return inputs
