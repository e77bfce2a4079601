"""Healing after pruning: the recovery plugin kind, the ``lora`` plugin, ``prunelab heal`` and studies.

The masks test checks the merged weights against a hand computation from the saved adapter:
healed = keep * (W_pruned + (alpha / r) * B @ A), which is zero exactly where the mask prunes and
changed everywhere else.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from scipy.stats import binomtest

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.evaluate.data import DataSource, Subset
from prunelab.evaluate.run import prepare_tasks
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.masks import resolve_parameter
from prunelab.prune.recovery import check_disjoint, heal, masks_of, overlap, training_windows, window_order
from prunelab.registry import default_registry
from prunelab.report.healstats import healed_pairs, healing_table
from prunelab.report.stats import summarize
from prunelab.runner.run import run_study
from prunelab.runner.studyfile import load_study
from prunelab.runner.variants import expand_variants

from ..conftest import DATA, study_text

VALID = DATA / "calibration" / "wikitext-2-valid.tokens.txt"


@pytest.fixture(scope="module")
def heal_text(tmp_path_factory) -> Path:
    """The start of the WikiText-2 validation file: enough for a few windows, quick to tokenize."""
    path = tmp_path_factory.mktemp("heal") / "valid-start.txt"
    path.write_text("".join(VALID.read_text(encoding="utf-8").splitlines(keepends=True)[:120]), encoding="utf-8")
    return path


def quick(data: Path, **extra) -> dict:
    return {"steps": 2, "batch": 2, "seqlen": 32, "lr": 5e-2, "data": str(data), **extra}


def test_recovery_is_a_plugin_kind_and_listed(capsys):
    registry = default_registry()
    lora = registry.recovery("lora")
    assert registry.recoveries["lora"][1].module == "prunelab_plugins.lora"
    assert {o.name for o in lora.options} >= {"rank", "alpha", "target_modules", "steps", "lr", "batch", "seqlen",
                                              "data"}
    with pytest.raises(PrunelabError, match="unknown recovery method 'nope'.*lora"):
        registry.recovery("nope")
    assert main(["plugins"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "recovery" in line]
    assert any("lora" in line for line in listed)


@pytest.mark.parametrize("options", [{"pattern": "2:4"}, {"sparsity": 50}], ids=["2:4", "unstructured-50"])
def test_masks_stay_zero_and_the_rest_is_the_merged_adapter(tiny_models, heal_text, tmp_path, options, one_thread):
    loaded = load_model(str(tiny_models["llama"]), dtype="float32", device="cpu")
    pruned = prune(loaded, "magnitude", **options)
    before = {name: resolve_parameter(loaded.adapter, name).detach().clone() for name in pruned.masks}
    report = heal(loaded, "lora", masks=pruned.masks, adapter_dir=tmp_path / "adapter", **quick(heal_text))

    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    scale = report["options"]["alpha"] / report["options"]["rank"]
    assert report["target_modules"] == len(pruned.masks) == 4 * 7  # every decoder Linear, found generically
    for name, keep in pruned.masks.items():
        weight = resolve_parameter(loaded.adapter, name).detach()
        assert torch.equal(weight == 0, ~keep), name  # zeros exactly where the mask prunes
        module = f"base_model.model.model.{name.removesuffix('.weight')}"
        delta = scale * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
        torch.testing.assert_close(weight, (before[name] + delta) * keep, rtol=1e-5, atol=1e-6)
        changed = (weight[keep] != before[name][keep]).float().mean()  # a delta below float32 resolution leaves one
        assert changed > 0.99, f"LoRA changed only {changed:.2%} of the kept weights of {name}"
    if options.get("pattern") == "2:4":
        for keep in pruned.masks.values():
            assert bool((keep.reshape(-1, 4).sum(dim=1) == 2).all())
    assert report["masks"]["pruned_weights_kept_zero"] == sum(int((~k).sum()) for k in pruned.masks.values())
    assert len(report["loss"]) == 2 and all(math.isfinite(x) for x in report["loss"])


def test_target_modules_narrow_by_name_and_none_is_an_error(tiny_models, heal_text, one_thread):
    loaded = load_model(str(tiny_models["qwen2"]), dtype="float32", device="cpu")
    report = heal(loaded, "lora", target_modules="q_proj,down_proj", **quick(heal_text, steps=1))
    assert report["target_modules"] == 2 * 4
    with pytest.raises(PrunelabError, match="no Linear module named gate in the decoder layers"):
        heal(loaded, "lora", target_modules="gate", **quick(heal_text, steps=1))


def test_auto_masks_come_from_the_file_or_a_recorded_weight_pruning(tiny_qwen3, tmp_path):
    loaded = load_model(str(tiny_qwen3), dtype="float32", device="cpu")
    pruned = prune(loaded, "magnitude", sparsity=50)
    folder = tmp_path / "model"
    folder.mkdir()
    masks, source = masks_of(folder, loaded.adapter)
    assert len(masks) == 0 and source.startswith("none")  # zeros are not guessed without a recorded pruning
    (folder / "prunelab.json").write_text(json.dumps({"format": "prunelab-recipe/1", "strategy": "magnitude", "sparsity": {}}))
    masks, _ = masks_of(folder, loaded.adapter)
    assert set(masks) == set(pruned.masks) and all(torch.equal(masks[n], pruned.masks[n]) for n in masks)
    pruned.masks.save(folder / "masks.safetensors")
    masks, source = masks_of(folder, loaded.adapter)
    assert source.endswith("masks.safetensors") and set(masks) == set(pruned.masks)
    assert len(masks_of(folder, loaded.adapter, "none")[0]) == 0
    with pytest.raises(PrunelabError, match="masks file not found"):
        masks_of(folder, loaded.adapter, str(tmp_path / "nope.safetensors"))


def test_training_windows_cut_the_text_in_order_and_epochs_shuffle_all(tiny_qwen3, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    path = tmp_path / "t.txt"
    path.write_text("one two three four five six seven eight nine ten " * 20, encoding="utf-8")
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    windows = training_windows(tokenizer, str(path), 16, 2)
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.reshape(-1).tolist() == ids[: windows.numel()]
    order = window_order(5, 12, seed=3).tolist()
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5)) and len(order) == 12
    assert window_order(5, 12, seed=3).tolist() == order


def test_overlap_with_evaluated_items_is_refused(heal_text, tmp_path):
    tasks = prepare_tasks(["wikitext", "gsm8k"], DataSource(DATA), Subset(limit=3, sample="first"), {})
    assert "no 13-word sequence in common" in check_disjoint(str(heal_text), tasks)
    with pytest.raises(PrunelabError, match="overlaps the evaluation: .* task wikitext"):
        check_disjoint(str(DATA / "wikitext-2" / "wiki.test.raw"), tasks)
    question = tasks[1].items[2].data["question"]
    leaked = tmp_path / "leak.txt"
    leaked.write_text(heal_text.read_text() + "\n" + question.upper() + "\n", encoding="utf-8")
    with pytest.raises(PrunelabError, match="task gsm8k"):
        check_disjoint(str(leaked), tasks)
    assert "wikitext" not in overlap([question], {"wikitext": ["short text"]})


def test_cli_heal_writes_a_plain_checkpoint_with_adapter_and_recipe(tiny_qwen3, heal_text, tmp_path, capsys):
    pruned_dir, out = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", "--model", str(tiny_qwen3), "--method", "magnitude", "--pattern", "2:4", "--dtype",
                 "float32", "--out", str(pruned_dir)]) == 0
    assert main(["heal", "--model", str(pruned_dir), "--method", "lora", "--rank", "4", "--steps", "3",
                 "--batch", "2", "--seqlen", "32", "--lr", "0.05", "--data", str(heal_text), "--dtype", "float32",
                 "--out", str(out)]) == 0
    recipe = json.loads((out / "prunelab.json").read_text())
    assert recipe["healing"]["method"] == "lora" and recipe["healing"]["options"]["rank"] == 4
    assert len(recipe["healing"]["loss"]) == 3 and recipe["healing"]["masks"]["source"].endswith("masks.safetensors")
    assert recipe["pruned"]["strategy"] == "magnitude"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "masks.safetensors").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    healed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    zeros = {n: p == 0 for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()
    for name, param in healed.named_parameters():
        expected = dict(merged.named_parameters())[name].detach()
        if ".layers." in name and name.endswith("proj.weight"):
            expected = expected * ~zeros[name]
            assert bool((param[zeros[name]] == 0).all())
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--rank", "0"], "recovery 'lora': option 'rank': must be >= 1, got 0"),
    (["--steps", "0"], "option 'steps': must be >= 1, got 0"),
    (["--steps", "-3"], "option 'steps': must be >= 1"),
    (["--data", "/no/such/file.txt"], "healing data not found: /no/such/file.txt"),
    (["--method", "qlora"], "unknown recovery method 'qlora'"),
    (["--target-modules", "nothing_here"], "no Linear module named nothing_here in the decoder layers"),
    (["SHORT"], "fewer than one batch of 2"),
])
def test_bad_heal_input_is_one_line(tiny_qwen3, heal_text, tmp_path, capsys, args, fragment):
    short = tmp_path / "short.txt"
    short.write_text("far too short", encoding="utf-8")
    args = ["--data", str(short)] if args == ["SHORT"] else args
    base = ["heal", "--model", str(tiny_qwen3), "--steps", "1", "--batch", "2", "--seqlen", "32", "--dtype",
            "float32", "--data", str(heal_text), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert fragment in " ".join(err.split()) and "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "out").exists()


def test_healing_table_pairs_against_dense_and_the_unhealed_variant():
    """McNemar vs the unhealed variant on the discordant items, checked with scipy's exact binomial test."""
    dense = [True] * 10 + [False] * 10
    base = [True] * 4 + [False] * 16
    healed = [True] * 9 + [False] * 10 + [True]  # gained 5 and 1, lost 0 vs base
    rows = []
    for variant, strategy, values in (("dense", "dense", dense), ("drop[k=2]", "drop", base),
                                      ("drop[k=2]+lora", "drop+lora", healed), ("odd+name", "odd", base)):
        rows += [{"variant": variant, "strategy": strategy, "params": "{}", "task": "t", "metric": "acc",
                  "item_id": f"i{i:02d}", "correct": v, "nll_sum": None, "tokens": None} for i, v in enumerate(values)]
    items = pl.DataFrame(rows)
    assert healed_pairs(items) == [("drop[k=2]+lora", "drop[k=2]")]
    table = healing_table(items, summarize(items))
    (row,) = table.to_dicts()
    assert (row["before"], row["after"], row["dense_value"]) == (0.2, 0.5, 0.5)
    assert row["diff_vs_unhealed"] == pytest.approx(0.3) and (row["lost"], row["gained"]) == (0, 6)
    assert row["p_vs_unhealed"] == pytest.approx(binomtest(0, 6, 0.5).pvalue)
    assert row["after_diff_vs_dense"] == pytest.approx(0.0) and row["before_diff_vs_dense"] == pytest.approx(-0.3)


