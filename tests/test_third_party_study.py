"""Third-party plugins of every kind, installed as packages, get what the built-ins get in one study.

The three examples -- ``every-kth`` (a depth strategy whose layers depend on the model),
``mlp-channels`` (a width strategy that shrinks the MLPs and ``intermediate_size``) and
``jsonl-choice`` (an evaluator with two accuracy metrics and categories, its data file given as a
task option) -- run next to the built-in ``drop-layers`` and ``mmlu``. ``every-kth`` with k = 4
removes layer 3 of the tiny 4-layer model, exactly what ``drop-layers`` with layers = 3 removes, and
k = 2 removes layers 1 and 3: their rows, statistics and chart points must be the built-in's. Every
number of the multiple-choice tables is recomputed here by hand from the per-item rows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import polars as pl
import pytest
from scipy.stats import binomtest

from .conftest import ENV, ROOT, install_example, study_text
from .report.test_artifacts import inline_values

EXAMPLES = ("every-kth-plugin", "mlp-channels-plugin", "jsonl-choice-plugin")
TOPICS = {"biology": ["heart", "leaf", "cell", "blood", "bone", "root"], "algebra": ["2", "4", "x", "9", "7", "1"]}
STRATEGIES = """
[[strategies]]
name = "every-kth"
k = [4, 2]

[[strategies]]
name = "drop-layers"
layers = [3, "1,3"]

[[strategies]]
name = "mlp-channels"
fraction = [0.3]
"""
TWINS = {"every-kth[k=4]": "drop-layers[layers=3]", "every-kth[k=2]": "drop-layers[layers=1,3]"}
SCRIPT = "import sys\nfrom prunelab.runner import load_study, run_study\nprint(run_study(load_study(sys.argv[1]), sys.argv[2]))\n"


def questions() -> list[dict]:
    """12 three-choice questions in two categories, answers spread over the letters."""
    rows = []
    for topic, words in TOPICS.items():
        for i, word in enumerate(words):
            choices = [word, f"not {word}", f"{word} and more"]
            rows.append({"id": f"{topic}-{i}", "question": f"Which one is {word}?", "choices": choices[i % 3:] +
                         choices[:i % 3], "answer": (-i) % 3, "category": topic})
    return rows


@pytest.fixture(scope="module")
def run(tiny_qwen3, small_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("third-party-study")
    paths = [install_example(ROOT / "examples" / name, root / name) for name in EXAMPLES]
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions()), encoding="utf-8")
    evaluation = f'\n[evaluation.jsonl-choice]\npath = "{data}"\nlimit = 6\n'
    text = study_text(tiny_qwen3, small_data, strategies=STRATEGIES, evaluation=evaluation)
    text = text.replace('tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["mmlu", "jsonl-choice"]')
    study = root / "tiny.toml"
    study.write_text(text.replace("chunk_items = 1", "chunk_items = 4"))
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(study), str(root / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _chart_specs(run: Path) -> dict:
    report = (run / "report.html").read_text()
    return json.loads(report.split('id="prunelab-chart-specs">', 1)[1].split("</script>", 1)[0])


def test_the_depth_plugin_gets_the_built_ins_rows_statistics_and_layer_chart(run):
    items = pl.read_parquet(run / "items.parquet")
    summary = pl.read_parquet(run / "summary.parquet")
    columns = ["task", "metric", "item_id", "correct", "value", "prediction", "prediction_norm", "target"]
    statistics = ["n", "correct", "accuracy", "value", "ci_low", "ci_high", "dense_value", "diff_vs_dense",
                  "lost", "gained", "p_value", "min_p", "verdict"]
    for plugin, builtin in TWINS.items():
        mine, theirs = (items.filter(pl.col("variant") == v).select(columns).sort("task", "metric", "item_id")
                        for v in (plugin, builtin))
        assert mine.height == theirs.height > 0 and mine.equals(theirs)
        mine, theirs = (summary.filter(pl.col("variant") == v).select(statistics).sort("n") for v in (plugin, builtin))
        assert mine.equals(theirs)
    manifest = _manifest(run)
    assert manifest["model_layers"] == 4
    assert manifest["variants"]["every-kth[k=2]"]["dropped_layers"] == [1, 3]
    (session,) = manifest["timings"]["sessions"]
    chunks_per_variant = session["chunks"] // len(manifest["timings"]["evaluate_s"])
    assert session["swept_chunks"] == 3 * chunks_per_variant  # dense, every-kth[k=4], drop-layers[layers=3]
    layer_chart = json.dumps(_chart_specs(run)["chart-layer_sweep"])
    for variant in ("every-kth[k=4]", "drop-layers[layers=3]"):
        assert variant in layer_chart
    for variant in ("every-kth[k=2]", "drop-layers[layers=1,3]", "mlp-channels[fraction=0.3]"):
        assert variant not in layer_chart  # not a single removed layer


def test_the_width_plugin_really_shrinks_and_gets_the_statistics(run):
    report = _manifest(run)["variants"]["mlp-channels[fraction=0.3]"]
    assert report["intermediate_size"] == {"before": 128, "after": 90}  # round(0.7 x 128 = 89.6)
    assert report["parameters"]["after"] == report["parameters"]["before"] - 4 * 3 * 64 * 38
    # its declared `achieved` reads its own report: recorded and drawn at 38 / 128 removed, not at 0.3
    (axis,) = _manifest(run)["sizes"]["mlp-channels[fraction=0.3]"]["axes"]
    assert (axis["amount"], axis["requested"]) == (38 / 128, 0.3)
    chart = _chart_specs(run)["chart-width_sweep_mlp_channels"]
    points = {(r["variant"], r["width"]) for r in inline_values(chart) if r.get("strategy") not in (None, "dense")}
    assert points == {("mlp-channels[fraction=0.3]", 100 * 38 / 128)}


def test_every_variant_gets_the_same_paired_statistics_by_hand(run):
    """Accuracy, exact McNemar (scipy) and Holm over the variants of a task and metric, from the rows."""
    items = pl.read_parquet(run / "items.parquet")
    summary = pl.read_parquet(run / "summary.parquet")
    assert set(summary.filter(pl.col("task") == "jsonl-choice")["metric"]) == {"acc", "acc_norm"}
    for (task, metric), rows in items.group_by(["task", "metric"]):
        if metric == "gold_prob":
            continue
        dense = {r["item_id"]: r["correct"] for r in rows.filter(pl.col("variant") == "dense").iter_rows(named=True)}
        p_values = {}
        for (variant,), group in rows.filter(pl.col("variant") != "dense").group_by(["variant"]):
            own = {r["item_id"]: r["correct"] for r in group.iter_rows(named=True)}
            lost = sum(dense[i] and not own[i] for i in own)
            gained = sum(own[i] and not dense[i] for i in own)
            p_values[variant] = binomtest(lost, lost + gained, 0.5).pvalue if lost + gained else 1.0
            row = summary.filter((pl.col("variant") == variant) & (pl.col("task") == task)
                                 & (pl.col("metric") == metric)).row(0, named=True)
            assert row["accuracy"] == pytest.approx(sum(own.values()) / len(own))
            assert (row["lost"], row["gained"]) == (lost, gained)
            assert row["p_value"] == pytest.approx(p_values[variant])
        ranked = sorted(p_values, key=p_values.get)
        running = 0.0
        for rank, variant in enumerate(ranked):
            running = max(running, min(1.0, (len(ranked) - rank) * p_values[variant]))
            row = summary.filter((pl.col("variant") == variant) & (pl.col("task") == task)
                                 & (pl.col("metric") == metric)).row(0, named=True)
            assert row["p_holm"] == pytest.approx(running)


def test_the_evaluator_scores_acc_and_acc_norm_from_its_loglikelihoods(run):
    """The plugin's two metrics follow from its own recorded log-likelihoods (argmax, and argmax per byte)."""
    by_id = {q["id"]: q for q in questions()}
    items = pl.read_parquet(run / "items.parquet").filter(pl.col("task") == "jsonl-choice")
    assert items.filter(pl.col("variant") == "dense").height == 2 * 12
    for row in items.iter_rows(named=True):
        q, lls = by_id[row["item_id"]], json.loads(row["loglikelihoods"])
        per_byte = [ll / len((" " + c).encode()) for ll, c in zip(lls, q["choices"], strict=True)]
        pick = max(range(3), key=lls.__getitem__) if row["metric"] == "acc" else max(range(3), key=per_byte.__getitem__)
        assert row["correct"] == (pick == q["answer"])
        assert row["target"] == "ABC"[q["answer"]] and row["category"] == q["category"]


