"""Width surgery (prunelab.model.width) against independent references on tiny random models.

* Removing MLP channel j of a layer equals the dense model with that channel's activation (the
  input of down_proj) forced to zero by a forward hook.
* Removing a query head, or a whole KV group, equals the dense model with those heads' outputs
  zeroed before o_proj.
* Removing hidden channels that are zero everywhere in the stream equals the dense model whose
  stream norms have their gain multiplied by sqrt(H_new / H_old) (the RMS is then taken over the
  kept channels only: a hand derivation, written out in ``_norm_reference``).
* The saved folder loads in a fresh interpreter with plain transformers (no trust_remote_code) to
  the in-memory logits and generations; its parameter count equals a count by hand from config.json.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prunelab.errors import PrunelabError
from prunelab.model import WidthPlan, adapt, apply_width, width_sizes, width_targets

from ..conftest import ENV, random_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
VOCAB = 256
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def tiny(arch: str, **overrides):
    config = tiny_config(arch, vocab_size=VOCAB)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = random_model(config).eval()
    with torch.no_grad():  # Gemma's (1 + w) norms start at w = 0; random gains make the test see a wrong norm
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3) if "norm" in name else p.normal_(0, 0.2)
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tolerance * (1 + b.abs().max()))


def all_but(total: int, drop) -> tuple[int, ...]:
    return tuple(i for i in range(total) if i not in set(drop))


# ---------------------------------------------------------------------------- MLP channels
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_mlp_channels_equals_zeroing_their_activation(arch):
    dense = tiny(arch)
    layers = dense.model.layers
    removed = {index: (index * 7 % 128, (index * 13 + 5) % 128) for index in range(len(layers))}

    def zero_channels(drop):
        def hook(module, args):
            x = args[0].clone()
            x[..., list(drop)] = 0
            return (x,)
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(zero_channels(removed[i])) for i, layer in enumerate(layers)]
    reference = logits(dense)
    for handle in handles:
        handle.remove()
    assert not close(reference, logits(dense))  # the channels mattered

    pruned = copy.deepcopy(dense)
    record = apply_width(pruned, WidthPlan(mlp=tuple(all_but(128, removed[i]) for i in range(len(layers)))))
    assert close(logits(pruned), reference)
    assert pruned.config.intermediate_size == 126 and record["config"]["intermediate_size"] == [128, 126]
    assert record["kept"]["mlp"][0] == list(all_but(128, removed[0]))
    assert tuple(pruned.model.layers[0].mlp.gate_proj.weight.shape) == (126, 64)
    assert tuple(pruned.model.layers[0].mlp.down_proj.weight.shape) == (64, 126)


# ---------------------------------------------------------------------------- heads
def _zero_heads_reference(dense, heads_per_layer, head_dim):
    def hook_for(heads):
        def hook(module, args):
            x = args[0].clone()
            for h in heads:
                x[..., h * head_dim:(h + 1) * head_dim] = 0
            return (x,)
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook_for(heads_per_layer[i]))
               for i, layer in enumerate(dense.model.layers)]
    try:
        return logits(dense)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_query_heads_equals_zeroing_their_output(arch):
    dense = tiny(arch)
    sizes = width_sizes(adapt(dense))  # 4 query heads in 2 KV groups of 2
    removed = [(i % 2, 2 + (i + 1) % 2) for i in range(sizes.layers)]  # one query head of each group
    reference = _zero_heads_reference(dense, removed, sizes.head_dim)
    pruned = copy.deepcopy(dense)
    apply_width(pruned, WidthPlan(heads=tuple(all_but(4, r) for r in removed), kv_heads=((0, 1),) * sizes.layers))
    assert close(logits(pruned), reference)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 2)
    attention = pruned.model.layers[0].self_attn
    assert attention.q_proj.out_features == 2 * sizes.head_dim and attention.k_proj.out_features == 2 * sizes.head_dim
    if arch == "qwen2":  # q/k/v biases follow their rows
        assert attention.q_proj.bias.shape[0] == 2 * sizes.head_dim
    if arch == "qwen3":  # per-head norms act on head_dim and stay
        assert attention.q_norm.weight.shape[0] == sizes.head_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_a_kv_group_equals_zeroing_its_query_heads(arch):
    dense = tiny(arch)
    sizes = width_sizes(adapt(dense))
    groups = [i % 2 for i in range(sizes.layers)]  # the KV group each layer loses
    reference = _zero_heads_reference(dense, [(2 * g, 2 * g + 1) for g in groups], sizes.head_dim)
    pruned = copy.deepcopy(dense)
    apply_width(pruned, WidthPlan(heads=tuple(all_but(4, (2 * g, 2 * g + 1)) for g in groups),
                                  kv_heads=tuple(all_but(2, (g,)) for g in groups)))
    assert close(logits(pruned), reference)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)


def test_a_plan_that_breaks_gqa_is_refused():
    model = tiny("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    layers = len(model.model.layers)
    with pytest.raises(PrunelabError, match="same number of query heads"):  # 2 queries of group 0, 1 of group 1
        apply_width(model, WidthPlan(heads=((0, 1, 2),) * layers, kv_heads=((0, 1),) * layers))
    with pytest.raises(PrunelabError, match="KV head 1 is not"):
        apply_width(model, WidthPlan(heads=((0, 2),) * layers, kv_heads=((0,),) * layers))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # refused before any change


# ---------------------------------------------------------------------------- hidden channels
GEMMA_OFFSET = {"gemma3": 1.0}  # Gemma's RMSNorm multiplies by (1 + weight), the others by weight


def _zero_stream_channels(model, channels) -> None:
    """Make ``channels`` of the residual stream zero at every position: embedding columns, o/down rows."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight[channels, :] = 0
                if linear.bias is not None:
                    linear.bias[channels] = 0


