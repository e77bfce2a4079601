"""Plugins are part of a run's identity: an upgraded plugin reruns what it produced, and only that.

A study of dense, the third-party ``every-kth`` (examples/every-kth-plugin) and the built-in
``drop-layers`` on MMLU and WikiText runs; then ``every-kth`` is upgraded to 0.2.0 with different
code (it now removes layers k, 2k, ... from 0) and the same study runs again. The second run must
compute every-kth's chunks again -- and dense's WikiText chunks, whose reference the variant's KL
needs -- and take every other pair's rows unchanged from the first run. A third run with nothing
changed reuses the whole second run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from .conftest import ENV, ROOT, install_example, study_text

EXAMPLE = ROOT / "examples" / "every-kth-plugin"
STRATEGIES = '[[strategies]]\nname = "every-kth"\nk = [4]\n\n[[strategies]]\nname = "drop-layers"\nlayers = [3]\n'
SCRIPT = """
import sys
from prunelab.runner import Reporter, load_study, run_study

class Said(Reporter):
    def message(self, text):
        print(text, file=sys.stderr)

print(run_study(load_study(sys.argv[1]), sys.argv[2], reporter=Said()))
"""


def upgraded(work: Path) -> Path:
    """The example at version 0.2.0, whose layers are k-1 places earlier: every-kth[k=4] removes layer 0."""
    source = shutil.copytree(EXAMPLE, work / "v2", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    project = source / "pyproject.toml"
    project.write_text(project.read_text().replace('version = "0.1.0"', 'version = "0.2.0"'))
    module = source / "prunelab_every_kth" / "__init__.py"
    module.write_text(module.read_text().replace("if (i + 1) % k == 0", "if i % k == 0"))
    return source


def run(study: Path, out: Path, plugin: str) -> tuple[Path, str]:
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [plugin, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(study), str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def runs(tiny_qwen3, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin-identity")
    first_plugin = install_example(EXAMPLE, root / "v1")
    second_plugin = install_example(upgraded(root), root / "v2-installed")
    study = root / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=STRATEGIES).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["mmlu", "wikitext"]'))
    first, _ = run(study, root / "out", first_plugin)
    second, said = run(study, root / "out", second_plugin)
    third, again = run(study, root / "out", second_plugin)
    return {"first": first, "second": second, "third": third, "said": said, "again": again}


def rows(folder: Path, variant: str, task: str) -> pl.DataFrame:
    items = pl.read_parquet(folder / "items.parquet")
    return items.filter((pl.col("variant") == variant) & (pl.col("task") == task)).sort("metric", "item_id")


def test_the_manifest_and_the_reuse_key_record_the_plugins(runs):
    first, second = (json.loads((runs[k] / "manifest.json").read_text()) for k in ("first", "second"))
    old, new = first["plugins"]["strategy"]["every-kth"], second["plugins"]["strategy"]["every-kth"]
    assert (old["package"], old["version"], new["version"]) == ("prunelab-every-kth", "0.1.0", "0.2.0")
    assert old["source_hash"] != new["source_hash"] and len(new["source_hash"]) == 64
    assert first["plugins"]["task"]["mmlu"]["package"] == "prunelab"
    assert first["config"]["plugins"] == first["plugins"] and first["config_hash"] != second["config_hash"]
    # the single-layer variant is scored through the layer sweep (never pruned on its own): the layer
    # chart shows what each version declared, layer 3 and then layer 0
    assert chart_layers(runs["first"]) == {"every-kth[k=4]": 3, "drop-layers[layers=3]": 3}
    assert chart_layers(runs["second"]) == {"every-kth[k=4]": 0, "drop-layers[layers=3]": 3}


def chart_layers(folder: Path) -> dict[str, int]:
    """Each variant's point on the report's layer chart (its removed layer)."""
    report = (folder / "report.html").read_text()
    specs = json.loads(report.split('id="prunelab-chart-specs">', 1)[1].split("</script>", 1)[0])
    found: dict[str, int] = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("variant"), str) and isinstance(node.get("layer"), int):
                found[node["variant"]] = node["layer"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(specs["chart-layer_sweep"])
    return found


def test_a_pruned_variants_report_names_its_plugin(tiny_qwen3, tmp_path):
    """What ``prune`` reports (and ``prunelab.json`` keeps next to an exported model) names the plugin."""
    from prunelab.model import load_model, read_recipe, save_pruned
    from prunelab.prune import prune
    from prunelab.registry import default_registry

    loaded = load_model(str(tiny_qwen3), dtype="float32")
    report = prune(loaded, "drop-layers", layers="1")
    assert report["plugin"] == default_registry().identity("strategy", "drop-layers")
    assert report["plugin"]["package"] == "prunelab" and len(report["plugin"]["source_hash"]) == 64
    save_pruned(loaded, tmp_path / "pruned", report)
    assert read_recipe(tmp_path / "pruned")["plugin"] == report["plugin"]


def test_an_upgraded_plugin_reruns_what_it_produced_and_only_that(runs):
    second = json.loads((runs["second"] / "manifest.json").read_text())
    assert "with other plugins (strategy every-kth: 0.1.0" in runs["said"] and "-> 0.2.0" in runs["said"]
    assert sorted(map(tuple, second["reused"]["pairs"])) == [
        ("dense", "mmlu"), ("drop-layers[layers=3]", "mmlu"), ("drop-layers[layers=3]", "wikitext")]
    computed = {(variant, task) for variant, tasks in second["timings"]["evaluate_s"].items() for task in tasks}
    assert computed == {("every-kth[k=4]", "mmlu"), ("every-kth[k=4]", "wikitext"), ("dense", "wikitext")}
    for variant, task in second["reused"]["pairs"]:
        assert rows(runs["second"], variant, task).equals(rows(runs["first"], variant, task))
    # the rerun variant is the new code's: it removed layer 0, not layer 3 (drop-layers[layers=3]'s twin before)
    before, after = (rows(runs[k], "every-kth[k=4]", "mmlu") for k in ("first", "second"))
    assert before.select("item_id", "correct", "prediction").equals(
        rows(runs["first"], "drop-layers[layers=3]", "mmlu").select("item_id", "correct", "prediction"))
    assert not after.select("loglikelihoods").equals(before.select("loglikelihoods"))
    summary = pl.read_parquet(runs["second"] / "summary.parquet")
    assert set(summary["variant"]) == {"dense", "every-kth[k=4]", "drop-layers[layers=3]"}


def test_nothing_changed_reuses_the_whole_run(runs):
    assert runs["third"] == runs["second"]
    assert "this configuration already finished" in runs["again"]
