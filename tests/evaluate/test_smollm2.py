"""Integration on real weights (SmolLM2-135M): the CLI's numbers against independent computations.

The references here build prompts with their own format strings and score with plain Hugging Face
calls (full-sequence forward, ``generate``, ``labels=`` loss), sharing no code with the engine.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import polars as pl
import pytest
import torch

from ..conftest import DATA

pytestmark = pytest.mark.slow
SUBJECTS = ("abstract_algebra", "high_school_geography", "virology")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Three MMLU subjects, GSM8K and WikiText-2, copied so the CLI runs a handful of items."""
    root = tmp_path_factory.mktemp("data")
    for split in ("test", "dev"):
        (root / "mmlu" / split).mkdir(parents=True)
        for subject in SUBJECTS:
            shutil.copy(DATA / "mmlu" / split / f"{subject}_{split}.csv", root / "mmlu" / split)
    shutil.copytree(DATA / "gsm8k", root / "gsm8k")
    shutil.copytree(DATA / "wikitext-2", root / "wikitext-2")
    return root


@pytest.fixture(scope="module")
def cli_run(smollm2_gguf, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    args = [sys.executable, "-m", "prunelab.cli", "eval", "--model", str(smollm2_gguf), "--data-dir", str(small_data),
            "--tasks", "mmlu,gsm8k,wikitext", "--limit", "2", "--sample", "first", "--max-new-tokens", "48",
            "--seqlen", "256", "--dtype", "float32", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), pl.read_parquet(out / "items.parquet")


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    """The same converted weights, loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunelab.model.loading import gguf_to_folder

    folder = gguf_to_folder(smollm2_gguf)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def read_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def mmlu_prompt(subject: str, row: int) -> str:
    def block(r, answer=True):
        text = f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"
        return text + (f" {r[5]}" if answer else "")

    dev = read_rows(DATA / "mmlu" / "dev" / f"{subject}_dev.csv")[:5]
    test = read_rows(DATA / "mmlu" / "test" / f"{subject}_test.csv")[row]
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return head + "\n\n".join(block(r) for r in dev) + "\n\n" + block(test, answer=False)


def test_mmlu_matches_full_sequence_reference(cli_run, hf):
    model, tokenizer = hf
    results, items = cli_run
    mmlu = items.filter(pl.col("task") == "mmlu")
    assert mmlu.height == 2 * len(SUBJECTS) == results["tasks"]["mmlu"]["n"]
    letters = [tokenizer(f" {x}", add_special_tokens=False)["input_ids"] for x in "ABCD"]
    assert all(len(t) == 1 for t in letters)
    for row in mmlu.iter_rows(named=True):
        subject, index = row["item_id"].split("/")
        ids = torch.tensor([tokenizer(mmlu_prompt(subject, int(index)), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        expected = [logprobs[t[0]].item() for t in letters]
        assert row["loglikelihoods"] == pytest.approx(expected, abs=1e-3)
        assert row["prediction"] == "ABCD"[max(range(4), key=lambda j: expected[j])]
    assert results["tasks"]["mmlu"]["acc"] == pytest.approx(mmlu["correct"].mean())


def test_gsm8k_matches_hf_generate(cli_run, hf):
    model, tokenizer = hf
    _, items = cli_run
    train = [json.loads(line) for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()][:5]
    test = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in train)
    for row in items.filter(pl.col("task") == "gsm8k").iter_rows(named=True):
        question = test[int(row["item_id"].split("/")[1])]["question"]
        ids = torch.tensor([tokenizer(shots + f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("Question:")[0]
        assert row["generated"] == text


def test_perplexity_matches_hf_loss(cli_run, hf):
    model, tokenizer = hf
    results, items = cli_run
    raw = (DATA / "wikitext-2" / "wiki.test.raw").read_text()
    text = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    losses = []
    for k in range(2):
        window = ids[k * 256 : (k + 1) * 256][None]
        with torch.no_grad():
            losses.append(model(window, labels=window).loss.item())
    assert results["tasks"]["wikitext"]["perplexity"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)
    assert 5 < results["tasks"]["wikitext"]["perplexity"] < 200  # a real model, not noise