def _norm_reference(model, arch: str, before: int, after: int) -> None:
    """RMS over the kept channels: mean(x^2) grows by before/after when the removed x are 0, so the
    pruned norm's output is the dense one times sqrt(after/before); the dense model matches it when
    every gain on the stream (hidden-sized norms) is multiplied by that factor."""
    factor = math.sqrt(after / before)
    offset = GEMMA_OFFSET.get(arch, 0.0)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in name and weight is not None and weight.dim() == 1 and weight.numel() == before:
                weight.copy_((weight + offset) * factor - offset)


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_zero_hidden_channels_equals_the_norm_derivation(arch):
    dense = tiny(arch, rms_norm_eps=1e-12)  # eps would break the exact scaling of mean(x^2)
    removed = [3, 10, 11, 40, 63, 0, 21, 22]
    _zero_stream_channels(dense, removed)
    reference_model = copy.deepcopy(dense)
    _norm_reference(reference_model, arch, 64, 64 - len(removed))
    reference = logits(reference_model)
    assert not close(reference, logits(dense))  # the norms do change: the derivation is needed

    pruned = copy.deepcopy(dense)
    record = apply_width(pruned, WidthPlan(hidden=all_but(64, removed)))
    assert close(logits(pruned), reference, 1e-4)
    assert pruned.config.hidden_size == 56 and record["config"]["hidden_size"] == [64, 56]
    tied = arch != "qwen2"
    assert (pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight) == tied
    assert pruned.model.norm.weight.shape[0] == 56
    if arch == "qwen3":
        assert pruned.model.layers[0].self_attn.q_norm.weight.shape[0] == 32  # per head, untouched
    if arch == "gemma3":  # the run-time sqrt(hidden) scale is the reloaded model's
        assert math.isclose(float(pruned.model.embed_tokens.embed_scale), 56 ** 0.5, rel_tol=1e-6)
        assert "embedding_scale" in record


def test_hidden_pruning_keeps_the_kept_channels_weights():
    """Surgery only selects: every kept weight is the dense one at the kept index (no scaling for Llama)."""
    dense = tiny("llama")
    keep = all_but(64, [1, 5, 9, 60])
    pruned = copy.deepcopy(dense)
    apply_width(pruned, WidthPlan(hidden=keep))
    index = torch.tensor(keep)
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight[:, index])
    layer, before = pruned.model.layers[2], dense.model.layers[2]
    assert torch.equal(layer.self_attn.q_proj.weight, before.self_attn.q_proj.weight[:, index])
    assert torch.equal(layer.mlp.down_proj.weight, before.mlp.down_proj.weight[index])
    assert torch.equal(layer.input_layernorm.weight, before.input_layernorm.weight[index])


# ---------------------------------------------------------------------------- the saved folder
FRESH = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor({ids})
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
save_file({{"logits": logits.contiguous(), "generated": out.contiguous(),
            "parameters": torch.tensor(sum(p.numel() for p in model.parameters()))}}, sys.argv[2])
