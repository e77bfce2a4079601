"""Dataset loaders for the local lm-eval task configs in this folder (used only by benchmarks/).

They read the same local files prunelab reads (hendrycks MMLU CSVs, GSM8K JSON lines) and return
exactly the records lm-eval's own tasks get from the Hub (``cais/mmlu``: question, subject,
choices, answer as an index; ``openai/gsm8k``: question, answer), so the rest of each task config
is a verbatim copy of lm-eval's. CSV is read with the csv module (not pandas): answers such as
"None of the above" or "0.50" must stay the exact strings, as they are on the Hub.

The data folder is the ``data_dir`` task metadata, else ``$PRUNELAB_DATA``, else ``../shared/data``
next to the repository.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets

LETTERS = "ABCD"


def _data_root(data_dir: str | None) -> Path:
    chosen = data_dir or os.environ.get("PRUNELAB_DATA")
    return Path(chosen) if chosen else Path(__file__).resolve().parents[3] / "shared" / "data"


def _mmlu_split(path: Path, subject: str) -> datasets.Dataset:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for question, a, b, c, d, answer in csv.reader(f):
            rows.append({"question": question, "subject": subject, "choices": [a, b, c, d],
                         "answer": LETTERS.index(answer.strip())})
    return datasets.Dataset.from_list(rows)


def load_mmlu(subject: str, data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """One MMLU subject as cais/mmlu lays it out: ``test`` and ``dev`` splits."""
    root = _data_root(data_dir) / "mmlu"
    return datasets.DatasetDict({
        "test": _mmlu_split(root / "test" / f"{subject}_test.csv", subject),
        "dev": _mmlu_split(root / "dev" / f"{subject}_dev.csv", subject),
    })


def _jsonl(path: Path) -> datasets.Dataset:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]} for r in rows])


def load_gsm8k(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """GSM8K ``main`` as openai/gsm8k lays it out: ``train`` and ``test`` splits."""
    root = _data_root(data_dir) / "gsm8k"
    return datasets.DatasetDict({"train": _jsonl(root / "train.jsonl"), "test": _jsonl(root / "test.jsonl")})
