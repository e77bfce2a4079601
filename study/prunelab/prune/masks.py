"""The shared pruning core: which weights to prune, exact masks, re-masking, reports, ``prune()``.

Every weight-pruning strategy (magnitude, Wanda, SparseGPT, third-party ones) is built from these
pieces so that the subtle parts are written once:

* **targets** — by default only the weights of the ``nn.Linear`` modules inside the decoder layers.
  The original study also pruned embeddings, the (tied) output head and the norms, which wrecks a
  model at any sparsity; including them stays possible (to reproduce it) but warns.
* **exact masks** — the k weights to prune are chosen by *index* (top-k / k-th value with an
  explicit tie-break), never with ``score <= threshold``: with ties at the threshold a comparison
  over- or under-prunes, so the achieved sparsity would not be the requested one.
* **kept masks** — a ``MaskSet`` re-applies the zeros after any later weight update (fine-tuning,
  SparseGPT's reconstruction) and saves to safetensors.
* **achieved sparsity** — reports count the zeros actually present, never echo the request.

Conventions. Target names are relative to the architecture adapter, so they read the same on every
family: ``layers.3.self_attn.q_proj.weight`` (inside decoder layer 3), ``embedding.weight``,
``head.weight`` and ``decoder.<path>`` for other decoder parameters (the final norm). User-facing
sparsity (options, CLI, reports) is a **percentage** in [0, 100]; the tensor primitives below take a
**fraction** in [0, 1] and reject anything larger, so the two can never be silently confused.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter, as_adapter
from prunelab.options import Option

SCOPES = ("global", "layer", "row")
ORDERS = ("smallest", "largest")
UNSTRUCTURED = "unstructured"
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


class PruningTargetWarning(UserWarning):
    """Embeddings, head, norms or biases are being pruned: the original study's mistake."""


# --------------------------------------------------------------------------------------------
# Options shared by the weight-pruning strategies
# --------------------------------------------------------------------------------------------