def test_bad_recovery_blocks_fail_before_any_model(tmp_path):
    def load(block: str):
        path = tmp_path / "s.toml"
        path.write_text(f'name = "s"\nmodel = "m"\n[evaluation]\ntasks = ["wikitext"]\n'
                        f'[[strategies]]\nname = "drop-layers"\nlayers = 1\n{block}')
        return load_study(path)

    with pytest.raises(PrunelabError, match=r"\[recovery\]: recovery 'lora': option 'rank': must be >= 1"):
        load('[recovery]\nrank = 0\ndata = "x.txt"')
    with pytest.raises(PrunelabError, match="strategies magnitude are not in the study"):
        load('[recovery]\nstrategies = ["magnitude"]')
    with pytest.raises(PrunelabError, match="healing data not found"):
        load('[recovery]\ndata = "missing.txt"')
    with pytest.raises(PrunelabError, match="unknown option.*ranks"):
        load('[recovery]\nranks = 4')


def test_study_heals_each_variant_and_reports_before_and_after(tiny_qwen3, small_data, heal_text, tmp_path,
                                                               one_thread):
    strategies = ('[[strategies]]\nname = "drop-block"\nk = [2]\n\n[[strategies]]\nname = "magnitude"\n'
                  'pattern = "2:4"\n\n[calibration]\nsamples = 2\nseqlen = 32\n'
                  f'source = "{heal_text}"\n\n[recovery]\nstrategies = ["drop-block", "magnitude"]\nsteps = 2\n'
                  f'batch = 2\nseqlen = 32\nlr = 0.05\ndata = "{heal_text}"\n')
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["mmlu", "wikitext"]').replace("chunk_items = 1",
                                                                                       "chunk_items = 8"))
    loaded = load_study(study)
    assert [v.name for v in expand_variants(loaded, 4)] == [
        "dense", "dense+lora", "drop-block[k=2]", "drop-block[k=2]+lora", "magnitude[pattern=2:4]",
        "magnitude[pattern=2:4]+lora"]
    run = run_study(loaded, tmp_path / "out")
    healing = pl.read_parquet(run / "healing.parquet")
    assert sorted(set(healing["variant"])) == ["dense+lora", "drop-block[k=2]+lora", "magnitude[pattern=2:4]+lora"]
    assert set(healing.filter(pl.col("variant") == "dense+lora")["unhealed"]) == {"dense"}
    twins = healing.filter(pl.col("variant") != "dense+lora")
    assert set(twins["healed_dense"]) == {"dense+lora"} and twins["p_vs_healed_dense"].null_count() == 0
    assert set(healing["task"]) == {"mmlu", "wikitext"} and healing["p_vs_unhealed"].null_count() == 0
    summary = pl.read_parquet(run / "summary.parquet")
    for row in healing.iter_rows(named=True):
        after = summary.filter((pl.col("variant") == row["variant"]) & (pl.col("task") == row["task"]))
        before = summary.filter((pl.col("variant") == row["unhealed"]) & (pl.col("task") == row["task"]))
        after = after.filter(pl.col("metric") == row["metric"])
        before = before.filter(pl.col("metric") == row["metric"])
        assert row["after"] == after["value"][0] and row["before"] == before["value"][0]
    wikitext = healing.filter((pl.col("task") == "wikitext") & (pl.col("metric") == "perplexity"))
    assert (wikitext["after"] != wikitext["before"]).all(), "healing must change the model"
    manifest = json.loads((run / "manifest.json").read_text())
    healed_report = manifest["variants"]["drop-block[k=2]+lora"]
    assert healed_report["recovery"]["method"] == "lora" and len(healed_report["recovery"]["loss"]) == 2
    assert healed_report["layers_after"] == 2
    assert manifest["config"]["recovery"]["steps"] == 2
    spec = (run / "charts" / "removal_plans.html").read_text()
    assert "drop-block+lora" in spec
    assert "Healing" in (run / "report.html").read_text()


