"""Width pruning: keep chosen channels of an axis in every decoder layer, leaving a standard config.

Three axes, the same count in every layer, so the result is an ordinary checkpoint of the same
architecture with smaller sizes (plain ``AutoModelForCausalLM`` loads it, no custom code):

* **mlp** -- intermediate channels: rows of ``gate_proj``/``up_proj`` (and their biases), columns
  of ``down_proj``; ``intermediate_size``. Each layer keeps its own channels.
* **heads** -- attention heads, GQA-aware: the query heads kept and the KV heads kept, per layer.
  Rows of ``q_proj`` (per query head) and of ``k_proj``/``v_proj`` (per KV head), biases included
  (Qwen2), columns of ``o_proj``. Every kept KV head keeps the same number of query heads, so
  ``num_attention_heads % num_key_value_heads == 0`` holds and query head ``i`` still reads KV head
  ``i // group``. Per-head norms (Qwen3's ``q_norm``/``k_norm``) act on ``head_dim`` and stay;
  ``head_dim`` is written into the config explicitly so neither it nor RoPE changes on reload.
* **hidden** -- the residual stream's channels, one set for the whole model: columns of the
  embedding, of the untied head and of every projection that reads the stream (q/k/v, gate/up),
  rows and biases of every projection that writes it (o, down), and every norm on the stream
  (per-layer norms and the final norm; not the per-head ones); ``hidden_size``. A tied head stays
  tied (one tensor). An RMSNorm then averages x^2 over the kept channels only: the pruned model's
  norm equals the dense one only where the removed channels are zero; elsewhere it is the
  approximation Minitron makes (it heals with distillation). Embeddings scaled at run time by
  ``sqrt(hidden_size)`` (Gemma) would change scale on reload, since the factor comes from the
  config: the embedding rows are multiplied by ``sqrt(old / new)`` so its output stays the same,
  and with a tied head the final norm's gain is divided by the same factor so the logits do too.

Modules are found by the layout every Llama-like family shares (``q_proj``/``k_proj``/``v_proj``/
``o_proj`` and ``gate_proj``/``up_proj``/``down_proj`` inside each decoder layer, found by search,
not by attribute path); anything else (fused qkv, GPT-2's ``c_attn``, an unknown parameter in a
layer) is refused with one line before any work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter, as_adapter
from prunelab.options import Option, at_least
from prunelab.plugin import SizeAxis

AXES = ("mlp", "heads", "hidden")
#: The axes whose kept count ``round_to`` rounds: they set row lengths (``intermediate_size``,
#: ``hidden_size``). Heads are not: a head count changes how many ``head_dim`` rows there are, not their length.
ROUNDED_AXES = ("mlp", "hidden")
#: How ``heads`` removes heads under GQA: whole KV groups (their query heads go with them), or the
#: same number of query heads from every group (KV heads all stay; Minitron's choice).
HEAD_MODES = ("query", "groups")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- where things are
@dataclass(frozen=True)
class LayerParts:
    """One decoder layer's width-bearing modules."""

    attention: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    norms: tuple[nn.Module, ...]  # direct children with a 1-D weight of hidden_size: they act on the stream


@dataclass(frozen=True)
class WidthSizes:
    """The sizes width pruning changes, read from the modules (not recomputed from the config)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def model_label(adapter: Adapter) -> str:
    """How messages name the model: its folder or Hub id when known, and its class."""
    name = getattr(adapter.model.config, "_name_or_path", "") or ""
    kind = type(adapter.model).__name__
    return f"{name} ({kind})" if name else kind


def _unknown(adapter: Adapter, what: str) -> PrunelabError:
    return PrunelabError(f"width pruning: model {model_label(adapter)}: {what}; prunelab knows the "
                         "q_proj/k_proj/v_proj/o_proj + gate_proj/up_proj/down_proj layout (Llama, Qwen2/3, Gemma3, Mistral)")


def _holder(layer: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The (path, module) inside a layer whose children include a Linear for each of ``names``."""
    for path, module in layer.named_modules():
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
            return path, module
    return None


def layer_parts(adapter: Adapter, index: int) -> LayerParts:
    """The attention, MLP and stream norms of one decoder layer, or a one-line refusal."""
    layer = adapter.layers[index]
    attention = _holder(layer, ATTENTION_NAMES)
    mlp = _holder(layer, MLP_NAMES)
    if attention is None:
        raise _unknown(adapter, f"layer {index} has no attention with q_proj/k_proj/v_proj/o_proj Linears")
    if mlp is None:
        raise _unknown(adapter, f"layer {index} has no MLP with gate_proj/up_proj/down_proj Linears")
    (a_path, a), (_, m) = attention, mlp
    hidden = a.q_proj.in_features
    norms = tuple(child for child in layer.children() if _is_stream_norm(child, hidden))
    parts = LayerParts(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, m, m.gate_proj, m.up_proj, m.down_proj, norms)
    _check_known_parameters(adapter, index, layer, parts, a_path)
    return parts


