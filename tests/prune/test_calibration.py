"""Calibration sampling, the sequential layer-wise driver, its statistics, and OWL's allocation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.calibration import CalibrationSpec, calibration_samples
from prunelab.prune.layerwise import InputNorms, run_layerwise
from prunelab.prune.owl import outlier_ratio, owl_sparsities
from prunelab_plugins.sparsegpt import Hessian
from tests.conftest import DATA, QWEN3_TOKENIZER, random_model, tiny_config

CALIBRATION_FILE = DATA / "calibration" / "wikitext-2-valid.tokens.txt"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)


# ------------------------------------------------------------------------------------ sampling
def test_samples_are_deterministic_by_seed_and_are_windows_of_the_text(tokenizer):
    spec = CalibrationSpec(str(CALIBRATION_FILE), samples=6, seqlen=32)
    first = calibration_samples(tokenizer, spec, seed=3)
    again = calibration_samples(tokenizer, spec, seed=3)
    other = calibration_samples(tokenizer, spec, seed=4)
    assert first.shape == (6, 32) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Every sample is a contiguous piece of the file (no special tokens added): its decoded text,
    # less a character at each end (a window may cut a multi-byte character), occurs in the file.
    text = CALIBRATION_FILE.read_text(encoding="utf-8")
    specials = set(tokenizer.all_special_ids)
    for row in first.tolist():
        assert not specials & set(row)
        assert tokenizer.decode(row)[1:-1] in text


def test_bos_is_prepended_when_the_model_needs_it(tokenizer):
    spec = CalibrationSpec(str(CALIBRATION_FILE), samples=3, seqlen=16)
    plain = calibration_samples(tokenizer, spec, seed=0)
    with_bos = calibration_samples(tokenizer, spec, seed=0, bos_token_id=7)
    assert with_bos.shape == (3, 16)
    assert (with_bos[:, 0] == 7).all()
    assert torch.equal(with_bos[:, 1:], plain[:, :15])  # same windows, one token shorter


def test_jsonl_documents_are_sampled_like_c4(tokenizer, tmp_path):
    short = "tiny."
    long_doc = " ".join(f"word{i}" for i in range(200))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [short, long_doc, short, short]))
    spec = CalibrationSpec(str(path), samples=5, seqlen=20)
    tokens = calibration_samples(tokenizer, spec, seed=1)
    long_ids = tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    text = "," + ",".join(map(str, long_ids)) + ","
    for row in tokens.tolist():  # only the document longer than the window can be chosen
        assert "," + ",".join(map(str, row)) + "," in text
    assert torch.equal(tokens, calibration_samples(tokenizer, spec, seed=1))


def test_calibration_input_errors(tokenizer, tmp_path):
    with pytest.raises(PrunelabError, match="not found"):
        calibration_samples(tokenizer, CalibrationSpec(str(tmp_path / "missing.txt")), 0)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(PrunelabError, match="too few"):
        calibration_samples(tokenizer, CalibrationSpec(str(short), samples=1, seqlen=64), 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(PrunelabError, match=r"bad.jsonl:1"):
        calibration_samples(tokenizer, CalibrationSpec(str(bad), samples=1, seqlen=8), 0)
    with pytest.raises(PrunelabError, match="unknown calibration key"):
        CalibrationSpec.from_mapping({"sampels": 3})
    with pytest.raises(PrunelabError, match="positive integer"):
        CalibrationSpec.from_mapping({"samples": 0})
    assert CalibrationSpec.from_mapping({"samples": "4", "seqlen": None}) == CalibrationSpec(samples=4)


# ------------------------------------------------------------------------------------ driver
def _mixed_gemma3():
    """Gemma3 with sliding and full-attention layers: different masks and rotary tables per layer."""

    config = tiny_config("gemma3", vocab_size=1000)
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config.sliding_window = 16
    model = random_model(config).eval()
    return adapt(model)


def _adapter(arch: str, tiny_models):
    if arch == "gemma3-mixed":
        return _mixed_gemma3()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(str(tiny_models[arch]), dtype="float32").adapter


def _reference_layer_outputs(adapter, samples: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's output for every sample, from ordinary full forwards of the decoder."""
    outputs: list[list[torch.Tensor]] = [[] for _ in adapter.layers]
    handles = [
        layer.register_forward_hook(
            lambda mod, args, out, i=i: outputs[i].append(out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(adapter.layers)
    ]
    try:
        with torch.no_grad():
            for row in range(samples.shape[0]):
                adapter.decoder(input_ids=samples[row : row + 1], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(o) for o in outputs]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "gemma3-mixed"])
def test_driver_reproduces_the_full_forward_when_nothing_is_pruned(arch, tiny_models):
    adapter = _adapter(arch, tiny_models)
    samples = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(0))  # 40 > sliding window
    expected = _reference_layer_outputs(adapter, samples)
    seen: dict[int, torch.Tensor] = {}

    def record(step) -> bool:
        seen[step.index] = step.inputs.clone()
        return False

    last = run_layerwise(adapter, samples, record, InputNorms)
    assert sorted(seen) == list(range(adapter.num_layers))
    for index in range(1, adapter.num_layers):  # layer i's inputs are layer i-1's outputs
        torch.testing.assert_close(seen[index], expected[index - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected[-1], rtol=1e-5, atol=1e-5)


def test_changed_layers_are_recomputed_so_the_pruned_outputs_feed_the_next_layer(tiny_models):
    adapter = _adapter("llama", tiny_models)
    samples = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))

    def zero_first_layer_mlp(step) -> bool:
        if step.index == 0:
            step.layer.mlp.down_proj.weight.data.zero_()
            return True
        return False

    last = run_layerwise(adapter, samples, zero_first_layer_mlp)
    expected = _reference_layer_outputs(adapter, samples)  # the model now has the zeroed layer
    torch.testing.assert_close(last, expected[-1], rtol=1e-5, atol=1e-5)