def test_a_third_party_recovery_gets_the_masks_kept_by_the_core(tiny_qwen3, monkeypatch):
    """A method that fills every weight in (a dense update, as a merged adapter is) still leaves the zeros."""
    import importlib.metadata as md
    import sys
    import types

    from prunelab.options import Option
    from prunelab.plugin import Recovery, hookimpl
    from prunelab.registry import ENTRY_POINT_GROUP, build_registry

    def recover(model, options, context):
        with torch.no_grad():
            for layer in context.adapter.layers:
                for module in layer.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.add_(options["shift"])
        context.report_step(1, 0.0)
        return {"loss": [0.0]}

    plugin = types.ModuleType("fake_recovery_plugin")
    plugin.prunelab_recoveries = hookimpl(lambda: [Recovery("shift", "adds a constant", recover,
                                                            (Option("shift", float, 1.0),))])
    monkeypatch.setitem(sys.modules, "fake_recovery_plugin", plugin)
    registry = build_registry([md.EntryPoint("fake", "fake_recovery_plugin", ENTRY_POINT_GROUP)])
    loaded = load_model(str(tiny_qwen3), dtype="float32", device="cpu")
    pruned = prune(loaded, "magnitude", pattern="2:4")
    before = {name: resolve_parameter(loaded.adapter, name).detach().clone() for name in pruned.masks}
    steps = []
    report = heal(loaded, "shift", masks=pruned.masks, registry=registry, progress=lambda s, loss, rate: steps.append(s),
                  shift=0.5)
    assert report["method"] == "shift" and steps == [1]
    for name, keep in pruned.masks.items():
        weight = resolve_parameter(loaded.adapter, name).detach()
        assert torch.equal(weight, (before[name] + 0.5) * keep)