def _is_stream_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return (not isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(weight, torch.Tensor)
            and weight.dim() == 1 and weight.numel() == hidden)


def _head_dim(adapter: Adapter, attention: nn.Module) -> int | None:
    """The attention's head size: the module's own ``head_dim``, else the config's."""
    value = getattr(attention, "head_dim", None) or getattr(adapter.text_config, "head_dim", None)
    return value if isinstance(value, int) and value > 0 else None


def _check_known_parameters(adapter: Adapter, index: int, layer: nn.Module, parts: LayerParts, a_path: str) -> None:
    """Refuse a layer holding a parameter the surgery would not resize (it would break the shapes).

    Only per-head vectors inside the attention (Qwen3's q_norm/k_norm, of ``head_dim``) may stay.
    """
    known = {id(p) for module in (parts.q, parts.k, parts.v, parts.o, parts.gate, parts.up, parts.down, *parts.norms)
             for p in module.parameters()}
    head_dim = _head_dim(adapter, parts.attention)
    for name, param in layer.named_parameters():
        inside_attention = not a_path or name.startswith(f"{a_path}.")
        per_head = inside_attention and param.dim() == 1 and param.numel() == head_dim
        if id(param) not in known and not per_head:
            raise _unknown(adapter, f"layer {index} has parameter '{name}' {tuple(param.shape)} that width pruning cannot resize")


def width_sizes(adapter: Adapter) -> WidthSizes:
    """The model's widths, checking that every layer has the known layout and the same sizes."""
    first = layer_parts(adapter, 0)
    head_dim = _head_dim(adapter, first.attention)
    if head_dim is None or first.q.out_features % head_dim or first.k.out_features % head_dim:
        raise _unknown(adapter, "cannot tell the attention head size (no head_dim on the attention or config)")
    sizes = WidthSizes(hidden=first.q.in_features, intermediate=first.gate.out_features,
                       heads=first.q.out_features // head_dim, kv_heads=first.k.out_features // head_dim,
                       head_dim=head_dim, layers=adapter.num_layers)
    if sizes.heads % sizes.kv_heads:
        raise _unknown(adapter, f"{sizes.heads} query heads do not divide into {sizes.kv_heads} KV heads")
    for index in range(1, adapter.num_layers):
        parts = layer_parts(adapter, index)
        shape = (parts.q.in_features, parts.gate.out_features, parts.q.out_features, parts.k.out_features)
        if shape != (sizes.hidden, sizes.intermediate, sizes.heads * head_dim, sizes.kv_heads * head_dim):
            raise _unknown(adapter, f"layer {index} has other widths than layer 0 (a non-uniform model)")
    return sizes


def stream_norms(adapter: Adapter, hidden: int) -> list[nn.Module]:
    """The decoder's own norms on the stream (the final norm), outside the layers."""
    return [child for child in adapter.decoder.children() if _is_stream_norm(child, hidden)]


def _check_outer_parameters(adapter: Adapter, hidden: int) -> None:
    """Hidden pruning resizes every parameter outside the layers too: refuse one it does not know."""
    known = {id(adapter.embedding.weight), id(adapter.head.weight), id(getattr(adapter.head, "bias", None))}
    known |= {id(p) for norm in stream_norms(adapter, hidden) for p in norm.parameters()}
    known |= {id(p) for p in adapter.layers.parameters()}
    for name, param in adapter.model.named_parameters():
        if id(param) not in known:
            raise _unknown(adapter, f"parameter '{name}' {tuple(param.shape)} is outside the layers and not "
                           "the embedding, head or final norm")


# ---------------------------------------------------------------------------- how many to keep
@dataclass(frozen=True)
class WidthTargets:
    """How many channels of each axis every layer keeps, from fractions to remove (checked).

    ``requested``: the fractions asked for, by axis (what the prune report sets beside the achieved
    ones); ``round_to``: the multiple the kept MLP and hidden counts were rounded to.
    """

    sizes: WidthSizes
    mlp: int
    heads: int  # query heads kept per layer
    kv_heads: int  # KV heads kept per layer
    hidden: int
    heads_mode: str = "query"
    requested: Mapping[str, float] = field(default_factory=dict)
    round_to: int = 1

    def removes(self, axis: str) -> bool:
        before = {"mlp": self.sizes.intermediate, "heads": self.sizes.heads, "hidden": self.sizes.hidden}[axis]
        return getattr(self, axis) < before