def test_statistics_match_a_direct_computation_and_are_shared_by_qkv(tiny_models):
    adapter = _adapter("qwen3", tiny_models)
    samples = torch.randint(0, 1000, (3, 20), generator=torch.Generator().manual_seed(2))
    inputs: list[torch.Tensor] = []  # what q_proj of layer 1 reads, from full forwards
    handle = adapter.layers[1].self_attn.q_proj.register_forward_hook(lambda m, a, o: inputs.append(a[0][0]))
    with torch.no_grad():
        for row in range(3):
            adapter.decoder(input_ids=samples[row : row + 1], use_cache=False)
    handle.remove()
    stats = {}
    for factory in (InputNorms, Hessian):
        run_layerwise(adapter, samples, lambda step, f=factory: stats.setdefault((f, step.index), step.stats) and False,
                      factory)
    norms = stats[(InputNorms, 1)]
    hessians = stats[(Hessian, 1)]
    X = torch.cat(inputs)  # (tokens, in)
    torch.testing.assert_close(norms["self_attn.q_proj"].norms, X.norm(dim=0), rtol=1e-5, atol=1e-5)
    expected_H = sum(2 / 3 * x.T @ x for x in inputs)
    torch.testing.assert_close(hessians["self_attn.q_proj"].H, expected_H, rtol=1e-4, atol=1e-4)
    assert hessians["self_attn.k_proj"] is hessians["self_attn.q_proj"] is hessians["self_attn.v_proj"]
    assert hessians["mlp.gate_proj"] is hessians["mlp.up_proj"]
    assert hessians["mlp.down_proj"] is not hessians["mlp.up_proj"]


# ------------------------------------------------------------------------------------ OWL
def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([20.0, 1.0, 1.0, 1.0])]
    # mean = 27/8 = 3.375; M=5 -> threshold 16.875: one of eight scores is an outlier
    assert outlier_ratio(scores, 5) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 6) == 0.0


def test_owl_allocation_follows_the_paper_formula():
    ratios = [0.01, 0.03, 0.02, 0.05]
    result = owl_sparsities(ratios, 0.5, 0.08)
    # min-max scaled to [0, 2*lambda], centred on the target density 0.5
    scaled = [(r - 0.01) / 0.04 * 0.16 for r in ratios]
    mean = sum(scaled) / 4
    expected = [1 - (s - mean + 0.5) for s in scaled]
    assert result == pytest.approx(expected)
    assert sum(result) / 4 == pytest.approx(0.5)
    assert max(result) - min(result) == pytest.approx(0.16)
    assert result.index(min(result)) == 3  # most outliers -> least pruned
    assert owl_sparsities([0.02, 0.02], 0.6, 0.08) == [0.6, 0.6]


def test_owl_allocation_through_the_core_helpers_for_magnitude_style_pruning(tiny_models, tmp_path):
    """Magnitude with allocation=owl: per-layer fractions by name, plugin == the core helpers by hand."""
    from prunelab.prune.api import PruneContext
    from prunelab.prune.masks import apply_mask, magnitude_scores, mask_from_scores, select_targets
    from prunelab.prune.owl import layer_sparsities, target_fractions

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(tiny_models["qwen3"]), dtype="float32")
    source = tmp_path / "calibration.txt"
    source.write_text(CALIBRATION_FILE.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    context = PruneContext(lm.adapter, lm.tokenizer, seed=0,
                           calibration={"source": str(source), "samples": 2, "seqlen": 24})
    options = {"allocation": "owl", "owl_m": 5.0, "owl_lambda": 0.1}
    per_layer, info = layer_sparsities(lm.adapter, options, 0.5, None, context=context)
    assert info["allocation"] == "owl" and len(per_layer) == 4
    assert sum(per_layer) / 4 == pytest.approx(0.5) and max(per_layer) - min(per_layer) == pytest.approx(0.2)
    targets = select_targets(lm.adapter)
    fractions = target_fractions(targets, per_layer, 0.5)
    for name, param in targets.items():
        apply_mask(param, mask_from_scores(magnitude_scores(param), fractions[name], scope="layer"))
    for index, fraction in enumerate(per_layer):
        zeros = sum(int((m.weight == 0).sum()) for m in lm.adapter.linear_modules(index).values())
        total = sum(m.weight.numel() for m in lm.adapter.linear_modules(index).values())
        assert zeros / total == pytest.approx(fraction, abs=1e-3)
    # the magnitude plugin with allocation=owl does exactly this
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugin = load_model(str(tiny_models["qwen3"]), dtype="float32")
    calibration = {"source": str(source), "samples": 2, "seqlen": 24}
    report = prune(plugin, "magnitude", sparsity=50, calibration=calibration, **options)
    assert report["layer_sparsity_pct"] == pytest.approx([100 * f for f in per_layer], abs=1e-3)
    for (name, expected), got in zip(lm.model.named_parameters(), plugin.model.parameters(), strict=True):
        assert torch.equal(expected, got), name
    with pytest.raises(PrunelabError, match="scope"):
        prune(plugin, "magnitude", sparsity=50, scope="global", calibration=calibration, **options)
    uniform, info = layer_sparsities(lm.adapter, {"allocation": "uniform"}, 0.3, None)
    assert uniform == [0.3] * 4 and info == {"allocation": "uniform"}
    with pytest.raises(PrunelabError, match="N:M"):
        layer_sparsities(lm.adapter, options, 0.5, (2, 4), context=context)