"""


def hand_count(config: dict, arch: str) -> int:
    """Parameters of a Llama-like model from its config.json alone, counted by hand."""
    v, h, i, layers = config["vocab_size"], config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    attention = h * q + 2 * h * kv + q * h
    if arch == "qwen2":
        attention += q + 2 * kv  # q/k/v biases
    if arch in ("qwen3", "gemma3"):
        attention += 2 * config["head_dim"]  # q_norm, k_norm
    norms = 4 if arch == "gemma3" else 2
    per_layer = attention + 3 * h * i + norms * h
    head = 0 if config.get("tie_word_embeddings", True) else v * h
    return v * h + head + layers * per_layer + h


@pytest.mark.parametrize("arch,heads_mode", [("llama", "query"), ("qwen2", "groups"), ("qwen3", "query"), ("gemma3", "groups")])
def test_saved_folder_reloads_in_a_fresh_process(arch, heads_mode, tmp_path):
    from prunelab.model import WidthScores, prune_width

    model = tiny(arch)
    targets = width_targets(model, mlp=0.25, heads=0.5, hidden=0.25, heads_mode=heads_mode)
    sizes = targets.sizes
    g = torch.Generator().manual_seed(1)
    scores = WidthScores(mlp=[torch.rand(sizes.intermediate, generator=g) for _ in range(sizes.layers)],
                         heads=[torch.rand(sizes.heads, generator=g) for _ in range(sizes.layers)],
                         hidden=torch.rand(sizes.hidden, generator=g))
    report = prune_width(model, targets, scores)
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "pruned")
    script = FRESH.format(ids=IDS.tolist())
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pruned"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = load_file(tmp_path / "out.safetensors")
    assert close(fresh["logits"], logits(model), 1e-6)
    expected = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fresh["generated"], expected) and fresh["generated"].shape[1] == IDS.shape[1] + 6

    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    kv = 1 if heads_mode == "groups" else 2
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (48, 96, 2, kv, sizes.head_dim)
    assert int(fresh["parameters"]) == hand_count(config, arch) == sum(p.numel() for p in model.parameters())
    assert report["width"]["axes"]["mlp"] == {"before": 128, "after": 96, "removed_fraction": 0.25, "requested_fraction": 0.25}


# ---------------------------------------------------------------------------- what is refused
def test_targets_refuse_bad_fractions_naming_option_and_model():
    model = tiny("qwen3")
    for kwargs, message in [
        (dict(mlp=1.0), r"option 'mlp' = 1 .*\[0, 1\)"),
        (dict(hidden=-0.1), r"option 'hidden' = -0.1"),
        (dict(mlp=0.001), r"option 'mlp' .* removes none of its 128 MLP channels"),
        (dict(heads=0.9), r"option 'heads' .* leave none of its 4 query heads"),
        (dict(heads=0.25), r"option 'heads' = 0.25 .* breaks GQA .*'query'.* multiple of 0.5"),
        (dict(heads=0.25, heads_mode="groups"), r"breaks GQA with heads_mode 'groups'"),
        (dict(), r"nothing to remove"),
    ]:
        with pytest.raises(PrunelabError, match=message) as caught:
            width_targets(model, **kwargs)
        assert "\n" not in str(caught.value)
        if kwargs:
            assert "Qwen3ForCausalLM" in str(caught.value)


def test_sizes_the_config_class_refuses_are_refused_with_the_nearest_that_load(tmp_path):
    """transformers' LlamaConfig needs hidden_size % num_attention_heads == 0 (explicit head_dim or not):
    SmolLM2's 576 channels over 9 heads minus 10 % (58) would save a folder that does not load."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = random_model(config)
    with pytest.raises(PrunelabError, match=r"option 'hidden' = 0.1 .*LlamaConfig refuses .*hidden size \(518\) is not "
                                            r"a multiple of the number of attention heads \(9\); nearest fractions it "
                                            r"accepts: 0.09375 or 0.109375$"):
        width_targets(model, hidden=0.1)
    eight_heads = random_model(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    with pytest.raises(PrunelabError, match=r"option 'heads' = 0.25 .*heads \(6\)$"):  # 8 -> 6 heads: 64 % 6 != 0
        width_targets(eight_heads, heads=0.25)
    from prunelab.model import WidthScores, prune_width

    targets = width_targets(model, hidden=0.09375)  # the suggestion: 54 channels go, 522 = 9 x 58 stay
    prune_width(model, targets, WidthScores(hidden=torch.arange(576.0)))
    model.save_pretrained(tmp_path / "m")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.hidden_size == 522


def test_unknown_layout_is_refused():
    from transformers import GPT2Config, Phi3Config

    phi3 = random_model(Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    with pytest.raises(PrunelabError, match=r"Phi3ForCausalLM.*no attention with q_proj/k_proj/v_proj/o_proj"):
        width_targets(phi3, mlp=0.25)
    gpt2 = random_model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(PrunelabError, match="GPT2LMHeadModel"):
        width_targets(gpt2, mlp=0.25)


# ---------------------------------------------------------------------------- round_to: kept counts a runtime can block
def llama(hidden: int = 64, intermediate: int = 200, heads: int = 4):
    """A tiny random Llama with an MLP of 200 channels (not a multiple of 32) and the given hidden size."""
    from transformers import LlamaConfig

    return random_model(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads,
                                    tie_word_embeddings=True))


def nearest_multiple_by_hand(count: int, step: int) -> int:
    """The reference: list the multiples of ``step`` around ``count`` and take the closest; on a tie the smaller."""
    below = count // step * step
    return min((below, below + step), key=lambda m: (abs(m - count), m))


def test_kept_count_is_the_nearest_multiple_and_round_to_1_is_the_old_half_up_count():
    from prunelab.model import kept_count

    assert kept_count(200, 0.25, 32) == 160  # 150 to keep: 160 is 10 away, 128 is 22
    assert kept_count(200, 0.28, 32) == 128  # 144 to keep: a tie between 128 and 160 keeps the smaller
    assert kept_count(96, 0.4, 32) == 64  # 96 - round(38.4) = 58: 64 is 6 away, 32 is 26
    assert kept_count(200, 0.5, 256) == 0 and kept_count(200, 0.01, 8) == 200  # the caller refuses these
    for total in (7, 64, 128, 200, 576, 3072):
        for step in range(1, 400):
            fraction = step / 400
            old = total - min(total, math.floor(fraction * total + 0.5))  # the count before round_to existed
            assert kept_count(total, fraction) == old, (total, fraction)
            for multiple in (8, 32, 256):
                assert kept_count(total, fraction, multiple) == nearest_multiple_by_hand(old, multiple)


def test_round_to_keeps_the_nearest_multiple_and_the_folder_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from prunelab.model import WidthScores, prune_width

    model = llama(hidden=96)
    targets = width_targets(model, mlp=0.25, hidden=0.4, round_to=32)
    assert (targets.mlp, targets.hidden, targets.heads) == (160, 64, 4)  # 150 -> 160, 57.6 -> 64; heads untouched
    g = torch.Generator().manual_seed(0)
    report = prune_width(model, targets, WidthScores(mlp=[torch.rand(200, generator=g) for _ in range(2)],
                                                     hidden=torch.rand(96, generator=g)))
    axes = report["width"]["axes"]
    assert axes["mlp"] == {"before": 200, "after": 160, "removed_fraction": 0.2, "requested_fraction": 0.25}
    assert axes["hidden"] == {"before": 96, "after": 64, "removed_fraction": round(1 - 64 / 96, 6),
                              "requested_fraction": 0.4}
    assert report["width"]["round_to"] == 32
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert (reloaded.config.intermediate_size, reloaded.config.hidden_size) == (160, 64)
    assert reloaded.model.layers[1].mlp.down_proj.weight.shape == (64, 160)
    assert close(logits(reloaded), logits(model), 1e-6)


def test_round_to_refusals_name_the_option_and_the_model():
    model = llama()
    for kwargs, message in [
        (dict(mlp=0.95, round_to=32), r"^width: option 'round_to' = 32 with 'mlp' = 0.95 on model LlamaForCausalLM: "
                                      r"the multiple of 32 nearest to the 10 channels it keeps is 0 of its 200 MLP "
                                      r"channels: would leave none$"),
        (dict(mlp=0.01, round_to=8), r"option 'round_to' = 8 with 'mlp' = 0.01 .* is 200 of its 200 MLP channels: "
                                     r"removes none$"),
        (dict(hidden=0.6, round_to=64), r"option 'round_to' = 64 with 'hidden' = 0.6 .*is 0 of its 64 hidden"),
        (dict(mlp=0.25, round_to=0), r"option 'round_to' must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(PrunelabError, match=message) as caught:
            width_targets(model, **kwargs)
        assert "\n" not in str(caught.value)
    kept = width_targets(model, heads=0.5, heads_mode="groups", round_to=256)  # heads are never rounded
    assert (kept.heads, kept.kv_heads, kept.mlp, kept.hidden) == (2, 2, 200, 64)  # axes not pruned are not rounded


def test_round_to_that_breaks_the_config_is_refused_with_fractions_that_round_and_load():
    """LlamaConfig needs hidden_size % num_attention_heads == 0: 192 channels over 3 heads minus 40 %
    rounds to 128 (115.2 -> 128), not a multiple of 3; of the multiples of 32 only 96 divides (0.5)."""
    model = llama(hidden=192, heads=3)
    with pytest.raises(PrunelabError, match=r"^width: option 'round_to' = 32 with 'hidden' = 0.4 on model "
                                            r"LlamaForCausalLM: LlamaConfig refuses .*\(128\).*\(3\); nearest "
                                            r"fractions it accepts: 0.5$"):
        width_targets(model, hidden=0.4, round_to=32)
    assert width_targets(model, hidden=0.5, round_to=32).hidden == 96
