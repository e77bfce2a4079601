"""Layer removal: a consistent model on every family (cache slots, config, per-layer lists), that
reloads with plain transformers to the same logits and still generates with a KV cache."""

from __future__ import annotations

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.model.surgery import drop_layers, parse_layer_indices
from prunelab.prune.api import prune

from ..conftest import random_model, tiny_config

PROMPT = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 315, 279, 6, 7, 8, 9]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def greedy(model, use_cache: bool) -> list[int]:
    out = model.generate(PROMPT, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, PROMPT.shape[1]:].tolist()


def reload(folder):
    """Plain transformers, no prunelab (tokenizer loading is skipped: it takes seconds)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "gemma3"])
def test_drop_layers_save_reload_generate(tiny_models, tmp_path, arch):
    loaded = adapt(reload(tiny_models[arch]))
    original_layers = list(loaded.layers)
    dense_logits = logits_of(loaded.model)

    report = drop_layers(loaded, "0,2")

    assert report["layers_before"] == 4 and report["layers_after"] == 2
    assert list(loaded.layers) == [original_layers[1], original_layers[3]]
    assert loaded.model.config.get_text_config().num_hidden_layers == 2
    slots = [m.layer_idx for layer in loaded.layers for m in layer.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(slots)) == [0, 1]
    pruned_logits = logits_of(loaded.model)
    assert not torch.allclose(pruned_logits, dense_logits)  # the layers really went

    loaded.model.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert len(reloaded.get_decoder().layers) == 2
    # the reloaded layer 0 is the original layer 1: weights moved with their layer
    for (name, p), (_, q) in zip(original_layers[1].named_parameters(),
                                 reloaded.get_decoder().layers[0].named_parameters(), strict=True):
        assert torch.equal(p, q), name
    torch.testing.assert_close(logits_of(reloaded), pruned_logits, rtol=0, atol=1e-5)

    cached = greedy(loaded.model, use_cache=True)
    assert cached == greedy(loaded.model, use_cache=False)  # the cache indexes the right layers
    assert cached == greedy(reloaded, use_cache=True)


def test_per_layer_lists_follow_the_kept_layers(tmp_path):
    """Gemma3 with mixed sliding/full layers and a tiny window: generation runs past the window,
    so a wrong ``layer_types`` entry or cache slot would change the tokens."""

    config = tiny_config("gemma3")
    config.sliding_window = 4
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    model = random_model(config).eval()
    model.generation_config.eos_token_id = None

    drop_layers(model, [0, 3])

    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    model.save_pretrained(tmp_path)
    reloaded = reload(tmp_path)
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    torch.testing.assert_close(logits_of(reloaded), logits_of(model), rtol=0, atol=1e-5)
    tokens = greedy(model, use_cache=True)
    assert tokens == greedy(model, use_cache=False) == greedy(reloaded, use_cache=True)


def test_dropping_through_the_strategy_and_file_size(tiny_qwen3, tmp_path):
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    layer_size = sum(p.numel() for p in loaded.adapter.layers[1].parameters())
    report = prune(loaded, "drop-layers", layers="1-2")
    assert report["dropped_layers"] == [1, 2]
    assert report["parameters"]["before"] - report["parameters"]["after"] == 2 * layer_size
    loaded.model.save_pretrained(tmp_path)
    saved, source = (tmp_path / "model.safetensors").stat().st_size, (tiny_qwen3 / "model.safetensors").stat().st_size
    assert source - saved == pytest.approx(2 * layer_size * 4, rel=0.01)  # float32: 4 bytes a weight


@pytest.mark.parametrize(("spec", "expected"), [
    ("3,7,12", [3, 7, 12]), ("0-3", [0, 1, 2, 3]), (" 12, 0-1 ,5 ", [0, 1, 5, 12]), ("[3, 7]", [3, 7]),
    ([7, 3], [3, 7]), ("4-4", [4]),
])
def test_parse_layer_indices(spec, expected):
    assert list(parse_layer_indices(spec)) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("3,3", "duplicate layer indices [3]"), ("0-3,2", "duplicate layer indices [2]"), ("3-1", "empty range"),
    ("a", "cannot read layer index"), ("-1", "cannot read layer index"), ([1, -2], "negative"), ([1.5], "not a layer index"),
])
def test_parse_layer_indices_errors(spec, message):
    with pytest.raises(PrunelabError, match="layers .*" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_layer_indices(spec)


@pytest.mark.parametrize(("spec", "message"), [
    ("2,4", r"out of range: the model has layers 0-3"),
    ("0-3", "cannot drop all 4 layers"),
    ("", "no layers to drop"),
    ("1,1", "duplicate"),
])
def test_drop_layers_errors_leave_the_model_alone(tiny_qwen3, spec, message):
    loaded = adapt(reload(tiny_qwen3))
    layers = list(loaded.layers)
    with pytest.raises(PrunelabError, match=message):
        drop_layers(loaded, spec)
    assert list(loaded.layers) == layers and loaded.model.config.num_hidden_layers == 4


def test_drop_layers_strategy_requires_layers(tiny_qwen3):
    loaded = reload(tiny_qwen3)
    with pytest.raises(PrunelabError, match="option 'layers' is required"):
        prune(loaded, "drop-layers")
    with pytest.raises(PrunelabError, match="option 'layers': duplicate"):
        prune(loaded, "drop-layers", layers="1,1")


def test_token_id_lists_are_not_mistaken_for_per_layer_lists():
    """Two layers and two end tokens: only the real per-layer list is filtered."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", vocab_size=64)
    config.num_hidden_layers = 2
    config.eos_token_id = [5, 6]
    config.layer_types = ["full_attention", "full_attention"]
    model = AutoModelForCausalLM.from_config(config)
    report = drop_layers(model, "0")
    assert model.config.eos_token_id == [5, 6]
    assert model.config.layer_types == ["full_attention"] and model.config.num_hidden_layers == 1
    assert report["config_updated"] == ["num_hidden_layers", "layer_types"]