class Percentage(float):
    """A sparsity percentage in [0, 100], parsed from what users write.

    ``50``, ``"50"`` and ``"50%"`` mean 50 %. A number strictly between 0 and 1 is read as a
    fraction (``0.5`` -> 50 %), because nobody prunes half a percent by accident; to really ask for
    less than 1 %, write the percent sign (``"0.5%"``). ``1`` means 1 %, ``0`` means dense. The
    range itself is checked by the option (see ``sparsity_option``), so 150 gets a clear message.

    The value is read **once**: a ``Percentage`` passed in again (the CLI validates options, then
    ``prune`` validates them again and ``resolve_sparsity`` reads them a third time) is returned
    unchanged. Reading the already-normalised 0.5 (percent) as a fraction again was issue #26's
    bug: ``"0.5%"`` pruned 50 % and ``0.002`` 20 %.
    """

    def __new__(cls, value: Any) -> Percentage:
        if isinstance(value, Percentage):  # already read: reading it again must not rescale 0.5 % to 50 %
            return value
        if isinstance(value, bool):
            raise TypeError(value)
        explicit_percent = isinstance(value, str) and value.strip().endswith("%")
        number = float(value.strip().removesuffix("%")) if isinstance(value, str) else float(value)
        if math.isnan(number):
            raise ValueError(value)
        if not explicit_percent and 0 < number < 1:
            number *= 100
        return super().__new__(cls, number)

    def __getnewargs__(self) -> tuple[str]:
        """Pickled (Ray, process pools) as ``"0.5%"``: unpickling calls ``__new__`` again, and a bare
        0.5 would be read as a fraction (50 %)."""
        return (f"{float(self)!r}%",)

    @property
    def fraction(self) -> float:
        return float(self) / 100


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive weights; ``"unstructured"`` -> None."""
    text = str(pattern).strip().lower()
    if text == UNSTRUCTURED:
        return None
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if not match:
        raise PrunelabError(f"pattern must be 'unstructured' or N:M such as 2:4 or 4:8, got {pattern!r}")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise PrunelabError(f"pattern {pattern!r}: need 0 < N < M (keep N of every M weights)")
    return n, m


def _check_percentage(value: float) -> str | None:
    return None if 0 <= value <= 100 else f"must be a percentage in [0, 100] (or a fraction), got {value:g}"


def _check_pattern(value: str) -> str | None:
    try:
        parse_pattern(value)
    except PrunelabError as exc:
        return str(exc)
    return None


def sparsity_option(default: float | None = None) -> Option:
    """The one ``sparsity`` option: a percentage (see ``Percentage``); None = 50 %, or implied by N:M."""
    return Option(
        "sparsity", Percentage, default,
        "share of target weights to prune, percent in [0, 100] (a fraction < 1 is accepted; "
        "default 50, or 100*(1-N/M) with an N:M pattern)",
        check=_check_percentage,
    )


def pattern_option() -> Option:
    """The one ``pattern`` option: ``unstructured`` or N:M semi-structured (``2:4``, ``4:8``)."""
    return Option(
        "pattern", str, UNSTRUCTURED,
        "unstructured, or N:M = keep N of every M consecutive input weights of a row (2:4, 4:8)",
        check=_check_pattern,
    )


def target_options() -> tuple[Option, ...]:
    """Flags that widen the targets beyond the decoder Linear weights (each one warns when used)."""
    return (
        Option("include_embeddings", bool, False, "also prune the input embedding (warns)"),
        Option("include_head", bool, False, "also prune the output head; tied heads are the embedding (warns)"),
        Option("include_norms", bool, False, "also prune norm weights, incl. q_norm/k_norm (warns)"),
        Option("include_biases", bool, False, "also prune Linear biases (warns)"),
    )


def weight_pruning_options(default_sparsity: float | None = None) -> tuple[Option, ...]:
    """sparsity + pattern + target flags: the options every weight-pruning strategy shares."""
    return (sparsity_option(default_sparsity), pattern_option(), *target_options())


def check_sparsity_pattern(options: Mapping[str, Any], owner: str = "options") -> None:
    """An N:M pattern fixes the sparsity at 100*(1-N/M); a different explicit sparsity is an error."""
    if "pattern" not in options or options.get("sparsity") is None:
        return
    nm = parse_pattern(options["pattern"])
    if nm is None:
        return
    implied = 100 * (1 - nm[0] / nm[1])
    if not math.isclose(float(options["sparsity"]), implied, abs_tol=1e-6):
        raise PrunelabError(
            f"{owner}: pattern {options['pattern']} means {implied:g}% sparsity, "
            f"which contradicts sparsity {float(options['sparsity']):g}% (drop one of them)"
        )


def resolve_sparsity(options: Mapping[str, Any]) -> tuple[float, tuple[int, int] | None]:
    """(fraction to prune, N:M or None) from validated options; unstructured defaults to 50 %."""
    check_sparsity_pattern(options)
    nm = parse_pattern(options.get("pattern") or UNSTRUCTURED)
    if nm is not None:
        return 1 - nm[0] / nm[1], nm
    sparsity = options.get("sparsity")
    return (Percentage(50).fraction if sparsity is None else Percentage(sparsity).fraction), None


def prunes_to_a_sparsity(strategy) -> bool:
    """Whether a strategy takes the core's ``sparsity`` option (``sparsity_option``): its own
    declaration, recognised by the option's type, so a third-party strategy is checked as a built-in."""
    return any(option.type is Percentage for option in strategy.options)


