"""Architecture adapter: where the decoder layers, linears, embedding and head live in a model.

One generic path covers the Hugging Face decoder-only families (Qwen3, Qwen2, Llama, Gemma3,
Mistral, Phi, ...): ``get_decoder()`` or the longest ``ModuleList`` of decoder layers. Nothing here
assumes Llama's shapes: Qwen3's q_norm/k_norm, tied embeddings and GQA with head_dim !=
hidden/heads are read from the modules themselves, not recomputed from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.errors import PrunelabError


@dataclass
class Adapter:
    """Handles on the parts of a causal LM that pruning and scoring need."""

    model: nn.Module
    decoder: nn.Module  # the base model: embeddings -> layers -> final norm
    layers: nn.ModuleList
    layers_owner: nn.Module  # the module whose attribute ``layers_attr`` is ``layers``
    layers_attr: str
    embedding: nn.Module
    head: nn.Module
    tied: bool

    @property
    def text_config(self):
        config = self.model.config
        return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def linear_modules(self, layer_index: int) -> dict[str, nn.Linear]:
        """The Linear modules inside one decoder layer, by their name within the layer."""
        return {
            name: module
            for name, module in self.layers[layer_index].named_modules()
            if isinstance(module, nn.Linear)
        }

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-style final soft-capping of the logits (``final_logit_softcapping``); None: no capping."""
        return getattr(self.text_config, "final_logit_softcapping", None) or None

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the output head (and Gemma-style final soft-capping) to selected hidden states only."""
        return output_logits(self.head, hidden, self.logit_softcap)

    @property
    def adds_bos(self) -> bool:
        """Whether prompts start with BOS, as lm-evaluation-harness does (only Gemma needs it)."""
        model_type = getattr(self.text_config, "model_type", "") or ""
        return model_type.startswith("gemma")


def output_logits(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                  softcap: float | None) -> torch.Tensor:
    """Logits of final hidden states: the head, then soft-capping ``tanh(x / cap) * cap`` where the model has one.

    The one place logits are made from hidden states: a model's own head (``Adapter.head_logits``)
    and the dense model's head a study keeps for variants whose head differs
    (``prunelab.evaluate.DenseHead``) both go through it, so the two cannot drift apart.
    """
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def adapt(model: nn.Module) -> Adapter:
    """Find the decoder stack of a Hugging Face causal LM, or fail with a clear message."""
    name = type(model).__name__
    decoder = _find_decoder(model)
    if decoder is None:
        raise PrunelabError(f"unsupported model {name}: no decoder layer stack found")
    owner, attr, layers = _find_layers(decoder)
    if layers is None:
        raise PrunelabError(f"unsupported model {name}: its decoder has no list of layers")
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is None or head is None:
        raise PrunelabError(f"unsupported model {name}: no input embedding or output head")
    tied = getattr(head, "weight", None) is not None and head.weight is embedding.weight
    return Adapter(model, decoder, layers, owner, attr, embedding, head, tied)


def _find_decoder(model: nn.Module) -> nn.Module | None:
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if decoder is not None and decoder is not model:
            return decoder
    return getattr(model, "model", None)


def _find_layers(decoder: nn.Module) -> tuple[nn.Module | None, str, nn.ModuleList | None]:
    """The decoder's own ``layers`` list, else its longest ModuleList (e.g. GPT-2 style ``h``)."""
    if isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder, "layers", decoder.layers
    best: tuple[nn.Module | None, str, nn.ModuleList | None] = (None, "", None)
    for attr, child in decoder.named_children():
        if isinstance(child, nn.ModuleList) and (best[2] is None or len(child) > len(best[2])):
            best = (decoder, attr, child)
    return best


def as_adapter(obj) -> Adapter:
    """An Adapter from an Adapter, a LoadedModel or a bare Hugging Face model."""
    if isinstance(obj, Adapter):
        return obj
    adapter = getattr(obj, "adapter", None)
    return adapter if isinstance(adapter, Adapter) else adapt(obj)


def layer_input(args: tuple, kwargs: dict):
    """The hidden states a decoder layer was called with (positionally or as ``hidden_states=``).

    Forward hooks that record or replace a layer's input (layer scores, the layer sweep) read it here.
    """
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output):
    """The hidden states a decoder layer returned (some architectures return a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output
