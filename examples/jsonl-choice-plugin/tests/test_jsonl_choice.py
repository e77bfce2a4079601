"""The example evaluator through prunelab's CLI, checked against plain transformers on the same model.

Run with the plugin installed (``pip install -e examples/jsonl-choice-plugin``): ``pytest examples/jsonl-choice-plugin``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

QUESTIONS = [
    {"question": "Which organ pumps blood?", "choices": ["the heart", "a leaf", "the moon"], "answer": 0, "category": "biology"},
    {"question": "What do plants make from light?", "choices": ["sugar", "iron", "a very long list of words"], "answer": 0, "category": "biology"},
    {"question": "Which gas do we breathe in?", "choices": ["oxygen", "gold", "music"], "answer": 0, "category": "biology"},
    {"question": "What is 2+2?", "choices": ["3", "4", "22"], "answer": 1, "category": "algebra"},
    {"question": "What is 3*3?", "choices": ["9", "6", "33"], "answer": 0, "category": "algebra"},
]


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-evaluation-harness's recipe with plain transformers: encode the whole text, score the tokens
    after the context's own encoding."""
    whole = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return float(sum(logits[i - 1, whole[i]] for i in range(start, len(whole))))


def prunelab(*args: str) -> subprocess.CompletedProcess:
    """The ``prunelab`` command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def test_acc_and_acc_norm_match_plain_transformers(tiny_model_dir, questions, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    done = prunelab("eval", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
                    "--tasks", "jsonl-choice", "--task-option", f"jsonl-choice.path={questions}", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "results.json").read_text())["tasks"]["jsonl-choice"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    right, right_norm = [], []
    for q in QUESTIONS:
        lls = [continuation_loglikelihood(model, tokenizer, f"Question: {q['question']}\nAnswer:", " " + c)
               for c in q["choices"]]
        per_byte = [ll / len((" " + c).encode()) for ll, c in zip(lls, q["choices"], strict=True)]
        right.append(max(range(3), key=lambda j: lls[j]) == q["answer"])
        right_norm.append(max(range(3), key=lambda j: per_byte[j]) == q["answer"])
    assert result["n"] == len(QUESTIONS)
    assert result["acc"] == pytest.approx(sum(right) / len(right))
    assert result["acc_norm"] == pytest.approx(sum(right_norm) / len(right_norm))


def test_a_bad_file_is_one_line_before_the_model_loads(questions, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(questions.read_text() + '{"question": "x", "choices": ["a"], "answer": 0, "category": "c"}\n')
    model = str(tmp_path / "no-such-model")  # never loaded: the file is checked first
    done = prunelab("eval", "--model", model, "--tasks", "jsonl-choice", "--task-option", f"jsonl-choice.path={broken}")
    assert done.returncode == 2
    assert f"{broken}:6" in done.stderr and "choices" in done.stderr and len(done.stderr.strip().splitlines()) == 1