def check_achieved_sparsity(strategy, options: Mapping[str, Any], masks: Mapping[str, torch.Tensor] | None) -> None:
    """Stop (one line) when the weights a strategy masked are not the share it was asked for.

    Counted on the strategy's masks (so weights that were already zero do not count), against the
    requested fraction of the masked weights; the tolerance is one weight per row of every masked
    tensor: a row is the finest group any strategy ranks in (magnitude per layer or row, Wanda per
    row, SparseGPT per block of columns), and each group rounds its count to the nearest weight.
    OWL's per-layer allocation averages to the target, so it passes the same check. A strategy
    without masks or without the ``sparsity`` option is not checked.
    """
    if not masks or not prunes_to_a_sparsity(strategy):
        return
    fraction, _ = resolve_sparsity(options)
    total = sum(keep.numel() for keep in masks.values())
    pruned = sum(int((~keep).sum()) for keep in masks.values())
    rows = sum(keep.shape[0] if keep.ndim > 1 else 1 for keep in masks.values())
    requested = fraction * total
    if abs(pruned - requested) > rows:
        raise PrunelabError(
            f"strategy '{strategy.name}': asked for {100 * fraction:g}% sparsity but pruned "
            f"{100 * pruned / total:.4g}% ({pruned:,} of {total:,} weights; allowed: within {rows:,})")


