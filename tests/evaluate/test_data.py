"""Data loading, subsets and malformed input."""

from __future__ import annotations

import math

import pytest

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import DataSource, Subset
from prunelab_plugins import gsm8k, mmlu, wikitext

from ..conftest import DATA


def test_fraction_is_stratified_by_subject_and_seeded():
    subset = Subset(fraction=0.1, seed=7)
    items = mmlu.load_items(DataSource(DATA), subset)
    subjects = {i.group for i in items}
    assert len(subjects) == 57
    again = [i.id for i in mmlu.load_items(DataSource(DATA), Subset(fraction=0.1, seed=7))]
    other = [i.id for i in mmlu.load_items(DataSource(DATA), Subset(fraction=0.1, seed=8))]
    assert [i.id for i in items] == again
    assert again != other
    sizes = {p.name.removesuffix("_test.csv"): len(p.read_text().splitlines()) for p in (DATA / "mmlu" / "test").glob("*.csv")}
    per_subject = {s: sum(1 for i in items if i.group == s) for s in subjects}
    # ceil(0.1 * n) per subject (n counted from physical lines is >= rows, so allow multi-line questions)
    assert per_subject["abstract_algebra"] == math.ceil(0.1 * 100)
    assert sum(per_subject.values()) <= sum(math.ceil(0.1 * n) for n in sizes.values())


def test_first_sample_takes_first_rows_like_lm_eval_limit():
    items = mmlu.load_items(DataSource(DATA), Subset(fraction=0.1, sample="first"))
    algebra = [i.id for i in items if i.group == "abstract_algebra"]
    assert algebra == [f"abstract_algebra/{k}" for k in range(10)]
    assert len(items) == 1430


def test_limit_caps_items_per_group():
    items = mmlu.load_items(DataSource(DATA), Subset(limit=2, sample="first"))
    assert len(items) == 114
    assert items[0].data["question"].startswith("Find the degree")
    assert items[0].data["answer"] == 1  # B


def test_gsm8k_items_and_shots():
    items = gsm8k.load_items(DataSource(DATA), Subset(limit=3, sample="first"))
    assert [i.id for i in items] == ["test/0", "test/1", "test/2"]
    assert items[0].data["shots"][0]["question"].startswith("Natalia sold clips")


def test_wikitext_lines_match_hub_rows():
    raw = " \n = Title = \n \n Text here . \n"
    assert wikitext.lines_from_raw(raw) == ["", " = Title = \n", "", " Text here . \n"]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_fraction_outside_unit_interval_is_an_error(fraction):
    with pytest.raises(PrunelabError, match="fraction"):
        Subset(fraction=fraction)


def write_mmlu(root, test_rows: str, dev_rows: str | None = None):
    (root / "mmlu" / "test").mkdir(parents=True)
    (root / "mmlu" / "dev").mkdir(parents=True)
    (root / "mmlu" / "test" / "anatomy_test.csv").write_text(test_rows)
    dev = dev_rows if dev_rows is not None else "q,a,b,c,d,A\n" * 5
    (root / "mmlu" / "dev" / "anatomy_dev.csv").write_text(dev)
    return DataSource(root)


@pytest.mark.parametrize(("rows", "message"), [
    ("q,a,b,c,d,A\nq2,a,b,c,E\n", "anatomy_test.csv:2: expected 6 columns, found 5"),
    ("q,a,b,c,d,A\nq2,a,b,c,d,E\n", "anatomy_test.csv:2: answer must be one of A, B, C, D"),
    ("", "anatomy_test.csv: no rows"),
])
def test_malformed_mmlu_names_file_and_line(tmp_path, rows, message):
    source = write_mmlu(tmp_path, rows)
    with pytest.raises(PrunelabError, match=message):
        mmlu.load_items(source, Subset())


def test_missing_dev_file_is_named(tmp_path):
    source = write_mmlu(tmp_path, "q,a,b,c,d,A\n")
    (tmp_path / "mmlu" / "dev" / "anatomy_dev.csv").unlink()
    with pytest.raises(PrunelabError, match="data file not found: .*anatomy_dev.csv"):
        mmlu.load_items(source, Subset())


def test_malformed_gsm8k_names_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(PrunelabError, match=r"test.jsonl:2: missing field\(s\) answer"):
        gsm8k.load_items(DataSource(tmp_path), Subset())
