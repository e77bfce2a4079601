"""The study runner: study files, variants, chunked and resumable evaluation, artifacts, the CLI.

The end-to-end test runs a small study on a tiny random model through ``prunelab study run``, kills
it with SIGKILL half-way, checks that another configuration cannot reuse the unfinished output,
resumes it and compares every per-item result with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import DataSource, Subset
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.run import prepare_tasks, run_task
from prunelab.model.loading import load_model
from prunelab.plugin import TaskResult
from prunelab.registry import default_registry
from prunelab.runner import identity
from prunelab.runner import session as session_module
from prunelab.runner.chunks import chunk_ranges, chunk_task, item_rows
from prunelab.runner.run import run_study
from prunelab.runner.studyfile import WORK, expand, load_study
from prunelab.runner.variants import Variant, expand_variants

from ..conftest import ENV, ROOT, chunk_files, cli, run_folder, sorted_items, study_text


def prunelab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], capture_output=True, text=True,
                          timeout=600, env=ENV, **kwargs)




def test_study_killed_refused_resumed_equals_uninterrupted(tiny_qwen3, small_data, tmp_path, capsys, one_thread,
                                                          monkeypatch):
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data))
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    # 1. start through the CLI, and SIGKILL it once some chunks are on disk
    process = subprocess.Popen([sys.executable, "-m", "prunelab.cli", "study", "run", str(study), "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 300
    while len(chunk_files(killed) if (killed / "tiny" / WORK).is_dir() else {}) < 6:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no chunk written in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    before = chunk_files(killed)
    saved = {path: pl.read_parquet(path) for path in before}
    plan = json.loads((killed / "tiny" / WORK / "plan.json").read_text())
    total_chunks = len(plan["variants"]) * sum(len(r) for r in plan["chunks"].values())
    assert len(plan["variants"]) == 4 and len(before) < total_chunks, "killed too late: the run had finished"

    # 2. another configuration must not mix its results into the unfinished work
    other = tmp_path / "other.toml"
    other.write_text(study_text(tiny_qwen3, small_data).replace("sparsity = [50]", "sparsity = [60]"))
    status, err = cli(capsys, "study", "run", str(other), "--out", str(killed))
    assert status == 2 and "different configuration" in err and len(err.strip().splitlines()) == 1, err
    assert chunk_files(killed) == before

    # 3. resume through the CLI, and run the same study uninterrupted through the Python API
    resumed = prunelab("study", "run", str(study), "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(before)} of {total_chunks} items already evaluated" in resumed.stderr
    run_study(load_study(study), whole)

    folder = run_folder(killed)
    assert sorted_items(folder).equals(sorted_items(run_folder(whole)))
    manifest = json.loads((folder / "manifest.json").read_text())
    sessions = manifest["timings"]["sessions"]
    assert len(sessions) == 2
    assert sessions[0]["chunks"] == len(before)  # every chunk the killed session finished was kept ...
    assert sessions[1]["chunks"] == total_chunks - len(before)  # ... and the resumed one computed only the rest
    items = pl.read_parquet(folder / "items.parquet")
    keys = ["variant", "task", "metric", "item_id"]
    for path, frame in saved.items():  # the kept chunks' rows are in the final table unchanged
        final = items.join(frame.select(keys), on=keys, how="semi").select(frame.columns)
        assert final.equals(frame), path
    assert not (killed / "tiny" / WORK).exists(), "the work folder is removed once the run is written"

    # 4. what the run folder holds
    variants = ["dense", "drop-layers[layers=1]", "drop-layers[layers=3]", "magnitude[sparsity=50,order=smallest]"]
    assert list(dict.fromkeys(items["variant"])) == variants
    counts = dict(((task, metric), n) for task, metric, n in items.group_by("task", "metric").len().iter_rows())
    assert counts == {("mmlu", "acc"): 4 * 4, ("mmlu", "gold_prob"): 4 * 4, ("gsm8k", "exact_match_strict"): 4 * 2,
                      ("gsm8k", "exact_match_flexible"): 4 * 2, ("wikitext", "perplexity"): 4 * 2,
                      ("wikitext", "kl_mean"): 4 * 2, ("wikitext", "top1_agree"): 4 * 2}
    wikitext = items.filter((pl.col("task") == "wikitext") & (pl.col("metric") == "perplexity"))
    assert wikitext["correct"].null_count() == 8 and (wikitext["tokens"] == 63).all()
    # every variant is compared with the dense model, also those the killed session left to the resumed one
    kl = items.filter((pl.col("task") == "wikitext") & (pl.col("metric") == "kl_mean"))
    assert kl["value"].null_count() == 0 and (kl.filter(pl.col("variant") != "dense")["value"] > 0).all()
    for row in items.filter((pl.col("task") == "mmlu") & (pl.col("metric") == "acc")).iter_rows(named=True):
        lls = json.loads(row["loglikelihoods"])
        assert row["prediction"] == "ABCD"[max(range(4), key=lambda j: lls[j])]
        assert row["correct"] == (row["prediction"] == row["target"])
    summary = pl.read_parquet(folder / "summary.parquet")
    dense_mmlu = summary.filter(variant="dense", task="mmlu").row(0, named=True)
    assert dense_mmlu["accuracy"] == items.filter(variant="dense", task="mmlu")["correct"].mean()
    for name in ("report.html", "items.csv", "summary.csv", "charts/layer_sweep.html", "charts/sparsity_sweep.png"):
        assert (folder / name).is_file(), name
    assert manifest["study_file"] == study.read_text()
    assert manifest["model"] == tiny_qwen3.name and manifest["model_hash"] and manifest["device"] == "cpu"
    assert manifest["config"]["evaluation"]["chunk_items"] == 1
    assert manifest["variants"]["drop-layers[layers=3]"]["dropped_layers"] == [3]
    total = manifest["variants"]["magnitude[sparsity=50,order=smallest]"]["sparsity"]["total"]
    assert total["sparsity_pct"] == pytest.approx(50, abs=0.01)
    assert folder.name in (killed / "index.html").read_text()

    # 5. a finished configuration is not computed again; `prunelab index` rebuilds the index
    status, err = cli(capsys, "study", "run", str(study), "--out", str(killed))
    assert status == 0 and "already finished" in err
    assert run_folder(killed) == folder
    (killed / "index.html").unlink()
    assert cli(capsys, "index", "--root", str(killed))[0] == 0
    assert folder.name in (killed / "index.html").read_text()
    status, err = cli(capsys, "index", "--root", str(tmp_path / "nothing"))
    assert status == 2 and "artifacts folder not found" in err

    # 6. the manifest says what ran: declared metrics, decoding, machine, tests; the config hash covers the code
    assert {(m["task"], m["name"], m["kind"]) for m in manifest["metrics"]} == {
        ("mmlu", "acc", "accuracy"), ("gsm8k", "exact_match_strict", "accuracy"),
        ("gsm8k", "exact_match_flexible", "accuracy"), ("wikitext", "perplexity", "perplexity"),
        ("mmlu", "gold_prob", "mean"), ("wikitext", "kl_mean", "mean"), ("wikitext", "top1_agree", "mean")}
    assert manifest["decoding"]["decoding"].startswith("greedy") and manifest["machine"]["torch_threads"] == 1
    assert manifest["config"]["code"]["prunelab"] and "statistics" in manifest

    # 7. `prunelab report` rebuilds summary, charts and report from the stored items, without a model
    summary_before = pl.read_parquet(folder / "summary.parquet")
    (folder / "report.html").unlink()
    (folder / "summary.parquet").unlink()
    monkeypatch.setattr(session_module, "load_model", None)  # no model may be loaded
    status, err = cli(capsys, "report", str(folder))
    assert status == 0, err
    assert pl.read_parquet(folder / "summary.parquet").equals(summary_before)
    assert "Findings" in (folder / "report.html").read_text()
    assert json.loads((folder / "manifest.json").read_text())["report_rebuilt"]["prunelab"]
    status, err = cli(capsys, "report", str(tmp_path))
    assert status == 2 and "not a run folder" in err
    monkeypatch.undo()

    # 8. a finished run of other code is not reused silently
    monkeypatch.setattr(identity, "code_version", lambda commit=None: {"prunelab": "0.0.1", "commit": "fffffff"})
    status, err = cli(capsys, "study", "run", str(study), "--out", str(killed))
    assert status == 0 and "ran this configuration with other code" in err, err
    assert len([p for p in (killed / "tiny").iterdir() if not p.name.startswith(".")]) == 2


# ------------------------------------------------------------------------------------ study files
def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


BAD_STUDIES = [
    ("unknown strategy", '[[strategies]]\nname = "nosuch"\n', "unknown strategy 'nosuch'"),
    ("bad option type", '[[strategies]]\nname = "magnitude"\nsparsity = ["lots"]\n', "option 'sparsity' expects"),
    ("bad choice in a grid", '[[strategies]]\nname = "magnitude"\norder = ["smallest", "biggest"]\n',
     "option 'order' must be one of"),
    ("unknown option", '[[strategies]]\nname = "magnitude"\norderr = "largest"\n', "unknown option(s) orderr"),
    ("bad layers", '[[strategies]]\nname = "drop-layers"\nlayers = "3-1"\n', "empty range"),
    ("strategy without name", '[[strategies]]\nsparsity = 50\n', "has no name"),
    ("empty grid", '[[strategies]]\nname = "magnitude"\nsparsity = []\n', "empty list"),
    ("contradicting pattern", '[[strategies]]\nname = "magnitude"\nsparsity = 30\npattern = "2:4"\n',
     "contradicts sparsity"),
    ("calibration unused", '[calibration]\nsamples = 8\n', "no strategy uses calibration"),
    ("bench unknown key", '[bench]\nbatch = [1]\n', "unknown key(s) batch"),
    ("bench bad lengths", '[bench]\nprompt_lengths = [0]\n', "prompt_lengths must be positive integers"),
    ("bench bad repeats", '[bench]\nrepeats = "3"\n', "repeats must be a positive integer"),
]


@pytest.mark.parametrize(("case", "extra", "fragment"), BAD_STUDIES, ids=[c[0] for c in BAD_STUDIES])
def test_bad_study_files_fail_in_one_line_before_any_model(tmp_path, monkeypatch, case, extra, fragment):
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = write_study(tmp_path, f'model = "{tmp_path}/missing-model"\n\n{extra}')
    with pytest.raises(PrunelabError) as error:
        load_study(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_yaml_study_reads_like_the_same_toml_study(tmp_path):
    """YAML and TOML are two spellings of one study: the same settings, hence the same configuration."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    toml = tmp_path / "a" / "grid.toml"
    toml.write_text('model = "Qwen/Qwen3-0.6B"\ndtype = "float32"\n[evaluation]\ntasks = ["mmlu", "wikitext"]\n'
                    'limit = 3\n[evaluation.wikitext]\nseqlen = 128\n[[strategies]]\nname = "magnitude"\n'
                    'sparsity = [10, 50]\norder = ["smallest", "largest"]\n[[strategies]]\nname = "drop-layers"\n'
                    'layers = "each"\n')
    yml = tmp_path / "b" / "grid.yaml"
    yml.write_text("model: Qwen/Qwen3-0.6B\ndtype: float32\nevaluation:\n  tasks: [mmlu, wikitext]\n  limit: 3\n"
                   "  wikitext:\n    seqlen: 128\nstrategies:\n  - name: magnitude\n    sparsity: [10, 50]\n"
                   "    order: [smallest, largest]\n  - name: drop-layers\n    layers: each\n")
    a, b = load_study(toml), load_study(yml)
    assert a.settings == b.settings and a.name == b.name == "grid"
    assert [v.name for v in expand_variants(a, 4)] == [v.name for v in expand_variants(b, 4)]
    for text, fragment in [("model: [unclosed\n", "invalid YAML"), ("- just\n- a list\n", "a mapping"),
                           ("model: !!python/object/apply:os.system ['true']\n", "invalid YAML")]:
        yml.write_text(text)
        with pytest.raises(PrunelabError, match=fragment) as error:
            load_study(yml)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize(("text", "fragment"), [
    ('model = "x"\nmodle = "y"\n', "unknown key(s) modle"),
    ('name = "x"\n', "no model"),
    ('model = "x"\n[evaluation]\ntasks = ["mmlu", "nosuchtask"]\n', "unknown task 'nosuchtask'"),
    ('model = "x"\n[evaluation]\nfraction = 2\n', "fraction must be in (0, 1]"),
    ('model = "x"\n[evaluation]\nlimit = "3"\n', "limit must be int"),
    ('model = "x"\n[evaluation]\nnum_fewshot = 9\n', "between 0 and 5"),
    ('model = "x"\n[evaluation]\nchunk_items = 0\n', "chunk_items must be a positive integer"),
    ('model = "x"\n[evaluation]\nseqlenn = 64\n', "unknown key(s) seqlenn"),
    ('model = "x"\ndevice = "cuda:7"\n', "cuda"),
    ('model = "x"\nname = "../up"\n', "not a plain folder name"),
    ('model = "x\n', "invalid TOML"),
    ('model = "${PRUNELAB_SURELY_UNSET_VARIABLE}/m.gguf"\n', "PRUNELAB_SURELY_UNSET_VARIABLE is not set"),
    ('model = "x"\n[evaluation]\ntasks = ["wikitext"]\n[tolerance.wikitext]\nperplexity = 0.1\n',
     "metric 'perplexity' takes no tolerance (those that do: kl_mean, top1_agree)"),
    ('model = "x"\n[evaluation]\ntasks = ["wikitext"]\n[tolerance.mmlu]\nacc = 0.1\n', "task 'mmlu' is not in"),
    ('model = "x"\n[evaluation]\ntasks = ["wikitext"]\n[tolerance.wikitext]\nkl_mean = -1\n',
     "must be a non-negative number"),
    ('model = "x"\n[tolerance]\nkl_mean = 0.1\n', "expected [tolerance.<task>] tables"),
])
def test_bad_study_settings(tmp_path, text, fragment):
    if fragment == "cuda":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present")
    with pytest.raises(PrunelabError) as error:
        load_study(write_study(tmp_path, text))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_study_sets_its_own_tolerance_and_the_manifest_records_it(tmp_path):
    from prunelab.registry import default_registry
    from prunelab.runner.run import declared_metrics

    study = load_study(write_study(tmp_path, 'model = "x"\n[evaluation]\ntasks = ["wikitext"]\n'
                                             '[tolerance.wikitext]\nkl_mean = 0.002\n'))
    assert study.tolerances == {("wikitext", "kl_mean"): 0.002}
    task = type("Prepared", (), {"evaluator": default_registry().evaluator("wikitext")})()
    declared = {m["name"]: m["tolerance"] for m in declared_metrics([task], study.tolerances)}
    assert declared == {"perplexity": None, "kl_mean": 0.002, "top1_agree": 0.01}  # the rest as the evaluator declares