def _fraction_error(option: str, value: float, adapter: Adapter, problem: str, round_to: int = 1) -> PrunelabError:
    """The one-line refusal of an axis fraction; one whose count was rounded names ``round_to`` first."""
    if round_to > 1:
        return PrunelabError(f"width: option 'round_to' = {round_to} with '{option}' = {value:g} on model "
                             f"{model_label(adapter)}: {problem}")
    return PrunelabError(f"width: option '{option}' = {value:g} on model {model_label(adapter)}: {problem}")


def kept_count(total: int, fraction: float, round_to: int = 1) -> int:
    """Channels kept when ``fraction`` of ``total`` goes, as a multiple of ``round_to``.

    First the count without rounding, ``total - round(fraction x total)`` (half up, as weight
    sparsity counts: |error| <= 0.5 channel); then the multiple of ``round_to`` nearest to it, a tie
    keeping the smaller multiple (removing more, as the half-up count does). Integer arithmetic
    after the first step, so a tie is a tie (``round_to = 32``: 144 -> 128). The result may be 0
    or ``total`` (nothing removed): the caller refuses those.
    """
    multiples, rest = divmod(total - _removed(total, fraction), round_to)
    return (multiples + (2 * rest > round_to)) * round_to


def _removed(total: int, fraction: float) -> int:
    """Channels a fraction removes: rounded half up (as weight sparsity counts), |error| <= 0.5."""
    return min(total, math.floor(fraction * total + 0.5))


