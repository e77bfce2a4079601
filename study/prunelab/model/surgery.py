"""Depth pruning: remove whole decoder layers and leave a consistent, saveable model.

Deleting modules from the ``ModuleList`` is the easy part. A consistent model also needs

* every remaining attention module's ``layer_idx`` renumbered 0..n-1, because the KV cache is
  indexed by it (a gap or a duplicate silently mixes the keys of two layers during generation);
* the config updated: ``num_hidden_layers`` and every per-layer list (``layer_types`` chooses the
  sliding/full attention mask and cache type of each layer in Gemma3/Qwen2/...), so the model saved
  with ``save_pretrained`` rebuilds exactly these layers with plain ``AutoModelForCausalLM``.

Per-layer config entries are found generically (any list as long as the old layer stack, except
token-id lists), not by architecture name. Lists of layer *indices* (e.g. MoE ``mlp_only_layers``)
are not renumbered; none of the supported dense families has one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from prunelab.errors import PrunelabError


class LayerIndices(tuple):
    """Sorted, distinct decoder-layer indices parsed from ``"3,7,12"``, ``"0-3"`` (inclusive) or a list.

    Duplicates (``"2,2"`` or overlapping ranges ``"0-3,2"``) are errors: a repeated index is almost
    always a typo in a sweep, and silently merging it would hide that. Whether the indices exist in
    a given model is checked by ``drop_layers``.
    """

    def __new__(cls, value: Any = ()) -> LayerIndices:
        if isinstance(value, str):
            indices = _parse_index_text(value)
        elif isinstance(value, Iterable):
            indices = [_as_index(v) for v in value]
        else:
            indices = [_as_index(value)]
        duplicates = sorted({i for i in indices if indices.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate layer indices {duplicates}")
        return super().__new__(cls, sorted(indices))


def _as_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise ValueError(f"not a layer index: {value!r}")
    if int(value) < 0:
        raise ValueError(f"negative layer index {value}")
    return int(value)


def _parse_index_text(text: str) -> list[int]:
    indices: list[int] = []
    text = text.strip().removeprefix("[").removesuffix("]")  # a list written into a study file
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            start, end = int(match[1]), int(match[2])
            if end < start:
                raise ValueError(f"empty range {part!r} (write low-high)")
            indices.extend(range(start, end + 1))
        elif part.isdigit():
            indices.append(int(part))
        else:
            raise ValueError(f"cannot read layer index {part!r} (use e.g. 3,7,12 or 0-3)")
    return indices


def parse_layer_indices(spec: str | Iterable[int]) -> LayerIndices:
    """``LayerIndices`` with a ``PrunelabError`` (one-line message) for bad input."""
    try:
        return LayerIndices(spec)
    except ValueError as exc:
        raise PrunelabError(f"layers {spec!r}: {exc}") from None


def single_layer(spec: Any) -> int | None:
    """The index when ``spec`` names exactly one layer (``3``, ``[3]``, ``"3"``), else None (also for bad specs)."""
    if spec is None:
        return None
    try:
        indices = LayerIndices(spec)
    except ValueError:
        return None
    return indices[0] if len(indices) == 1 else None


def check_layer_spec(spec: str) -> str | None:
    """Option check: the message for an unreadable index list, or None (for ``Option(check=...)``)."""
    try:
        LayerIndices(spec)
    except ValueError as exc:
        return str(exc)
    return None


def drop_layers(model_or_loaded, indices: str | Iterable[int]) -> dict[str, Any]:
    """Remove the given decoder layers in place; returns a small report of what was removed.

    Accepts a LoadedModel, an Adapter or a bare model; an adapter it holds is updated too.
    """
    from prunelab.model.adapter import as_adapter

    adapter = as_adapter(model_or_loaded)
    drop = parse_layer_indices(indices)
    old_count = len(adapter.layers)
    out_of_range = [i for i in drop if i >= old_count]
    if out_of_range:
        raise PrunelabError(f"layer indices {out_of_range} out of range: the model has layers 0-{old_count - 1}")
    if not drop:
        raise PrunelabError("no layers to drop (give indices such as 3,7,12 or 0-3)")
    keep = [i for i in range(old_count) if i not in set(drop)]
    if not keep:
        raise PrunelabError(f"cannot drop all {old_count} layers: at least one must remain")

    remaining = nn.ModuleList([adapter.layers[i] for i in keep])
    setattr(adapter.layers_owner, adapter.layers_attr, remaining)
    adapter.layers = remaining
    for new_index, layer in enumerate(remaining):
        _renumber(layer, new_index)
    changed = _update_config(adapter.text_config, old_count, keep)
    return {"dropped_layers": list(drop), "layers_before": old_count, "layers_after": len(keep),
            "config_updated": changed}


def _renumber(layer: nn.Module, index: int) -> None:
    """Set ``layer_idx`` (the KV cache slot) on the layer and every submodule that has one."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


# Lists that can have the layer count's length by coincidence (e.g. two end tokens, two layers).
_NOT_PER_LAYER = {"num_hidden_layers", "architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens"}


def _update_config(config, old_count: int, keep: list[int]) -> list[str]:
    """Set the layer count and filter every per-layer list; returns the names that changed."""
    changed = ["num_hidden_layers"]
    for key, value in list(config.to_dict().items()):
        if key in _NOT_PER_LAYER or key.endswith(("_token_id", "_token_ids")):
            continue
        current = getattr(config, key, value)
        if isinstance(current, (list, tuple)) and len(current) == old_count:
            setattr(config, key, type(current)(current[i] for i in keep))
            changed.append(key)
    config.num_hidden_layers = len(keep)
    return changed


def check_config_shapes(model: nn.Module, who: str = "the model") -> None:
    """Refuse a model whose weights do not fit the config it will be saved with, naming the tensor.

    A structural strategy that shrinks a tensor (an MLP's channels, a head) must update the config
    too, or the saved folder will not load (transformers refuses mismatched sizes with a traceback).
    The model class is built from the config on the meta device (no memory, no weights) and every
    state-dict entry's shape is compared with it.
    """
    import copy

    import torch

    state = model.state_dict()
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception as exc:  # any failure to build the class from this config is the same refusal
        raise PrunelabError(f"{who}: the config it would be saved with does not build a "
                            f"{type(model).__name__} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
    expected = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            raise PrunelabError(f"{who}: tensor {name} {tuple(tensor.shape)} has no place in the model its config "
                                "describes; update model.config with the structure")
        if tuple(tensor.shape) != want:
            raise PrunelabError(f"{who}: tensor {name} has shape {tuple(tensor.shape)} but the config it would be saved "
                                f"with gives {want}; update model.config with the new sizes")
    missing = [name for name in expected if name not in state]
    if missing:
        raise PrunelabError(f"{who}: tensor {missing[0]} that its config describes is missing from the model "
                            f"({len(missing)} missing); update model.config with the structure")