def test_bad_study_through_the_cli_is_one_line(tmp_path):
    path = write_study(tmp_path, 'model = "x"\n[[strategies]]\nname = "magnitude"\nsparsity = "lots"\n')
    result = prunelab("study", "run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "option 'sparsity' expects" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_grids_expand_to_the_dense_baseline_then_each_point(tmp_path):
    path = write_study(tmp_path, """model = "Qwen/Qwen3-0.6B"
[[strategies]]
name = "drop-layers"
layers = "each"
[[strategies]]
name = "drop-layers"
layers = ["0-1", "1-3"]
[[strategies]]
name = "magnitude"
sparsity = [10, 20]
order = ["smallest", "largest"]
scope = "row"
""")
    names = [v.name for v in expand_variants(load_study(path), num_layers=4)]
    assert names == [
        "dense", "drop-layers[layers=0]", "drop-layers[layers=1]", "drop-layers[layers=2]", "drop-layers[layers=3]",
        "drop-layers[layers=0-1]", "drop-layers[layers=1-3]",
        "magnitude[sparsity=10,order=smallest,scope=row]", "magnitude[sparsity=10,order=largest,scope=row]",
        "magnitude[sparsity=20,order=smallest,scope=row]", "magnitude[sparsity=20,order=largest,scope=row]",
    ]


def test_duplicate_variants_and_layers_beyond_the_model_are_errors(tmp_path):
    twice = write_study(tmp_path, 'model = "m"\n[[strategies]]\nname = "drop-layers"\nlayers = ["each", 2]\n')
    with pytest.raises(PrunelabError, match=r"variant drop-layers\[layers=2\] appears twice"):
        expand_variants(load_study(twice), num_layers=4)
    beyond = write_study(tmp_path, 'model = "m"\n[[strategies]]\nname = "drop-layers"\nlayers = [1, "2-5"]\n')
    with pytest.raises(PrunelabError, match=r"layers \[4, 5\] out of range, the model has layers 0-3"):
        expand_variants(load_study(beyond), num_layers=4)


def test_paths_are_relative_to_the_study_file_and_variables_expand(tmp_path, monkeypatch):
    folder = tmp_path / "studies"
    folder.mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("PRUNELAB_TEST_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("PRUNELAB_UNSET_FOR_TEST", raising=False)
    path = folder / "s.toml"
    path.write_text('model = "${PRUNELAB_TEST_DIR}/m.gguf"\n[evaluation]\ndata_dir = "../data"\n')
    study = load_study(path)
    assert study.model == str(tmp_path / "models" / "m.gguf")
    assert study.data_dir.resolve() == (tmp_path / "data").resolve()
    assert study.settings["model"] == "${PRUNELAB_TEST_DIR}/m.gguf"  # the hash does not depend on this machine
    assert expand("${PRUNELAB_UNSET_FOR_TEST:-~/x}/y") == os.path.expanduser("~/x/y")
    assert load_study(path, data_dir=tmp_path).data_dir == tmp_path  # --data-dir wins
    path.write_text('model = "./here/model"\n')
    assert load_study(path).model == str(folder / "here" / "model")
    path.write_text('model = "Qwen/Qwen3-0.6B"\n')
    assert load_study(path).model == "Qwen/Qwen3-0.6B"  # a Hub id is left alone


@pytest.mark.parametrize("name", sorted(path.stem for path in (ROOT / "studies").glob("*.toml")))
def test_shipped_studies_validate(name):
    study = load_study(ROOT / "studies" / f"{name}.toml")
    assert study.name == name
    variants = expand_variants(study, num_layers=28 if name == "seed" else 30)
    strategies = {v.strategy for v in variants}
    expected = {"qwen2.5-layers": {"dense", "drop-layers"},
                "qwen2.5-sparsity": {"dense", "magnitude", "wanda", "sparsegpt"},
                "qwen2.5-mmlu": {"dense", "drop-layers", "magnitude", "wanda"},
                "smollm2-width": {"dense", "drop-block", "width", "magnitude"}}
    assert expected.get(name, {"dense", "drop-layers", "magnitude"}) <= strategies
    if name == "seed":
        assert study.model == "Qwen/Qwen3-0.6B"
        assert {s.fraction for s in study.subsets.values()} == {0.1}
        assert study.tasks == ["mmlu", "gsm8k", "wikitext"]
        assert sum(v.strategy == "drop-layers" for v in variants) == 28
        assert {(v.params["sparsity"], v.params["order"]) for v in variants if v.strategy == "magnitude"} == \
            {(s, o) for s in range(10, 90, 10) for o in ("smallest", "largest")}


# ------------------------------------------------------------------------------------ per-item rows
def test_item_rows_map_each_task_to_its_metrics():
    variant = Variant("magnitude[sparsity=50]", "magnitude", {"sparsity": 50})
    gsm8k = TaskResult("gsm8k", {"n": 2, "exact_match_strict": 0.5, "exact_match_strict_stderr": 0.5,
                                 "exact_match_flexible": 1.0, "exact_match_flexible_stderr": 0.0}, [
        {"item_id": "test/0", "generated": "#### 4", "correct_strict": True, "correct_flexible": True, "correct": True},
        {"item_id": "test/1", "generated": "5", "correct_strict": False, "correct_flexible": True, "correct": False},
    ])
    declared = {name: default_registry().evaluator(name).metrics for name in ("gsm8k", "mmlu", "wikitext")}
    rows = item_rows(variant, "gsm8k", gsm8k, declared["gsm8k"])
    assert rows.select("metric", "item_id", "correct").rows() == [
        ("exact_match_strict", "test/0", True), ("exact_match_flexible", "test/0", True),
        ("exact_match_strict", "test/1", False), ("exact_match_flexible", "test/1", True)]
    assert set(rows["params"]) == {'{"sparsity": 50}'} and set(rows["generated"]) == {"#### 4", "5"}
    mmlu = TaskResult("mmlu", {"n": 1, "acc": 1.0, "acc_stderr": float("nan")},
                      [{"item_id": "x/0", "correct": True, "loglikelihoods": [-1.0, -2.0, -3.0, -4.0]}])
    rows = item_rows(variant, "mmlu", mmlu, declared["mmlu"])
    assert rows["metric"].to_list() == [m.name for m in declared["mmlu"]]  # one row per declared metric
    assert rows.filter(pl.col("metric") == "acc").select("metric", "correct").rows() == [("acc", True)]
    assert json.loads(rows["loglikelihoods"][0]) == [-1.0, -2.0, -3.0, -4.0]  # CSV-safe
    wiki = TaskResult("wikitext", {"n": 1, "perplexity": 9.0}, [{"item_id": "window/3", "nll_sum": 2.5, "tokens": 63,
                                                                 "correct": None}])
    rows = item_rows(variant, "wikitext", wiki, declared["wikitext"])
    assert rows.filter(pl.col("metric") == "perplexity").select("metric", "correct", "nll_sum", "tokens").rows() == [
        ("perplexity", None, 2.5, 63)]
    assert rows.schema["correct"] == pl.Boolean
    with pytest.raises(PrunelabError, match="declares no metrics"):  # the core never guesses them from keys
        item_rows(variant, "wikitext", wiki, ())


def test_window_chunks_score_the_same_windows_as_one_pass(tiny_qwen3, small_data):
    """WikiText is one document whose windows are chosen once the tokenizer is known; chunks slice them."""
    (task,) = prepare_tasks(["wikitext"], DataSource.resolve(small_data), Subset(limit=7, seed=7), {"seqlen": 64})
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer, loaded.adapter)
    whole = run_task(engine, task).records
    ranges = chunk_ranges(task, engine, 3)
    assert ranges[0] == (0, 3) and ranges[-1][1] == len(whole) and len(ranges) == -(-len(whole) // 3)
    chunked = [r for start, stop in ranges for r in run_task(engine, chunk_task(task, start, stop)).records]
    assert [r["item_id"] for r in chunked] == [r["item_id"] for r in whole]
    assert [r["nll_sum"] for r in chunked] == pytest.approx([r["nll_sum"] for r in whole], rel=1e-6)


def test_layer_sweep_in_the_runner_equals_one_pruned_model_per_variant(tiny_qwen3, small_data, tmp_path, one_thread):
    """The runner's shared layer sweep gives every item the result of evaluating each pruned model alone."""
    strategies = '[[strategies]]\nname = "drop-layers"\nlayers = "each"\n\n[[strategies]]\nname = "drop-layers"\nlayers = ["1-2"]\n'
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace("chunk_items = 1", "chunk_items = 3"))
    swept = run_study(load_study(study), tmp_path / "swept")
    naive = run_study(load_study(study), tmp_path / "naive", layer_sweep=False)

    events = json.loads((swept / "manifest.json").read_text())["timings"]
    # dense and the 4 single-layer variants on mmlu (4 items: chunks of 3 and 1) and wikitext (2 windows)
    assert [s["swept_chunks"] for s in events["sessions"]] == [5 * 3]
    assert [s["swept_chunks"] for s in json.loads((naive / "manifest.json").read_text())["timings"]["sessions"]] == [0]
    assert set(events["evaluate_s"]) == {"dense", *(f"drop-layers[layers={i}]" for i in range(4)), "drop-layers[layers=1-2]"}
    got, expected = sorted_items(swept), sorted_items(naive)
    assert got.select("variant", "task", "metric", "item_id", "prediction", "correct").equals(
        expected.select("variant", "task", "metric", "item_id", "prediction", "correct"))
    mmlu = (pl.col("task") == "mmlu") & (pl.col("metric") == "acc")  # one row per question
    lls = [json.loads(x) for x in got.filter(mmlu)["loglikelihoods"]]
    reference = [json.loads(x) for x in expected.filter(mmlu)["loglikelihoods"]]
    assert len(lls) == 6 * 4 and lls == [pytest.approx(r, abs=1e-5) for r in reference]
    windows = (pl.col("task") == "wikitext") & (pl.col("metric") == "perplexity")
    assert got.filter(windows)["nll_sum"].to_list() == pytest.approx(expected.filter(windows)["nll_sum"].to_list(), rel=1e-6)
    # fidelity to dense: the sweep compares with its own dense pass, the naive run with the stored reference
    for metric in ("kl_mean", "top1_agree"):
        rows = (pl.col("task") == "wikitext") & (pl.col("metric") == metric)
        assert got.filter(rows)["value"].to_list() == pytest.approx(expected.filter(rows)["value"].to_list(),
                                                                    rel=1e-5, abs=1e-7)
    kl, top1 = ((pl.col("task") == "wikitext") & (pl.col("metric") == m) for m in ("kl_mean", "top1_agree"))
    dense = pl.col("variant") == "dense"
    assert (got.filter(kl & dense)["value"] == 0).all() and (got.filter(top1 & dense)["value"] == 1).all()
    assert (got.filter(kl & ~dense)["value"] > 0).all()
    gsm8k = got["task"] == "gsm8k"  # generated, one pruned model at a time either way
    assert got.filter(gsm8k)["generated"].to_list() == expected.filter(gsm8k)["generated"].to_list()
    assert len(set(lls[4 * k][0] for k in range(6))) == 6, "variants must differ from each other"


def test_bench_records_each_variants_size_and_speed(tiny_qwen3, small_data, tmp_path, one_thread):
    """``[bench]``: every variant measured once (swept ones too), as a table, a chart and a report section."""
    strategies = '[[strategies]]\nname = "drop-layers"\nlayers = [0, 2]\n\n[[strategies]]\nname = "magnitude"\nsparsity = 50\n'
    bench = "\n[bench]\nprompt_lengths = [8, 16]\nbatches = [1, 2]\nnew_tokens = 2\nrepeats = 1\n"
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]') + bench)
    run = run_study(load_study(study), tmp_path / "out")
    table = pl.read_parquet(run / "bench.parquet")
    assert table["variant"].to_list() == ["dense", "drop-layers[layers=0]", "drop-layers[layers=2]",
                                          "magnitude[sparsity=50]"]
    rows = {r["variant"]: r for r in table.iter_rows(named=True)}
    dense = load_model(str(tiny_qwen3), dtype="float32")
    layer_params = sum(p.numel() for p in dense.adapter.layers[0].parameters())
    assert rows["dense"]["parameters"] == sum(p.numel() for p in dense.model.parameters())
    assert rows["drop-layers[layers=0]"]["parameters"] == rows["dense"]["parameters"] - layer_params
    assert rows["drop-layers[layers=2]"]["decoder_layers"] == 3 and rows["magnitude[sparsity=50]"]["decoder_layers"] == 4
    assert rows["dense"]["decode_speedup"] == 1.0 and rows["dense"]["prefill_speedup"] == 1.0
    for row in rows.values():
        assert row["prefill_tokens_per_s_len8"] > 0 and row["prefill_tokens_per_s_len16"] > 0
        assert row["decode_tokens_per_s_batch1"] > 0 and row["decode_tokens_per_s_batch2"] > 0
        assert row["decode_speedup"] == pytest.approx(row["decode_tokens_per_s_batch1"]
                                                      / rows["dense"]["decode_tokens_per_s_batch1"])
    assert (run / "bench.csv").is_file() and (run / "charts" / "quality_vs_speed.html").is_file()
    assert "Size and speed" in (run / "report.html").read_text()
    assert json.loads((run / "manifest.json").read_text())["config"]["bench"]["batches"] == [1, 2]