def test_the_multiple_choice_tables_are_per_metric_and_right_by_hand(run):
    items = pl.read_parquet(run / "items.parquet")
    tables = _manifest(run)["sensitive_metrics"]
    # answer letters: one labelled block per (task, accuracy metric), each counting its own prediction field
    letters = {(r["task"], r["metric"], r["variant"]): r for r in tables["answer_letters"]}
    assert {(t, m) for t, m, _ in letters} == {("mmlu", "acc"), ("jsonl-choice", "acc"), ("jsonl-choice", "acc_norm")}
    field = {"acc": "prediction", "acc_norm": "prediction_norm"}
    categories: dict[tuple, list[bool]] = defaultdict(list)
    for row in items.filter(pl.col("correct").is_not_null()).iter_rows(named=True):
        categories[(row["task"], row["metric"], row["variant"], row["category"])].append(row["correct"])
    for (task, metric), rows in items.filter(pl.col("metric") != "gold_prob").group_by(["task", "metric"]):
        for (variant,), group in rows.group_by(["variant"]):
            counted = letters[(task, metric, variant)]
            for letter in "ABCD" if task == "mmlu" else "ABC":
                assert counted[letter] == sum(v == letter for v in group[field[metric]]), (task, metric, variant)
            assert counted["n"] == group.height
        gold = letters[(task, metric, "gold answers")]
        dense = rows.filter(pl.col("variant") == "dense")
        assert [gold[x] for x in "ABC"] == [sum(t == x for t in dense["target"]) for x in "ABC"]
    # accuracy per category: each metric's own, never pooled (n = 6 per category, not 12)
    found = {(r["task"], r["metric"], r["variant"], r["category"]): r for r in tables["category_accuracy"]}
    assert set(found) == set(categories)
    for key, outcomes in categories.items():
        assert found[key]["n"] == len(outcomes) and found[key]["accuracy"] == pytest.approx(sum(outcomes) / len(outcomes))
    assert {found[k]["n"] for k in found if k[0] == "jsonl-choice"} == {6}
    # chance: 1 / the number of declared choices, drawn on the accuracy charts of both tasks
    assert tables["chance"] == {"mmlu": 0.25, "jsonl-choice": pytest.approx(1 / 3)}
    chart = json.dumps(_chart_specs(run)["chart-dense_vs_pruned"])
    assert "chance 0.25" in chart and "chance 0.3333" in chart
    report = (run / "report.html").read_text()
    assert "Answer letters" in report and "Accuracy per category" in report and "acc_norm" in report
    assert math.isclose(tables["chance"]["jsonl-choice"], 1 / 3)
