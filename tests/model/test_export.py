"""Export: the pruned folder is a plain HF checkpoint (same logits without prunelab), its
prunelab.json reproduces the run, masks are kept, finished work is never overwritten, and the CLI
`prunelab prune` output is accepted by `prunelab eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.export import MASKS_FILE, RECIPE_FILE, save_pruned
from prunelab.model.loading import load_model, source_fingerprint
from prunelab.prune.api import prune
from prunelab.prune.masks import MaskSet, select_targets, sparsity_report

from ..conftest import DATA

PROMPT = torch.tensor([[9707, 11, 1879, 374, 264, 1273, 315, 279]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def plain_reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def prunelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def magnitude_export(tiny_qwen3, tmp_path_factory):
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    report = prune(loaded, "magnitude", sparsity=50, scope="row", seed=7)
    out = save_pruned(loaded, tmp_path_factory.mktemp("export") / "qwen3-mag50", report)
    return loaded, report, out


def test_export_reloads_with_plain_transformers(magnitude_export):
    loaded, _, out = magnitude_export
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", RECIPE_FILE):
        assert (out / name).is_file(), name
    reloaded = plain_reload(out)
    torch.testing.assert_close(logits_of(reloaded), logits_of(loaded.model), rtol=0, atol=0)
    assert sparsity_report(adapt(reloaded))["total"]["sparsity_pct"] == 50.0


def test_recipe_records_what_reproduces_the_run(magnitude_export, tiny_qwen3):
    loaded, report, out = magnitude_export
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["strategy"] == "magnitude" and recipe["seed"] == 7
    assert recipe["options"]["sparsity"] == 50.0 and recipe["options"]["scope"] == "row"
    assert recipe["source"] == {"model": str(tiny_qwen3), "kind": "dir", "fingerprint": source_fingerprint(str(tiny_qwen3))}
    assert recipe["sparsity"]["total"] == report["sparsity"]["total"]
    assert recipe["sparsity"]["total"]["zeros"] == sum(int((p == 0).sum()) for p in select_targets(loaded.adapter).values())
    assert {"torch", "transformers", "prunelab", "python"} <= set(recipe["versions"])

    # the recipe alone reproduces the weights bit for bit
    again = load_model(recipe["source"]["model"], dtype=recipe["dtype"])
    prune(again, recipe["strategy"], seed=recipe["seed"], **recipe["options"])
    for (name, p), (_, q) in zip(again.model.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_masks_are_saved_and_match_the_zeros(magnitude_export):
    loaded, report, out = magnitude_export
    masks = MaskSet.load(out / MASKS_FILE)
    assert set(masks) == set(report.masks)
    for name, param in select_targets(loaded.adapter).items():
        assert torch.equal(masks[name], param != 0), name


def test_existing_output_is_never_overwritten_by_accident(magnitude_export, tmp_path):
    loaded, report, _ = magnitude_export
    (tmp_path / "notes.txt").write_text("finished work")
    with pytest.raises(PrunelabError, match="not empty"):
        save_pruned(loaded, tmp_path, report)
    assert (tmp_path / "notes.txt").read_text() == "finished work"
    assert not any(p.name.startswith(".") for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}"))
    save_pruned(loaded, tmp_path, report, overwrite=True)
    assert not (tmp_path / "notes.txt").exists() and (tmp_path / RECIPE_FILE).is_file()


def test_cli_prune_then_eval_the_output_folder(tiny_qwen3, tmp_path):
    out = tmp_path / "dropped"
    result = prunelab("prune", "--model", str(tiny_qwen3), "--method", "drop-layers", "--layers", "1,2",
                      "--dtype", "float32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "4 -> 2" in result.stdout
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["strategy"] == "drop-layers" and recipe["dropped_layers"] == [1, 2]
    assert (out / "model.safetensors").stat().st_size < (tiny_qwen3 / "model.safetensors").stat().st_size
    assert not (out / MASKS_FILE).exists()

    result = prunelab("eval", "--model", str(out), "--tasks", "wikitext", "--seqlen", "64", "--limit", "2",
                      "--dtype", "float32", "--data-dir", str(DATA), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["wikitext"]["perplexity"] > 1


@pytest.mark.parametrize(("args", "fragment"), [
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "60"], "contradicts sparsity 60%"),
    (["--method", "magnitude", "--sparsity", "101"], "percentage in [0, 100]"),
    (["--method", "magnitude", "--option", "order"], "expected KEY=VALUE"),
    (["--method", "magnitude", "--option", "scope=block"], "must be one of global, layer, row"),
    (["--method", "magnitude", "--sparsity", "50", "--option", "sparsity=40"], "given twice"),
    (["--method", "no-such-method"], "unknown strategy 'no-such-method'"),
    (["--method", "drop-layers"], "option 'layers' is required"),
    (["--method", "magnitude", "--calibration", "c4"], "strategy 'magnitude' uses no calibration data"),
    # OWL's allocation makes magnitude use calibration: past that check, the bad value is what fails
    (["--method", "magnitude", "--option", "allocation=owl", "--calibration", "c4", "--calibration-samples", "0"],
     "calibration samples must be a positive integer"),
])
def test_cli_bad_options_fail_fast_in_one_line(tmp_path, capsys, args, fragment):
    """In-process (a subprocess per case costs seconds of imports); the model is never loaded."""
    code = main(["prune", "--model", "/no/such/model/needed", *args, "--out", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert fragment in " ".join(stderr.split())
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()
