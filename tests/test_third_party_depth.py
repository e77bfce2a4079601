"""A third-party depth strategy (examples/drop-range-plugin), installed the normal way, gets what the
built-in drop-layers gets with no change to prunelab: ``start = "each"`` expands to every layer, its
single-layer variants share one layer sweep, and the report draws them on the layer chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from .conftest import ENV, ROOT, install_example, study_text

EXAMPLE = ROOT / "examples" / "drop-range-plugin"
STRATEGIES = '[[strategies]]\nname = "drop-range"\nstart = "each"\ncount = [1]\n\n' \
             '[[strategies]]\nname = "drop-range"\nstart = [1]\ncount = [2]\n'
# Runs the study twice in one fresh interpreter (the plugin is found through its entry point there):
# through the layer sweep, and with one pruned model per variant (the plugin's own prune).
SCRIPT = """
import sys
from pathlib import Path
from prunelab.runner import load_study, run_study
study = load_study(sys.argv[1])
print(run_study(study, sys.argv[2]))
print(run_study(study, sys.argv[3], layer_sweep=False))
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    return install_example(EXAMPLE, tmp_path_factory.mktemp("drop-range-plugin"))


@pytest.fixture(scope="module")
def runs(plugin_path, tiny_qwen3, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("depth-study")
    study = root / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=STRATEGIES).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["mmlu", "wikitext"]'))
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(study), str(root / "swept"), str(root / "naive")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    swept, naive = (line for line in done.stdout.strip().splitlines()[-2:])
    return {"swept": Path(swept), "naive": Path(naive)}


def test_each_expands_to_every_layer_and_single_layers_share_the_sweep(runs):
    manifest = json.loads((runs["swept"] / "manifest.json").read_text())
    variants = set(manifest["timings"]["evaluate_s"])
    assert variants == {"dense", *(f"drop-range[start={i},count=1]" for i in range(4)), "drop-range[start=1,count=2]"}
    (session,) = manifest["timings"]["sessions"]
    naive = json.loads((runs["naive"] / "manifest.json").read_text())["timings"]["sessions"]
    assert [s["swept_chunks"] for s in naive] == [0]
    # dense and the four single-layer variants go through the sweep; the two-layer range does not
    items = pl.read_parquet(runs["swept"] / "items.parquet")
    per_variant_chunks = session["chunks"] // items["variant"].n_unique()
    assert session["swept_chunks"] == 5 * per_variant_chunks


def test_swept_results_equal_one_pruned_model_per_variant(runs):
    """The sweep's answers for the plugin's variants are the plugin's own pruned models' answers."""
    columns = ("variant", "task", "metric", "item_id", "prediction", "correct")
    swept, naive = (pl.read_parquet(runs[k] / "items.parquet").sort("variant", "task", "metric", "item_id")
                    for k in ("swept", "naive"))
    assert swept.select(columns).equals(naive.select(columns))
    for name in ("nll_sum", "tokens"):
        got, expected = swept[name].to_list(), naive[name].to_list()
        assert [g is None for g in got] == [e is None for e in expected]
        assert all(g is None or g == pytest.approx(e, rel=1e-4) for g, e in zip(got, expected, strict=True))


def test_the_plugins_single_layer_variants_are_on_the_layer_chart(runs):
    report = (runs["swept"] / "report.html").read_text()
    specs = json.loads(report.split('id="prunelab-chart-specs">', 1)[1].split("</script>", 1)[0])
    chart = json.dumps(specs["chart-layer_sweep"])
    for layer in range(4):
        assert f"drop-range[start={layer},count=1]" in chart
    assert "drop-range[start=1,count=2]" not in chart  # two layers: not a point of the single-layer sweep
