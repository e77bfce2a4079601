"""`prunelab eval` end to end on a tiny model, and bad input: one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from prunelab.cli import main

from .conftest import DATA


def prunelab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr
    assert len([line for line in result.stderr.strip().splitlines() if line.strip()]) == 1, result.stderr


def test_eval_writes_results_and_items(tiny_qwen3, tmp_path):
    result = prunelab("eval", "--model", str(tiny_qwen3), "--tasks", "mmlu,gsm8k,wikitext", "--data-dir", str(DATA),
                      "--limit", "1", "--sample", "first", "--max-new-tokens", "4", "--seqlen", "64",
                      "--dtype", "float32", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["tasks"]["mmlu"]["n"] == 57 and 0 <= doc["tasks"]["mmlu"]["acc"] <= 1
    assert set(doc["tasks"]["mmlu"]["categories"]) == {"stem", "humanities", "social_sciences", "other"}
    assert {"exact_match_strict", "exact_match_flexible"} <= set(doc["tasks"]["gsm8k"])
    assert doc["tasks"]["wikitext"]["perplexity"] > 1
    assert doc["config"]["dtype"] == "float32"
    assert doc["item_ids"]["mmlu"][0] == "abstract_algebra/0"
    items = pl.read_parquet(tmp_path / "items.parquet")
    assert items.filter(pl.col("task") == "mmlu").height == 57
    assert items.filter(pl.col("task") == "gsm8k")["generated"].to_list()[0] is not None
    mmlu = items.filter(pl.col("task") == "mmlu")
    for row in mmlu.iter_rows(named=True):  # the stored prediction is the argmax of the stored log-likelihoods
        assert row["prediction"] == "ABCD"[max(range(4), key=lambda j: row["loglikelihoods"][j])]
        assert row["correct"] == (row["prediction"] == row["target"])


@pytest.mark.parametrize(("args", "fragment"), [
    (["--model", "/no/such/model"], "model not found: /no/such/model"),
    (["--model", "./missing.gguf"], "model not found"),
    (["--tasks", "mmlu,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--num-fewshot", "9"], "option 'num_fewshot': must be between 0 and 5"),
    (["--data-dir", "/no/such/data"], "data folder not found"),
])
def test_bad_input_is_one_line(args, fragment, capsys):
    code = main(["eval", "--data-dir", str(DATA), "--tasks", "mmlu", *args])
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess([], code, captured.out, captured.err), fragment)


def test_folder_without_config_json_in_a_real_process(tmp_path):
    assert_one_line_error(prunelab("eval", "--model", str(tmp_path), "--data-dir", str(DATA)), "has no config.json")


def test_malformed_csv_through_cli(tmp_path, tiny_qwen3):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "dev").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "virology_test.csv").write_text("q,a,b,c,d,A\n\"unclosed,a,b\n")
    (tmp_path / "mmlu" / "dev" / "virology_dev.csv").write_text("q,a,b,c,d,A\n" * 5)
    result = prunelab("eval", "--model", str(tiny_qwen3), "--tasks", "mmlu", "--data-dir", str(tmp_path))
    assert_one_line_error(result, "virology_test.csv:")


def test_a_progress_message_stays_one_line_however_long(capsys):
    """Rich wraps at 80 columns when stderr is not a terminal; a message with a long path must stay
    whole, so that logs and the tests that read them see it as written."""
    from prunelab.cli import console

    message = f"loading {'/deep' * 40}/model.gguf"
    console.print(message, highlight=False, markup=False)
    assert capsys.readouterr().err == message + "\n"
