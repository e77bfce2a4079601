"""Strategy ``width``: importance picks what a constructed model makes derivable, the CLI leaves a
normal checkpoint, bad options exit 2 with one line before any calibration, and studies and healing
take width variants."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model import adapt, load_model, width_sizes
from prunelab.model.export import MASKS_FILE, RECIPE_FILE
from prunelab.prune import prune

from ..conftest import QWEN3_TOKENIZER, cli, random_model, study_text, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration(file: str) -> dict:
    return {"source": file, "samples": 2, "seqlen": 32}


@pytest.fixture
def loaded(tiny_qwen3):
    return load_model(str(tiny_qwen3), dtype="float32")


# ---------------------------------------------------------------------------- what importance keeps
def dead_channels(model) -> dict[str, object]:
    """Make some channels contribute nothing, so any sound activation importance must rank them last.

    MLP: gate and up rows zero -> the channel's input to down_proj is 0 on every token. Heads: a KV
    group's v rows zero -> both its query heads output 0 before o_proj. Hidden: every stream norm's
    gain zero at the channel -> every norm output is 0 there (Qwen3's norms scale by the weight).
    """
    sizes = width_sizes(adapt(model))
    mlp = {i: [2 * i, 2 * i + 1, 100 + i] for i in range(sizes.layers)}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate_proj.weight[mlp[i]] = 0
            layer.mlp.up_proj.weight[mlp[i]] = 0
            group = i % 2
            layer.self_attn.v_proj.weight[group * sizes.head_dim:(group + 1) * sizes.head_dim] = 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[5, 17]] = 0
        model.model.norm.weight[[5, 17]] = 0
    return {"mlp": mlp, "group": {i: i % 2 for i in range(sizes.layers)}, "hidden": [5, 17]}


def test_activation_importance_removes_channels_that_are_dead_on_every_token(loaded, calibration_file):
    dead = dead_channels(loaded.model)
    report = prune(loaded, "width", mlp=3 / 128, heads=0.5, heads_mode="groups", hidden=2 / 64,
                   calibration=calibration(calibration_file))
    kept = report["width"]["kept"]
    for i, channels in dead["mlp"].items():
        assert kept["mlp"][i] == [c for c in range(128) if c not in channels]
        assert kept["kv_heads"][i] == [1 - dead["group"][i]]
    assert kept["hidden"] == [c for c in range(64) if c not in dead["hidden"]]
    assert report["calibration"] == calibration(calibration_file) and report["importance"] == "activation"
    assert report["parameters"]["after"] == sum(p.numel() for p in loaded.model.parameters())


def test_magnitude_importance_is_the_weight_norm_and_reads_no_calibration(loaded):
    layer = loaded.model.model.layers[1].mlp
    expected = (layer.gate_proj.weight.square().sum(1) + layer.up_proj.weight.square().sum(1)
                + layer.down_proj.weight.square().sum(0))
    keep = sorted(torch.argsort(expected, descending=True)[:96].tolist())
    report = prune(loaded, "width", mlp=0.25, importance="magnitude",
                   calibration={"source": "/nonexistent/calibration.txt"})
    assert report["width"]["kept"]["mlp"][1] == keep
    assert loaded.model.config.intermediate_size == 96


# ---------------------------------------------------------------------------- CLI
def test_cli_leaves_a_normal_checkpoint_without_masks(tiny_qwen3, calibration_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w"
    status, err = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "width", "--option", "mlp=0.25",
                      "--option", "heads=0.5", "--option", "hidden=0.25", "--calibration", calibration_file,
                      "--calibration-samples", "2", "--calibration-seqlen", "32", "--dtype", "float32", "--out", str(out))
    assert status == 0, err
    assert not (out / MASKS_FILE).exists()
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["strategy"] == "width" and "sparsity" not in recipe
    assert recipe["width"]["config"] == {"intermediate_size": [128, 96], "num_attention_heads": [4, 2],
                                         "hidden_size": [64, 48]}
    assert len(recipe["width"]["kept"]["mlp"]) == 4 and all(len(k) == 96 for k in recipe["width"]["kept"]["mlp"])
    assert recipe["width"]["shapes"]["layers.0.mlp.down_proj.weight"] == [48, 96]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 48 and model.model.layers[0].self_attn.q_proj.weight.shape == (64, 48)
    assert sum(p.numel() for p in model.parameters()) == recipe["parameters"]["after"]


@pytest.mark.parametrize("option,message", [
    ("mlp=1.0", "option 'mlp': a fraction to remove must be in [0, 1)"),
    ("heads=-0.5", "option 'heads': a fraction to remove must be in [0, 1)"),
    ("heads=0.25", "option 'heads' = 0.25 on model"),
    ("heads=0.9", "would leave none of its 4 query heads"),
    ("hidden=0.001", "option 'hidden' = 0.001 on model"),
])
def test_cli_bad_fraction_exits_2_with_one_line(tiny_qwen3, tmp_path, capsys, option, message):
    status, err = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "width", "--option", option,
                      "--dtype", "float32", "--out", str(tmp_path / "x"))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_model_checks_come_before_calibration(loaded):
    """A missing calibration file would be the error if calibration were read first."""
    with pytest.raises(PrunelabError, match="breaks GQA"):
        prune(loaded, "width", heads=0.25, calibration={"source": "/nonexistent/calibration.txt"})
    with pytest.raises(PrunelabError, match="calibration source not found"):  # the same call, valid heads
        prune(loaded, "width", heads=0.5, calibration={"source": "/nonexistent/calibration.txt"})


def test_unknown_architecture_exits_2_before_calibration(tmp_path, capsys):
    from transformers import AutoTokenizer, Phi3Config

    model = random_model(Phi3Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model.save_pretrained(tmp_path / "phi3")
    AutoTokenizer.from_pretrained(QWEN3_TOKENIZER).save_pretrained(tmp_path / "phi3")
    # the default calibration (the Hub's C4) is out of reach offline: reading it first would fail differently
    status, err = cli(capsys, "prune", "--model", str(tmp_path / "phi3"), "--method", "width", "--option", "mlp=0.25",
                      "--dtype", "float32", "--out", str(tmp_path / "x"))
    assert status == 2 and "Phi3ForCausalLM" in err and "q_proj/k_proj/v_proj/o_proj" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- round_to
@pytest.fixture(scope="module")
def llama_200(tmp_path_factory):
    """A tiny random Llama folder whose MLP has 200 channels (not a multiple of 32), with a real tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = tmp_path_factory.mktemp("llama-200") / "m"
    config = LlamaConfig(vocab_size=151936, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    random_model(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(QWEN3_TOKENIZER).save_pretrained(folder)
    return folder


def test_cli_round_to_keeps_a_multiple_and_records_requested_and_achieved(llama_200, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w"
    status, err = cli(capsys, "prune", "--model", str(llama_200), "--method", "width", "--option", "mlp=0.25",
                      "--option", "hidden=0.4", "--option", "round_to=32", "--option", "importance=magnitude",
                      "--dtype", "float32", "--out", str(out))
    assert status == 0, err
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["options"]["round_to"] == 32 and recipe["options"]["mlp"] == 0.25
    # by hand: 200 - round(50) = 150 -> 160 (10 away; 128 is 22); 96 - round(38.4) = 58 -> 64 (6; 32 is 26)
    axes = recipe["width"]["axes"]
    assert (axes["mlp"]["after"], axes["mlp"]["requested_fraction"], axes["mlp"]["removed_fraction"]) == (160, 0.25, 0.2)
    assert (axes["hidden"]["after"], axes["hidden"]["requested_fraction"]) == (64, 0.4)
    assert axes["hidden"]["removed_fraction"] == round(1 - 64 / 96, 6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.intermediate_size, model.config.hidden_size) == (160, 64)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (160, 64)


@pytest.mark.parametrize("options,message", [
    (("mlp=0.95", "round_to=32"), "option 'round_to' = 32 with 'mlp' = 0.95 on model"),  # 10 -> 0: none left
    (("mlp=0.01", "round_to=8"), "is 200 of its 200 MLP channels: removes none"),  # 198 -> 200
    (("hidden=0.9", "round_to=64"), "is 0 of its 96 hidden channels: would leave none"),  # 10 -> 0
    (("mlp=0.25", "round_to=0"), "option 'round_to': must be >= 1, got 0"),
])
def test_cli_round_to_refusals_exit_2_with_one_line_before_calibration(llama_200, tmp_path, capsys, options, message):
    """Activation importance reads the default calibration (the Hub's C4, out of reach offline): read
    first, it would fail differently."""
    args = [a for option in options for a in ("--option", option)]
    status, err = cli(capsys, "prune", "--model", str(llama_200), "--method", "width", *args,
                      "--dtype", "float32", "--out", str(tmp_path / "x"))
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "LlamaForCausalLM" in err or "must be >= 1" in err
    assert not (tmp_path / "x").exists()


def test_plugins_width_shows_round_to_and_the_achieved_declaration(capsys, monkeypatch):
    from prunelab import cli

    # One table row per line. The console is made when prunelab.cli is first imported, which in the full
    # suite is before this test: its width, not $COLUMNS, decides where rows wrap.
    monkeypatch.setattr(cli.out, "width", 1000)
    assert cli.main(["plugins", "width"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(re.match(r"│ round_to +│ int +│ 1 +│ checked +│ keep a multiple", line) for line in lines)
    assert sum("achieved=declared" in line for line in lines if "kind='width'" in line) == 3


# ---------------------------------------------------------------------------- healing and studies
def test_a_width_variant_heals(loaded, calibration_file):
    from prunelab.prune.recovery import heal

    report = prune(loaded, "width", mlp=0.5, importance="magnitude")
    before = copy.deepcopy(loaded.model.state_dict())
    healed = heal(loaded, "lora", masks=report.masks, steps=2, batch=1, seqlen=32, data=calibration_file)
    assert healed["masks"]["pruned_weights_kept_zero"] == 0
    assert loaded.model.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    assert any(not torch.equal(before[n], p) for n, p in loaded.model.state_dict().items())


def test_width_variants_in_a_study(tiny_qwen3, small_data, tmp_path, monkeypatch):
    """Width variants run in a study, and every one gets KL to dense: also ``hidden``, whose head differs
    (its dense logits come from the dense head the study keeps once, beside the chunk references)."""
    import polars as pl

    from prunelab.evaluate import reference
    from prunelab.runner import load_study, run_study

    written = []  # every file the reference store writes (the work folder is gone after the run)
    monkeypatch.setattr(reference, "atomic_write", lambda path, *a, _real=reference.atomic_write, **k: (
        written.append(Path(path).name), _real(path, *a, **k)))
    strategies = ('[[strategies]]\nname = "width"\nmlp = [0.25, 0.5]\nimportance = ["magnitude"]\n'
                  '[[strategies]]\nname = "width"\nhidden = [0.25]\nimportance = ["magnitude"]\n')
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]'))
    folder = run_study(load_study(study), tmp_path / "out")
    manifest = json.loads((folder / "manifest.json").read_text())
    hidden = "width[hidden=0.25,importance=magnitude]"
    assert set(manifest["timings"]["evaluate_s"]) == {"dense", "width[mlp=0.25,importance=magnitude]",
                                                      "width[mlp=0.5,importance=magnitude]", hidden}
    items = pl.read_parquet(folder / "items.parquet")
    kl = items.filter(pl.col("metric") == "kl_mean")
    assert kl.height == 4 * 2 and kl["value"].null_count() == 0  # 4 variants x 2 windows
    assert kl.filter(pl.col("variant") == hidden)["value"].min() > 0
    assert items.filter(pl.col("metric") == "top1_agree")["value"].null_count() == 0
    fidelity = {r["variant"]: r for r in manifest["sensitive_metrics"]["fidelity"]}  # the report's table too
    assert set(fidelity) == set(manifest["timings"]["evaluate_s"]) and fidelity[hidden]["kl_p99"] > 0
    assert fidelity[hidden]["kl_mean"] == pytest.approx(float(kl.filter(pl.col("variant") == hidden)["value"].mean()))
    assert sorted(written) == ["dense-head.safetensors", "wikitext-0000.safetensors", "wikitext-0001.safetensors"]


def test_gemma3_width_reloads(tmp_path):
    """Gemma3: sandwich norms, (1 + w) gains, a sqrt(hidden) embedding scale: the strategy's folder reloads to its logits."""
    from transformers import AutoModelForCausalLM

    from prunelab.model.loading import LoadedModel

    model = random_model(tiny_config("gemma3", vocab_size=256)).eval()
    loaded = LoadedModel(model, None, adapt(model), "tiny-gemma3", "dir", torch.device("cpu"), torch.float32)
    prune(loaded, "width", hidden=0.25, mlp=0.25, importance="magnitude")
    model.save_pretrained(tmp_path / "g")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_a_study_checks_every_grid_point_against_the_model_before_pruning_any(tiny_qwen3, small_data, tmp_path):
    from prunelab.runner import load_study, run_study

    strategies = '[[strategies]]\nname = "width"\nmlp = [0.25]\nheads = [0.0, 0.25]\nimportance = ["magnitude"]\n'
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]'))
    with pytest.raises(PrunelabError, match=r"^variant width\[mlp=0.25,heads=0.25.*\]: width: option 'heads' = 0.25 "
                                            r"on model .*breaks GQA") as caught:
        run_study(load_study(study), tmp_path / "out")
    assert "\n" not in str(caught.value)
    logs = list((tmp_path / "out").rglob("log.jsonl"))
    events = [json.loads(line) for path in logs for line in path.read_text().splitlines()]
    assert not [e for e in events if e.get("event") in ("prune", "chunk")]  # nothing pruned or evaluated first
