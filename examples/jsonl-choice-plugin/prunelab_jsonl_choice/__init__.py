"""Task ``jsonl-choice``: multiple-choice questions read from a JSON-lines file the user names.

An example of a third-party evaluator. It uses only prunelab's plugin API and gets what the
built-in ``mmlu`` gets: its option ``path`` is checked before any model loads
(``prunelab eval --tasks jsonl-choice --task-option jsonl-choice.path=items.jsonl``, or
``[evaluation.jsonl-choice] path = ...`` in a study file), and because it declares its metrics and
its answer fields, a study compares each variant with dense on both metrics and the report shows
its answer table, accuracy per category and the chance line.

One question per line::

    {"question": "Which organ pumps blood?", "choices": ["heart", "liver", "lung"], "answer": 0, "category": "biology"}

The prompt is ``Question: {question}\\nAnswer:``; each choice is scored as the continuation
``" " + choice`` (lm-evaluation-harness's ``multiple_choice`` output type). Two accuracies, as
lm-eval reports them: ``acc`` takes the choice with the highest log-likelihood, ``acc_norm`` the
highest log-likelihood per byte of the continuation (longer answers are not penalised).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.evaluate import DataSource, Subset, read_jsonl
from prunelab.plugin import (
    AnswerFields,
    Evaluator,
    Item,
    LoglikelihoodRequest,
    MetricSpec,
    Option,
    Scorer,
    TaskResult,
    hookimpl,
    mean_and_stderr,
)

LETTERS = "ABCDEFGHIJ"
METRICS = (
    MetricSpec("acc", "accuracy", "correct", label="accuracy", prediction="prediction"),
    MetricSpec("acc_norm", "accuracy", "correct_norm", label="accuracy (per-byte normalised)",
               prediction="prediction_norm"),
)
# The record keys the report's multiple-choice tables read (the gold letter, the category, one
# log-likelihood per choice: chance is 1 / the number of choices).
ANSWERS = AnswerFields(target="target", category="category", choices="loglikelihoods")


def _record_problem(record: dict[str, Any]) -> str | None:
    """What makes a line unusable (None: nothing): 2 to 10 text choices and an answer index among them."""
    choices = record.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or \
            not all(isinstance(c, str) and c.strip() for c in choices):
        return f"'choices' must be a list of 2 to {len(LETTERS)} non-empty strings"
    answer = record.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return f"'answer' must be the index of the right choice (0 to {len(choices) - 1})"
    return None


def load_items(source: DataSource, subset: Subset, options: dict[str, Any]) -> list[Item]:
    """The questions of ``options["path"]``, grouped by category so that a subset samples every one."""
    path = Path(options["path"]).expanduser()
    records = read_jsonl(path, ("question", "category"), _record_problem)
    by_category: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for line, record in enumerate(records):
        by_category[record["category"]].append((line, record))
    items = []
    for category, rows in sorted(by_category.items()):
        for index in subset.select(category, len(rows)):
            line, record = rows[index]
            items.append(Item(str(record.get("id", line)), category, record))
    if len({item.id for item in items}) != len(items):
        raise PrunelabError(f"{path}: two questions share an id")
    return items


def _best(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda j: scores[j])


def evaluate(scorer: Scorer, items: list[Item], options: dict[str, Any]) -> TaskResult:
    requests = [LoglikelihoodRequest(f"Question: {i.data['question'].strip()}\nAnswer:",
                                     [" " + c for c in i.data["choices"]]) for i in items]
    scores = scorer.loglikelihoods(requests, progress=options.get("progress"))
    records = []
    for item, lls in zip(items, scores, strict=True):
        per_byte = [ll / len((" " + c).encode("utf-8")) for ll, c in zip(lls, item.data["choices"], strict=True)]
        gold, raw, norm = item.data["answer"], _best(lls), _best(per_byte)
        records.append({"item_id": item.id, "category": item.group, "target": LETTERS[gold],
                        "prediction": LETTERS[raw], "prediction_norm": LETTERS[norm],
                        "correct": raw == gold, "correct_norm": norm == gold, "loglikelihoods": lls})
    metrics: dict[str, Any] = {"n": len(records)}
    for spec in METRICS:
        metrics[spec.name], metrics[f"{spec.name}_stderr"] = mean_and_stderr([float(r[spec.field]) for r in records])
    return TaskResult("jsonl-choice", metrics, records)


def _readable(value: str) -> str | None:
    return None if Path(value).expanduser().is_file() else f"no such file: {value}"


@hookimpl
def prunelab_evaluators() -> list[Evaluator]:
    return [Evaluator(
        name="jsonl-choice",
        description="multiple choice from a JSONL file (option path), acc and acc_norm (example third-party task)",
        load_items=load_items,
        evaluate=evaluate,
        options=(Option("path", str, None, "the JSONL file of questions", check=_readable, required=True),),
        metrics=METRICS,
        answers=ANSWERS,
    )]