def width_targets(model_or_adapter, *, mlp: float = 0.0, heads: float = 0.0, hidden: float = 0.0,
                  heads_mode: str = "query", round_to: int = 1) -> WidthTargets:
    """The counts to keep for fractions to remove, or a one-line error naming the option and the model.

    Raised before any calibration: a fraction outside [0, 1), one that removes nothing or leaves
    nothing, a head fraction the GQA mode cannot realise exactly (``query``: the same number of
    query heads from every KV group; ``groups``: whole groups), or an unknown layout.
    ``round_to``: the kept MLP and hidden counts of an axis that is pruned are a multiple of it
    (``kept_count``; block-quantized GGUF types need rows of a multiple of 32 or 256); refused when
    the multiple keeps none, keeps all, or gives sizes the config rejects. Heads are never
    rounded: ``head_dim`` stays, so the head count does not set any row length.
    """
    adapter = as_adapter(model_or_adapter)
    values = {"mlp": mlp, "heads": heads, "hidden": hidden}
    for option, value in values.items():
        if not 0 <= value < 1:
            raise _fraction_error(option, value, adapter, "a fraction to remove must be in [0, 1)")
    if heads_mode not in HEAD_MODES:
        raise PrunelabError(f"width: option 'heads_mode' must be one of {', '.join(HEAD_MODES)}, got {heads_mode!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PrunelabError(f"width: option 'round_to' must be an integer >= 1, got {round_to!r}")
    if not any(values.values()):
        raise PrunelabError(f"width: model {model_label(adapter)}: nothing to remove (give mlp, heads or hidden > 0)")
    sizes = width_sizes(adapter)
    if hidden:
        _check_outer_parameters(adapter, sizes.hidden)
    kept = {}
    for option, total, what in (("mlp", sizes.intermediate, "MLP channels"), ("hidden", sizes.hidden, "hidden channels")):
        value = values[option]
        kept[option] = kept_count(total, value, round_to) if value else total
        if value:
            _check_count(adapter, option, value, total - kept[option], total, what, round_to)
    query, kv = _head_targets(adapter, sizes, heads, heads_mode)
    targets = WidthTargets(sizes, kept["mlp"], query, kv, kept["hidden"], heads_mode,
                           requested=dict(values), round_to=round_to)
    _check_config(adapter, targets, values)
    return targets


def _config_problem(config, values: Mapping[str, int]) -> str | None:
    """transformers' own validation of the config with these sizes: its message, or None when it passes.

    Llama's and Gemma3's configs, for one, refuse ``hidden_size % num_attention_heads != 0`` even
    with an explicit ``head_dim``: a folder saved with such sizes would not load.
    """
    for key, value in values.items():
        setattr(config, key, value)
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return None
    try:
        validate()
    except Exception as exc:  # transformers/huggingface_hub raise their own validation error types
        cause = exc.__cause__ or exc
        return " ".join(str(cause).split()).rstrip(".") or type(cause).__name__
    return None


def _new_config_values(targets: WidthTargets, axes: Sequence[str]) -> dict[str, int]:
    values = {"head_dim": targets.sizes.head_dim}
    if "heads" in axes:
        values |= {"num_attention_heads": targets.heads, "num_key_value_heads": targets.kv_heads}
    if "mlp" in axes:
        values["intermediate_size"] = targets.mlp
    if "hidden" in axes:
        values["hidden_size"] = targets.hidden
    return values


def _check_config(adapter: Adapter, targets: WidthTargets, fractions: Mapping[str, float]) -> None:
    """Refuse sizes the architecture's config rejects (naming the option), before anything changes."""
    import copy

    done: list[str] = []
    for axis in ("heads", "mlp", "hidden"):
        done.append(axis)
        config = copy.deepcopy(adapter.text_config)
        problem = _config_problem(config, _new_config_values(targets, done))
        if problem is None:
            continue
        hint = _valid_hidden_fractions(config, targets) if axis == "hidden" else ""
        rounded = targets.round_to if axis in ROUNDED_AXES and fractions[axis] else 1
        raise _fraction_error(axis, fractions[axis], adapter, f"{type(config).__name__} refuses the result: "
                              f"{problem}{hint}", rounded)


def _valid_hidden_fractions(config, targets: WidthTargets) -> str:
    """The nearest ``hidden`` fractions whose size the config accepts (scanning kept counts around the
    target, in steps of ``round_to``: every count it scans is one the rounding can give)."""
    total, found, step = targets.sizes.hidden, [], targets.round_to
    for direction in (-step, step):
        keep = targets.hidden + direction
        while 0 < keep < total and _config_problem(config, {"hidden_size": keep}) is not None:
            keep += direction
        if 0 < keep < total:
            found.append((total - keep) / total)
    return f"; nearest fractions it accepts: {' or '.join(f'{f:.6g}' for f in sorted(found))}" if found else ""


def check_fraction(value: float) -> str | None:
    """Option check for an axis fraction (``Option(check=...)``), before any model is loaded."""
    return None if 0 <= value < 1 else "a fraction to remove must be in [0, 1) (0.25 keeps 75 %)"


def width_options() -> tuple[Option, ...]:
    """The options every width strategy shares: one fraction per axis, the GQA mode and ``round_to``."""
    def fraction(axis: str, what: str) -> Option:
        return Option(axis, float, 0.0, f"fraction of the {what} to remove, in [0, 1) (the same in every layer)",
                      check=check_fraction)
    return (
        fraction("mlp", "MLP intermediate channels"),
        fraction("heads", "attention (query) heads"),
        fraction("hidden", "hidden (embedding / residual) channels"),
        Option("heads_mode", str, "query",
               "GQA: 'query' removes the same number of query heads from every KV group (KV heads stay), "
               "'groups' removes whole KV groups with their query heads", choices=HEAD_MODES),
        Option("round_to", int, 1,
               "keep a multiple of this many MLP and hidden channels (the nearest to the fraction's count; a tie "
               "keeps fewer): 32 for llama.cpp's q8_0/q4_0/q5_x, 256 for its k-quants; heads are never rounded",
               check=at_least(1)),
    )


AXIS_LABELS = {"mlp": "MLP channels", "heads": "attention heads", "hidden": "hidden channels"}


def achieved_fraction(axis: str) -> Callable[[Mapping[str, Any]], float | None]:
    """``SizeAxis.achieved`` of one width axis: the fraction ``prune_width`` reports it removed
    (measured on the pruned modules), which rounding and ``round_to`` make differ from the option."""
    def read(report: Mapping[str, Any]) -> float | None:
        return report["width"]["axes"][axis]["removed_fraction"]
    return read


def width_axes() -> tuple[SizeAxis, ...]:
    """The size axes of the options of ``width_options()`` (``Strategy.size``): one width chart each,
    drawn at the fraction achieved, and a variant removing along several at once is "combined width"
    in the size comparison."""
    return tuple(SizeAxis("width", option=axis, label=AXIS_LABELS[axis], achieved=achieved_fraction(axis))
                 for axis in AXES)


def width_targets_from_options(model_or_adapter, options: Mapping[str, Any]) -> WidthTargets:
    """``width_targets`` for the options of ``width_options()`` (also a strategy's ``check_model``)."""
    return width_targets(model_or_adapter, **{axis: options.get(axis) or 0.0 for axis in AXES},
                         heads_mode=options.get("heads_mode") or "query", round_to=options.get("round_to") or 1)


def _check_count(adapter: Adapter, option: str, value: float, gone: int, total: int, what: str,
                 round_to: int = 1) -> None:
    """Refuse a count that removes none or leaves none (a rounded one names ``round_to`` and the multiple)."""
    if round_to > 1 and not 0 < gone < total:
        result = "removes none" if gone <= 0 else "would leave none"
        raise _fraction_error(option, value, adapter, f"the multiple of {round_to} nearest to the "
                              f"{total - _removed(total, value)} channels it keeps is {total - gone} of its {total} "
                              f"{what}: {result}", round_to)
    if value and gone == 0:
        raise _fraction_error(option, value, adapter, f"removes none of its {total} {what} (round(fraction x {total}) = 0)")
    if gone >= total:
        raise _fraction_error(option, value, adapter, f"would leave none of its {total} {what}")


def _head_targets(adapter: Adapter, sizes: WidthSizes, fraction: float, mode: str) -> tuple[int, int]:
    """(query heads, KV heads) kept per layer; the removal must be whole groups or equal per group."""
    if not fraction:
        return sizes.heads, sizes.kv_heads
    gone = _removed(sizes.heads, fraction)
    _check_count(adapter, "heads", fraction, gone, sizes.heads, "query heads")
    unit = sizes.group if mode == "groups" else sizes.kv_heads
    if gone % unit:
        step = unit / sizes.heads
        shape = (f"{sizes.kv_heads} KV groups of {sizes.group}" if mode == "groups"
                 else f"the same count from each of {sizes.kv_heads} KV groups")
        raise _fraction_error("heads", fraction, adapter,
                              f"removes {gone} of {sizes.heads} query heads, which breaks GQA with heads_mode "
                              f"'{mode}' ({shape}): use a multiple of {step:.4g} or the other heads_mode")
    if mode == "groups":
        return sizes.heads - gone, sizes.kv_heads - gone // sizes.group
    return sizes.heads - gone, sizes.kv_heads


# ---------------------------------------------------------------------------- which to keep
@dataclass
class WidthScores:
    """Importance of every channel (higher = keep): per layer for mlp and heads, one vector for hidden."""

    mlp: list[torch.Tensor] | None = None  # layers x (intermediate,)
    heads: list[torch.Tensor] | None = None  # layers x (query heads,)
    hidden: torch.Tensor | None = None  # (hidden,)


@dataclass(frozen=True)
class WidthPlan:
    """The channels kept: what ``apply_width`` does and ``prunelab.json`` records (sorted indices)."""

    mlp: tuple[tuple[int, ...], ...] | None = None  # per layer
    heads: tuple[tuple[int, ...], ...] | None = None  # query heads kept, per layer
    kv_heads: tuple[tuple[int, ...], ...] | None = None  # KV heads kept, per layer
    hidden: tuple[int, ...] | None = None


def top_indices(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    """The ``count`` highest-scoring indices, sorted; ties go to the lower index (reproducible)."""
    order = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices[:count]
    return tuple(sorted(int(i) for i in order))


def plan_width(targets: WidthTargets, scores: WidthScores) -> WidthPlan:
    """Keep the highest-scoring channels of every axis ``targets`` shrinks, under its GQA mode.

    ``groups``: a KV group's score is the sum of its query heads'; ``query``: each group keeps its
    best ``heads / kv_heads`` query heads.
    """
    sizes = targets.sizes
    plan: dict[str, Any] = {}
    if targets.removes("mlp"):
        plan["mlp"] = tuple(top_indices(_need(scores.mlp, "mlp")[i], targets.mlp) for i in range(sizes.layers))
    if targets.removes("heads"):
        per_layer = [_head_plan(_need(scores.heads, "heads")[i], sizes, targets) for i in range(sizes.layers)]
        plan["heads"] = tuple(q for q, _ in per_layer)
        plan["kv_heads"] = tuple(kv for _, kv in per_layer)
    if targets.removes("hidden"):
        plan["hidden"] = top_indices(_need(scores.hidden, "hidden"), targets.hidden)
    return WidthPlan(**plan)


def _need(value, axis: str):
    if value is None:
        raise PrunelabError(f"width: no importance scores for axis '{axis}'")
    return value


def _head_plan(scores: torch.Tensor, sizes: WidthSizes, targets: WidthTargets) -> tuple[tuple[int, ...], tuple[int, ...]]:
    grouped = scores.detach().double().cpu().reshape(sizes.kv_heads, sizes.group)
    if targets.heads_mode == "groups":
        kv = top_indices(grouped.sum(1), targets.kv_heads)
        return tuple(g * sizes.group + j for g in kv for j in range(sizes.group)), kv
    per_group = targets.heads // sizes.kv_heads
    query = tuple(g * sizes.group + j for g in range(sizes.kv_heads) for j in top_indices(grouped[g], per_group))
    return query, tuple(range(sizes.kv_heads))


# ---------------------------------------------------------------------------- surgery
def _index(keep: Sequence[int], device) -> torch.Tensor:
    return torch.as_tensor(list(keep), dtype=torch.long, device=device)


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad))


