"""Prompt text identical to lm-evaluation-harness's mmlu and gsm8k tasks, and answer extraction."""

from __future__ import annotations

import pytest

from prunelab_plugins import gsm8k, mmlu


def test_mmlu_prompt_matches_lm_eval_format():
    shot = {"question": "What is 1+1? ", "choices": ["1", "2", "3", "4"], "answer": 1}
    question = {"question": "\nWhich is prime?", "choices": ["4", "6", "7", "8"], "answer": 2}
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is prime?\nA. 4\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    assert mmlu.build_prompt("abstract_algebra", [shot, shot], question) == expected


def test_mmlu_zero_shot_prompt():
    question = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 0}
    assert mmlu.build_prompt("virology", [], question) == (
        "The following are multiple choice questions (with answers) about virology.\n\nQ?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def test_mmlu_has_all_57_subjects_in_four_categories():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    assert set(mmlu.SUBJECT_CATEGORY.values()) == {"stem", "humanities", "social_sciences", "other"}


def test_gsm8k_prompt_matches_lm_eval_format():
    shots = [{"question": "q1", "answer": "a1\n#### 1"}, {"question": "q2", "answer": "a2\n#### 2"}]
    assert gsm8k.build_prompt(shots, "q3") == (
        "Question: q1\nAnswer: a1\n#### 1\n\nQuestion: q2\nAnswer: a2\n#### 2\n\nQuestion: q3\nAnswer:"
    )


@pytest.mark.parametrize(("text", "strict", "flexible"), [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    ("The total is $1,234.", "[invalid]", "$1,234."),
    ("#### -12.5 and then 3", "-12.5", "3"),
    ("no numbers here", "[invalid]", "[invalid]"),
    ("It costs 5 dollars", "[invalid]", "5"),
    ("#### 1,000\n\nQuestion", "1,000", "1,000"),
])
def test_gsm8k_answer_extraction(text, strict, flexible):
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


@pytest.mark.parametrize(("answer", "normalized"), [
    ("$1,234.", "1234"), ("Natalia sold 72 clips.\n#### 72", "72"), ("-3", "-3"), ("12.50", "12.50"),
])
def test_gsm8k_normalization(answer, normalized):
    assert gsm8k.normalize(answer) == normalized


def test_gsm8k_flexible_answer_counts_when_strict_fails():
    target = gsm8k.normalize("blah\n#### 1234")
    assert gsm8k.normalize(gsm8k.extract_flexible("The total is $1,234.")) == target
    assert gsm8k.normalize(gsm8k.extract_strict("The total is $1,234.")) != target