def validate_options(strategy, values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a strategy's options before any model is loaded, including cross-option checks.

    Use this (not ``strategy.option_set.validate`` alone) in the CLI, study files and ``prune``.
    """
    options = strategy.option_set.validate(values)
    check_sparsity_pattern(options, f"strategy '{strategy.name}'")
    return options


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def select_targets(
    adapter: Adapter,
    include_embeddings: bool = False,
    include_head: bool = False,
    include_norms: bool = False,
    include_biases: bool = False,
) -> dict[str, nn.Parameter]:
    """The parameters to prune, by adapter-relative name (see the module docstring).

    Default: the weight of every ``nn.Linear`` inside the decoder layers (attention and MLP
    projections). A tied head *is* the embedding, so it appears once (as ``embedding.weight`` when
    embeddings are included, else ``head.weight``) and is never counted twice.
    """
    targets: dict[str, nn.Parameter] = {}
    for index, layer in enumerate(adapter.layers):
        for module_name, module in layer.named_modules():
            prefix = f"layers.{index}.{module_name}." if module_name else f"layers.{index}."
            if isinstance(module, nn.Linear):
                targets[prefix + "weight"] = module.weight
                if include_biases and module.bias is not None:
                    targets[prefix + "bias"] = module.bias
            elif include_norms and _is_norm(module):
                for pname, param in module.named_parameters(recurse=False):
                    targets[prefix + pname] = param
    extras = []
    if include_norms:
        in_layers = {id(m) for layer in adapter.layers for m in layer.modules()}
        for module_name, module in adapter.decoder.named_modules():
            if _is_norm(module) and id(module) not in in_layers:
                for pname, param in module.named_parameters(recurse=False):
                    targets[f"decoder.{module_name}.{pname}"] = param
        extras.append("norms")
    if include_biases:
        extras.append("biases")
    if include_embeddings:
        targets["embedding.weight"] = adapter.embedding.weight
        extras.append("embeddings")
    if include_head:
        if not (adapter.tied and include_embeddings):
            targets["head.weight"] = adapter.head.weight
        if include_biases and getattr(adapter.head, "bias", None) is not None:
            targets["head.bias"] = adapter.head.bias
        extras.append("the output head" + (" (tied to the embedding)" if adapter.tied else ""))
    if extras:
        warnings.warn(
            f"pruning {', '.join(extras)} as well as the decoder Linear weights: this is the original "
            "study's all-parameters variant and damages the model far more than pruning the Linears",
            PruningTargetWarning, stacklevel=2,
        )
    return _dedupe(targets)


def _dedupe(targets: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Drop a second name for the same tensor (shared/tied parameters are pruned and counted once)."""
    seen: set[int] = set()
    unique: dict[str, nn.Parameter] = {}
    for name, param in targets.items():
        if id(param) not in seen:
            seen.add(id(param))
            unique[name] = param
    return unique


def targets_from_options(adapter: Adapter, options: Mapping[str, Any]) -> dict[str, nn.Parameter]:
    """``select_targets`` with the include flags of validated options (missing flags are False)."""
    flags = ("include_embeddings", "include_head", "include_norms", "include_biases")
    return select_targets(adapter, **{flag: bool(options.get(flag, False)) for flag in flags})


def layer_index_of(name: str) -> int | None:
    """The decoder layer a target name lies in (``layers.3.mlp.up_proj.weight`` -> 3), else None."""
    match = _LAYER_NAME.match(name)
    return int(match[1]) if match else None


def resolve_parameter(adapter: Adapter, name: str) -> nn.Parameter:
    """The parameter behind an adapter-relative target name (inverse of ``select_targets``)."""
    try:
        if match := _LAYER_NAME.match(name):
            return adapter.layers[int(match[1])].get_parameter(match[2])
        if name.startswith("embedding."):
            return adapter.embedding.get_parameter(name.removeprefix("embedding."))
        if name.startswith("head."):
            return adapter.head.get_parameter(name.removeprefix("head."))
        if name.startswith("decoder."):
            return adapter.decoder.get_parameter(name.removeprefix("decoder."))
    except (AttributeError, IndexError):
        pass
    raise PrunelabError(f"no parameter '{name}' in this model (was it pruned from a different model?)")


# --------------------------------------------------------------------------------------------
# Scores and masks (keep-masks: True = keep, False = pruned)
# --------------------------------------------------------------------------------------------


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w| in float32 (bf16 has too few distinct values for a fair ranking)."""
    return weight.detach().abs().float()


def _check_fraction(sparsity: float) -> None:
    if not 0 <= sparsity <= 1:
        raise ValueError(f"mask primitives take a fraction in [0, 1], got {sparsity} (percent? divide by 100)")


def count_to_prune(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a fraction prunes: rounded half up, so |error| <= 0.5 weight."""
    _check_fraction(sparsity)
    return min(numel, math.floor(sparsity * numel + 0.5))


def _prune_k_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the ``k`` smallest entries of a 1-D tensor (ties broken by position)."""
    prune = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return prune
    if k >= flat.numel():
        return ~prune
    threshold = flat.kthvalue(k).values
    prune = flat < threshold
    at_threshold = (flat == threshold).nonzero().squeeze(1)
    prune[at_threshold[: k - int(prune.sum())]] = True
    return prune


def _keep_mask(scores: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Keep-mask of one tensor, pruning its smallest scores per tensor ('layer') or per row."""
    if scope == "row" and scores.dim() >= 2:
        rows = scores.reshape(scores.shape[0], -1)
        k = count_to_prune(rows.shape[1], sparsity)
        keep = torch.ones_like(rows, dtype=torch.bool)
        if k > 0:
            keep.scatter_(1, rows.topk(k, dim=1, largest=False).indices, False)
        return keep.reshape(scores.shape)
    flat = scores.reshape(-1)
    return ~_prune_k_flat(flat, count_to_prune(flat.numel(), sparsity)).reshape(scores.shape)


def mask_from_scores(
    scores: torch.Tensor | Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    order: str = "smallest",
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Keep-masks that prune a ``sparsity`` **fraction** of the weights with the lowest scores.

    ``scope``: 'global' ranks all tensors together, 'layer' each tensor (one Linear) on its own,
    'row' each output row (dim 0) on its own. ``order='largest'`` prunes the highest scores instead
    (the original study's variant). Exactly round(sparsity * size) weights are pruned in every
    group, whatever the ties. A single tensor in gives a single mask out.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    _check_fraction(sparsity)
    sign = 1.0 if order == "smallest" else -1.0
    if isinstance(scores, torch.Tensor):
        return _keep_mask(sign * scores, sparsity, "layer" if scope == "global" else scope)
    if scope != "global":
        return {name: _keep_mask(sign * s, sparsity, scope) for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([sign * scores[n].reshape(-1).float() for n in names])
    keep = ~_prune_k_flat(flat, count_to_prune(flat.numel(), sparsity))
    sizes = [scores[n].numel() for n in names]
    return {n: part.reshape(scores[n].shape) for n, part in zip(names, keep.split(sizes), strict=True)}


def nm_mask(scores: torch.Tensor, n: int, m: int, order: str = "smallest") -> torch.Tensor:
    """Keep-mask keeping the ``n`` highest scores of every ``m`` consecutive input weights of a row.

    Groups run along the last dimension (the input features of an ``nn.Linear`` weight), as sparse
    tensor cores expect. ``order='largest'`` keeps the ``n`` lowest instead.
    """
    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got {n}:{m}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if scores.shape[-1] % m:
        raise PrunelabError(f"{n}:{m} pattern needs the input size to be a multiple of {m}, got {scores.shape[-1]}")
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1, largest=(order == "smallest")).indices, True)
    return keep.reshape(scores.shape)


@torch.no_grad()
def apply_mask(param: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the pruned entries of ``param`` in place."""
    param.masked_fill_(~keep.to(param.device), 0)


class MaskSet(dict):
    """Keep-masks by adapter-relative target name; re-masks a model after any later weight update."""

    def apply(self, model_or_adapter) -> None:
        """Zero every masked-out weight of the model again (e.g. after fine-tuning or reconstruction)."""
        adapter = as_adapter(model_or_adapter)
        for name, keep in self.items():
            param = resolve_parameter(adapter, name)
            if param.shape != keep.shape:
                raise PrunelabError(f"mask '{name}' has shape {tuple(keep.shape)}, the model {tuple(param.shape)}")
            apply_mask(param, keep)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({name: keep.to("cpu", torch.bool).contiguous() for name, keep in self.items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        """Masks from a ``masks.safetensors``; a file that is not one is a ``FileProblem`` naming it."""
        from safetensors.torch import load_file

        from prunelab.errors import FileProblem
        from prunelab.readers import reading

        with reading(path, "not a valid masks file"):
            masks = load_file(str(path))
        for name, keep in masks.items():
            if keep.dtype != torch.bool:
                raise FileProblem(path, f"not a valid masks file: '{name}' is {keep.dtype}, masks are bool")
        return cls(masks)

    def sparsity(self) -> float:
        """Fraction of masked-out entries over all masks."""
        total = sum(keep.numel() for keep in self.values())
        return sum(int((~keep).sum()) for keep in self.values()) / total if total else 0.0


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _counts(zeros: int, total: int) -> dict[str, Any]:
    return {"zeros": zeros, "params": total, "sparsity_pct": round(100 * zeros / total, 6) if total else 0.0}


def sparsity_report(targets_or_model) -> dict[str, Any]:
    """Achieved sparsity (zeros actually present), per tensor, per decoder layer and in total.

    Takes a target dict (name -> tensor) or a model / LoadedModel / Adapter, whose default targets
    (the decoder Linear weights) are counted. Percentages are of the counted targets.
    """
    if isinstance(targets_or_model, Mapping):
        targets = targets_or_model
    else:
        targets = select_targets(as_adapter(targets_or_model))
    per_tensor: dict[str, dict[str, Any]] = {}
    per_layer: dict[str, list[int]] = {}
    zeros_total = params_total = 0
    for name, tensor in targets.items():
        zeros, total = int((tensor.detach() == 0).sum()), tensor.numel()
        per_tensor[name] = _counts(zeros, total)
        match = _LAYER_NAME.match(name)
        group = per_layer.setdefault(match[1] if match else name.split(".")[0], [0, 0])
        group[0] += zeros
        group[1] += total
        zeros_total += zeros
        params_total += total
    return {
        "total": _counts(zeros_total, params_total),
        "per_layer": {key: _counts(*value) for key, value in per_layer.items()},
        "per_tensor": per_tensor,
    }