@torch.no_grad()
def keep_rows(linear: nn.Linear, keep: Sequence[int]) -> None:
    """Keep these output features of a Linear (weight rows and bias entries)."""
    index = _index(keep, linear.weight.device)
    _replace(linear, "weight", linear.weight.index_select(0, index))
    if linear.bias is not None:
        _replace(linear, "bias", linear.bias.index_select(0, index))
    linear.out_features = len(index)


@torch.no_grad()
def keep_columns(linear: nn.Linear, keep: Sequence[int]) -> None:
    """Keep these input features of a Linear (weight columns; the bias is per output and stays)."""
    index = _index(keep, linear.weight.device)
    _replace(linear, "weight", linear.weight.index_select(1, index))
    linear.in_features = len(index)


def _set_int(module: nn.Module, name: str, value: int) -> None:
    """Update a size a module caches from its config (``intermediate_size``...), where it has one."""
    if isinstance(getattr(module, name, None), int) and not isinstance(getattr(module, name), bool):
        setattr(module, name, value)


def keep_mlp_channels(parts: LayerParts, keep: Sequence[int]) -> None:
    """Keep these intermediate channels of one MLP: rows of gate/up, columns of down."""
    keep_rows(parts.gate, keep)
    keep_rows(parts.up, keep)
    keep_columns(parts.down, keep)
    _set_int(parts.mlp, "intermediate_size", len(keep))


