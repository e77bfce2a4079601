"""A third-party width strategy (examples/random-width-plugin), installed the normal way, gets what the
built-in ``width`` gets with no change to prunelab: the CLI prunes with it, the model checks come
first, the folder is a standard checkpoint recording the kept channels, and studies run its variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

from prunelab.model.export import MASKS_FILE, RECIPE_FILE

from .conftest import ENV, ROOT, install_example, study_text

EXAMPLE = ROOT / "examples" / "random-width-plugin"
SCRIPT = """
import sys
from prunelab.runner import load_study, run_study
print(run_study(load_study(sys.argv[1]), sys.argv[2]))
"""
RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "new_tokens": out.shape[1] - 3}))
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    site = install_example(EXAMPLE, tmp_path_factory.mktemp("random-width-plugin"))
    return {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)


def test_prune_with_the_cli_leaves_a_standard_checkpoint(plugin_env, tiny_qwen3, tmp_path):
    listed = run({**plugin_env, "COLUMNS": "250"}, "-m", "prunelab.cli", "plugins")
    assert listed.returncode == 0 and "random-width" in listed.stdout and "prunelab-random-width" in listed.stdout

    folders = {}
    for seed in ("1", "1", "2"):
        out = tmp_path / f"rw-{seed}-{len(folders)}"
        done = run(plugin_env, "-m", "prunelab.cli", "prune", "--model", str(tiny_qwen3), "--method", "random-width",
                   "--option", "mlp=0.25", "--option", "heads=0.5", "--option", "heads_mode=groups",
                   "--option", "hidden=0.25", "--seed", seed, "--dtype", "float32", "--out", str(out))
        assert done.returncode == 0, done.stderr
        folders[out] = json.loads((out / RECIPE_FILE).read_text())
    (a, first), (_, again), (_, other) = folders.items()
    assert first["strategy"] == "random-width" and not (a / MASKS_FILE).exists()
    assert first["width"]["config"] == {"intermediate_size": [128, 96], "num_attention_heads": [4, 2],
                                        "num_key_value_heads": [2, 1], "hidden_size": [64, 48]}
    assert first["width"]["kept"] == again["width"]["kept"] != other["width"]["kept"]  # seeded
    assert first["width"]["kept"]["heads"][0] in ([0, 1], [2, 3])  # a whole KV group's query heads
    reloaded = run(plugin_env, "-c", RELOAD, str(a))
    assert reloaded.returncode == 0, reloaded.stderr
    assert json.loads(reloaded.stdout) == {"parameters": first["parameters"]["after"], "new_tokens": 4}


def test_the_core_checks_its_fractions_against_the_model(plugin_env, tiny_qwen3, tmp_path):
    done = run(plugin_env, "-m", "prunelab.cli", "prune", "--model", str(tiny_qwen3), "--method", "random-width",
               "--option", "heads=0.25", "--dtype", "float32", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "option 'heads' = 0.25" in done.stderr and "breaks GQA" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_round_to_and_the_achieved_fraction_come_with_the_shared_options(plugin_env, tiny_qwen3, tmp_path):
    """``round_to`` and the recorded achieved fraction reach a third-party width strategy through
    ``width_options()`` / ``prune_width``: 128 - round(38.4) = 90 MLP channels to keep -> 96 (of 32)."""
    out = tmp_path / "rounded"
    done = run(plugin_env, "-m", "prunelab.cli", "prune", "--model", str(tiny_qwen3), "--method", "random-width",
               "--option", "mlp=0.3", "--option", "round_to=32", "--dtype", "float32", "--out", str(out))
    assert done.returncode == 0, done.stderr
    mlp = json.loads((out / RECIPE_FILE).read_text())["width"]["axes"]["mlp"]
    assert (mlp["after"], mlp["requested_fraction"], mlp["removed_fraction"]) == (96, 0.3, 0.25)


def test_study_variants(plugin_env, tiny_qwen3, small_data, tmp_path):
    strategies = '[[strategies]]\nname = "random-width"\nmlp = [0.25]\nheads = [0.0, 0.5]\n'
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]') + "\n[bench]\nprompt_lengths = [8]\nbatches = [1]\nnew_tokens = 2\nrepeats = 1\n")
    done = run(plugin_env, "-c", SCRIPT, str(study), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = done.stdout.strip().splitlines()[-1]
    items = pl.read_parquet(f"{folder}/items.parquet")
    variants = set(items["variant"].unique())
    assert variants == {"dense", "random-width[mlp=0.25,heads=0.0]", "random-width[mlp=0.25,heads=0.5]"}, variants
    summary = pl.read_parquet(f"{folder}/summary.parquet")
    assert set(summary["variant"].unique()) == variants  # compared with dense like every variant
    bench = {row["variant"]: row for row in pl.read_parquet(f"{folder}/bench.parquet").iter_rows(named=True)}
    assert bench["random-width[mlp=0.25,heads=0.5]"]["parameters"] < bench["random-width[mlp=0.25,heads=0.0]"]["parameters"] \
        < bench["dense"]["parameters"]
