"""Fuzz the readers of evaluation and calibration data: MMLU CSV, GSM8K JSONL, WikiText-2 text and
calibration text (plain, JSON lines, gzipped JSON lines). Each loads valid items or raises a
PrunelabError naming the file (for a row: ``file:line``); a loaded item holds what its task needs.
"""

from __future__ import annotations

import csv
import gzip
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prunelab.errors import FileProblem
from prunelab.evaluate.data import DataSource, Subset
from prunelab.prune.calibration import load_source
from prunelab.registry import default_registry

from ..fuzzing import honours_contract, json_values, mutated, scratch

REGISTRY = default_registry()
field_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
answers = st.sampled_from(["A", "B", "C", "D", " b ", "E", "", "AB"]) | field_text


def load(task: str, root):
    return REGISTRY.evaluator(task).load_items(DataSource(root), Subset(sample="first"))


def csv_bytes(rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


mmlu_rows = st.lists(st.lists(field_text, min_size=5, max_size=5).flatmap(
    lambda five: st.one_of(answers.map(lambda a: [*five, a]), st.just(five))), max_size=6)
mmlu_files = mmlu_rows.map(csv_bytes).flatmap(lambda data: st.just(data) | mutated(data, max_edits=2) | st.binary(max_size=64))


@given(mmlu_files, mmlu_files)
def test_fuzz_mmlu_csv(test, dev):
    with scratch() as root:
        for split, data in (("test", test), ("dev", dev)):
            (root / "mmlu" / split).mkdir(parents=True)
            (root / "mmlu" / split / f"virology_{split}.csv").write_bytes(data)
        items = honours_contract(lambda: load("mmlu", root), "virology_test.csv", "virology_dev.csv")
        for item in items or []:
            assert len(item.data["choices"]) == 4 and item.data["answer"] in range(4)
            assert all(0 <= shot["answer"] < 4 for shot in item.data["shots"])


numbers = st.from_regex(r"-?[0-9][0-9,.]{0,6}", fullmatch=True)
gsm8k_answers = st.one_of(
    st.tuples(field_text, numbers).map(lambda p: f"{p[0]}\n#### {p[1]}"),  # well formed
    field_text,  # no final line
    st.tuples(field_text, numbers).map(lambda p: f"#### {p[1]}\n{p[0]}"),  # the final line is not last
)
gsm8k_records = st.one_of(st.fixed_dictionaries({"question": field_text, "answer": gsm8k_answers}), json_values)
gsm8k_files = st.lists(gsm8k_records.map(lambda r: json.dumps(r, allow_nan=False)), max_size=5).map(
    lambda lines: "\n".join(lines).encode()).flatmap(lambda data: st.just(data) | mutated(data, max_edits=2))


@given(gsm8k_files, gsm8k_files)
def test_fuzz_gsm8k_jsonl(test, train):
    from prunelab_plugins.gsm8k import NUMBER, extract_strict, normalize

    with scratch() as root:
        (root / "gsm8k").mkdir()
        (root / "gsm8k" / "test.jsonl").write_bytes(test)
        (root / "gsm8k" / "train.jsonl").write_bytes(train)
        items = honours_contract(lambda: load("gsm8k", root), "test.jsonl", "train.jsonl")
        for item in items or []:  # every target is a number, and a generation ending '#### <it>' scores
            target = normalize(item.data["answer"])
            assert NUMBER.fullmatch(target)
            assert normalize(extract_strict(f"So: #### {target}")) == target


def test_gsm8k_answer_without_its_final_line_names_file_and_line():
    with scratch() as root:
        (root / "gsm8k").mkdir()
        good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
        bad = json.dumps({"question": "2+2?", "answer": "2+2=4, so the answer is 4"})
        (root / "gsm8k" / "test.jsonl").write_text(f"{good}\n\n{bad}\n")
        (root / "gsm8k" / "train.jsonl").write_text(good + "\n")
        with pytest.raises(FileProblem, match=r"test\.jsonl:3: answer does not end with a '#### N' line"):
            load("gsm8k", root)


@given(st.binary(max_size=256) | st.text(max_size=200).map(str.encode))
def test_fuzz_wikitext(data):
    with scratch() as root:
        (root / "wikitext-2").mkdir()
        (root / "wikitext-2" / "wiki.test.raw").write_bytes(data)
        items = honours_contract(lambda: load("wikitext", root), "wiki.test.raw")
        if items is not None:
            assert len(items) == 1 and items[0].data["text"].strip()


calibration_lines = st.lists(st.one_of(st.fixed_dictionaries({"text": field_text}), json_values).map(
    lambda r: json.dumps(r, allow_nan=False)), max_size=5).map(lambda lines: "\n".join(lines).encode())


@given(st.sampled_from(["calib.txt", "calib.jsonl", "calib.jsonl.gz"]),
       st.binary(max_size=256) | calibration_lines.flatmap(lambda data: st.just(data) | mutated(data, max_edits=2)),
       st.booleans())
def test_fuzz_calibration_text(name, data, compress):
    with scratch() as folder:
        path = folder / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") and compress else data)
        loaded = honours_contract(lambda: load_source(str(path)), path)
        if loaded is not None:
            text, documents = loaded
            assert (isinstance(text, str) and documents is None) or all(isinstance(d, str) for d in documents)