def check_heads(sizes: WidthSizes, query: Sequence[int], kv: Sequence[int]) -> None:
    """Kept heads must keep GQA's shape: sorted, each kept KV head keeping the same number of its queries."""
    for name, heads, total in (("query", query, sizes.heads), ("KV", kv, sizes.kv_heads)):
        if list(heads) != sorted(set(heads)) or not heads or heads[0] < 0 or heads[-1] >= total:
            raise PrunelabError(f"width: kept {name} heads must be distinct sorted indices below {total}, got {list(heads)}")
    counts = {g: 0 for g in kv}
    for head in query:
        group = head // sizes.group
        if group not in counts:
            raise PrunelabError(f"width: query head {head} is kept but its KV head {group} is not")
        counts[group] += 1
    if len(set(counts.values())) != 1:
        raise PrunelabError(f"width: every kept KV head must keep the same number of query heads, got {counts}")


def _head_rows(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def keep_heads(parts: LayerParts, sizes: WidthSizes, query: Sequence[int], kv: Sequence[int]) -> None:
    """Keep these query heads and KV heads of one attention (q/k/v rows with biases, o columns)."""
    check_heads(sizes, query, kv)
    rows = _head_rows(query, sizes.head_dim)
    keep_rows(parts.q, rows)
    keep_rows(parts.k, _head_rows(kv, sizes.head_dim))
    keep_rows(parts.v, _head_rows(kv, sizes.head_dim))
    keep_columns(parts.o, rows)
    _set_int(parts.attention, "num_key_value_groups", len(query) // len(kv))
    _set_int(parts.attention, "num_heads", len(query))
    _set_int(parts.attention, "num_attention_heads", len(query))
    _set_int(parts.attention, "num_key_value_heads", len(kv))


@torch.no_grad()
def _keep_norm(norm: nn.Module, index: torch.Tensor) -> None:
    _replace(norm, "weight", norm.weight.index_select(0, index.to(norm.weight.device)))
    if getattr(norm, "bias", None) is not None:
        _replace(norm, "bias", norm.bias.index_select(0, index.to(norm.bias.device)))
    if isinstance(getattr(norm, "normalized_shape", None), tuple):
        norm.normalized_shape = (len(index),)


def norm_gain_offset(norm: nn.Module) -> float:
    """0 when a norm scales by its weight (Llama), 1 when by (1 + weight) (Gemma): found by probing it."""
    with torch.no_grad():
        weight = norm.weight
        probe = norm(torch.ones(1, weight.numel(), dtype=weight.dtype, device=weight.device))[0].float()
        tolerance = dict(rtol=2e-2, atol=2e-2) if weight.dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
        for offset in (0.0, 1.0):
            if torch.allclose(probe, weight.float() + offset, **tolerance):
                return offset
    raise PrunelabError(f"width: cannot tell how norm {type(norm).__name__} applies its weight")


@torch.no_grad()
def _scale_gain(norm: nn.Module, factor: float) -> None:
    """Multiply a norm's effective gain by ``factor`` (for (1 + w) norms: w -> (1 + w) * factor - 1)."""
    offset = norm_gain_offset(norm)
    norm.weight.copy_((norm.weight.float() + offset).mul(factor).sub(offset).to(norm.weight.dtype))


def _embedding_scale(embedding: nn.Module) -> torch.Tensor | None:
    scale = getattr(embedding, "embed_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


@torch.no_grad()
def keep_hidden_channels(adapter: Adapter, sizes: WidthSizes, keep: Sequence[int]) -> dict[str, Any]:
    """Keep these residual-stream channels everywhere; returns what was done to a run-time embedding scale."""
    index = _index(keep, adapter.embedding.weight.device)
    tied = adapter.tied
    _replace(adapter.embedding, "weight", adapter.embedding.weight.index_select(1, index))
    adapter.embedding.embedding_dim = len(index)
    if tied:
        adapter.head.weight = adapter.embedding.weight
        adapter.head.in_features = len(index)
    else:
        keep_columns(adapter.head, keep)
    for layer_index in range(adapter.num_layers):
        parts = layer_parts(adapter, layer_index)
        for linear in (parts.q, parts.k, parts.v, parts.gate, parts.up):
            keep_columns(linear, keep)
        for linear in (parts.o, parts.down):
            keep_rows(linear, keep)
        for norm in parts.norms:
            _keep_norm(norm, index)
        _set_int(adapter.layers[layer_index], "hidden_size", len(index))
        _set_int(parts.mlp, "hidden_size", len(index))
        _set_int(parts.attention, "hidden_size", len(index))
    final = stream_norms(adapter, sizes.hidden)
    for norm in final:
        _keep_norm(norm, index)
    return _rescale_embedding(adapter, sizes.hidden, len(index), final, tied)


def _rescale_embedding(adapter: Adapter, before: int, after: int, final: list[nn.Module], tied: bool) -> dict[str, Any]:
    """Keep a sqrt(hidden_size) embedding scale right: the reloaded model computes it from the new config."""
    scale = _embedding_scale(adapter.embedding)
    if scale is None or not math.isclose(float(scale), before ** 0.5, rel_tol=1e-3):
        return {}
    new_scale = after ** 0.5
    factor = float(scale) / new_scale
    adapter.embedding.weight.mul_(factor)
    scale.fill_(new_scale)
    if hasattr(adapter.embedding, "scalar_embed_scale"):
        adapter.embedding.scalar_embed_scale = new_scale
    if tied:
        if len(final) != 1:
            raise _unknown(adapter, "a tied, scaled embedding needs exactly one final norm to compensate in")
        _scale_gain(final[0], 1 / factor)
    return {"embed_scale": [float(scale.new_tensor(before ** 0.5)), new_scale],
            "embedding_multiplied_by": factor, "final_norm_gain_divided_by": factor if tied else None}


def _set_config(adapter: Adapter, values: Mapping[str, int]) -> dict[str, list[int | None]]:
    """Write the new sizes into the (text) config; returns {key: [before, after]}."""
    changed = {}
    configs = {id(c): c for c in (adapter.text_config, adapter.model.config)}
    for key, value in values.items():
        before = getattr(adapter.text_config, key, None)
        for config in configs.values():
            if config is adapter.text_config or hasattr(config, key):
                setattr(config, key, value)
        if before != value:
            changed[key] = [before, value]
    return changed


def check_plan(adapter: Adapter, sizes: WidthSizes, plan: WidthPlan) -> None:
    """Refuse a plan whose layers keep different counts or indices out of range (before any change)."""
    def check_axis(name: str, per_layer, total: int) -> None:
        if per_layer is None:
            return
        if len(per_layer) != sizes.layers:
            raise PrunelabError(f"width: plan '{name}' gives {len(per_layer)} layers, the model has {sizes.layers}")
        if len({len(k) for k in per_layer}) != 1:
            raise PrunelabError(f"width: plan '{name}' keeps different counts per layer; a standard config needs one")
        for keep in per_layer:
            if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= total:
                raise PrunelabError(f"width: plan '{name}' must keep distinct sorted indices in 0..{total - 1}")
    check_axis("mlp", plan.mlp, sizes.intermediate)
    check_axis("heads", plan.heads, sizes.heads)
    check_axis("kv_heads", plan.kv_heads, sizes.kv_heads)
    check_axis("hidden", None if plan.hidden is None else (plan.hidden,) * sizes.layers, sizes.hidden)
    if (plan.heads is None) != (plan.kv_heads is None):
        raise PrunelabError("width: a plan keeps heads and kv_heads together")
    if plan.heads is not None:
        for query, kv in zip(plan.heads, plan.kv_heads, strict=True):
            check_heads(sizes, query, kv)
    if plan.hidden is not None:
        _check_outer_parameters(adapter, sizes.hidden)


def apply_width(model_or_adapter, plan: WidthPlan) -> dict[str, Any]:
    """Keep the plan's channels in place, update the config, keep a tied head tied; returns the record.

    The record (for ``prunelab.json``) holds the kept indices per axis, the config values before and
    after, and the new shapes of layer 0's and the outer parameters.
    """
    adapter = as_adapter(model_or_adapter)
    sizes = width_sizes(adapter)
    check_plan(adapter, sizes, plan)
    new: dict[str, int] = {}
    kept: dict[str, Any] = {}
    if plan.mlp is not None:
        for index, keep in enumerate(plan.mlp):
            keep_mlp_channels(layer_parts(adapter, index), keep)
        new["intermediate_size"] = len(plan.mlp[0])
        kept["mlp"] = [list(k) for k in plan.mlp]
    if plan.heads is not None:
        for index, (query, kv) in enumerate(zip(plan.heads, plan.kv_heads, strict=True)):
            keep_heads(layer_parts(adapter, index), sizes, query, kv)
        new |= {"num_attention_heads": len(plan.heads[0]), "num_key_value_heads": len(plan.kv_heads[0])}
        kept["heads"] = [list(q) for q in plan.heads]
        kept["kv_heads"] = [list(kv) for kv in plan.kv_heads]
    scale: dict[str, Any] = {}
    if plan.hidden is not None:
        scale = keep_hidden_channels(adapter, sizes, plan.hidden)
        new["hidden_size"] = len(plan.hidden)
        kept["hidden"] = list(plan.hidden)
    new["head_dim"] = sizes.head_dim  # explicit: hidden/heads no longer gives it
    record = {"kept": kept, "config": _set_config(adapter, new), "shapes": parameter_shapes(adapter)}
    if scale:
        record["embedding_scale"] = scale
    return record


def parameter_shapes(adapter: Adapter) -> dict[str, list[int]]:
    """The shapes of layer 0's parameters and of those outside the layers (every layer has layer 0's)."""
    layer_ids = {id(p) for p in adapter.layers.parameters()}
    shapes = {f"layers.0.{name}": list(p.shape) for name, p in adapter.layers[0].named_parameters()}
    shapes |= {name: list(p.shape) for name, p in adapter.model.named_parameters() if id(p) not in layer_ids}
    return shapes


def width_summary(before: WidthSizes, after: WidthSizes,
                  requested: Mapping[str, float] | None = None) -> dict[str, dict[str, float | int]]:
    """Per axis: the size before and after (read from the modules), the fraction removed (achieved)
    and, for an axis an option sets, the fraction asked for (``requested_fraction``)."""
    rows = {}
    for axis, attr in (("mlp", "intermediate"), ("heads", "heads"), ("kv_heads", "kv_heads"), ("hidden", "hidden")):
        old, new = getattr(before, attr), getattr(after, attr)
        rows[axis] = {"before": old, "after": new, "removed_fraction": round(1 - new / old, 6)}
        if requested is not None and axis in requested:
            rows[axis]["requested_fraction"] = float(requested[axis])
    return rows


def prune_width(model_or_adapter, targets: WidthTargets, scores: WidthScores) -> dict[str, Any]:
    """Plan from scores, apply, and return the strategy report (``width``: sizes, kept, config, shapes).

    The one call a width strategy needs after ``width_targets`` and its own importance scores.
    """
    adapter = as_adapter(model_or_adapter)
    plan = plan_width(targets, scores)
    record = apply_width(adapter, plan)
    after = width_sizes(adapter)  # measured: the variant's name must be what was done
    wanted = (targets.mlp, targets.heads, targets.kv_heads, targets.hidden)
    if (after.intermediate, after.heads, after.kv_heads, after.hidden) != wanted:
        raise PrunelabError(f"width: asked for (mlp, heads, kv_heads, hidden) = {wanted}, the model has "
                            f"{(after.intermediate, after.heads, after.kv_heads, after.hidden)}")
    return {"width": {"axes": width_summary(targets.sizes, after, targets.requested), "heads_mode": targets.heads_mode,
                      "round_to": targets.round_to, **record}}
