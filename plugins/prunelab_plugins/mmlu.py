"""MMLU as lm-evaluation-harness's ``mmlu`` task scores it, with k-shot dev examples (default 5).

Prompt: ``The following are multiple choice questions (with answers) about {subject}.\\n\\n``, then the
first k dev examples (``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}``) separated by blank
lines, then the question ending in ``Answer:``. The prediction is the argmax of the log-likelihoods
of `` A``/`` B``/`` C``/`` D``. Accuracy is micro-averaged over questions.

A model near chance (0.25) cannot show harm on accuracy, so each question also records the
gold-answer probability ``gold_prob``: the softmax of the four letters' log-likelihoods at the
correct letter, a continuous per-item metric that moves before the argmax does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.evaluate import DataSource, Subset, load_hub_split, read_csv_rows
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

LETTERS = ("A", "B", "C", "D")
METRICS = (
    MetricSpec("acc", "accuracy", "correct", label="accuracy", prediction="prediction"),
    MetricSpec("gold_prob", "mean", "gold_prob", label="probability of the gold letter (softmax over A-D)"),
)

# lm-evaluation-harness's grouping of the 57 subjects (mmlu/_generate_configs.py).
CATEGORIES = {
    "stem": """abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
        prehistory professional_law world_religions""",
    "social_sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
    "other": """business_ethics clinical_knowledge college_medicine global_facts human_aging management
        marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine
        virology""",
}
# What the report's multiple-choice tables read: the gold letter, lm-eval's category, the four letters' scores.
ANSWERS = AnswerFields(target="target", category="category", choices="loglikelihoods")
SUBJECT_CATEGORY = {s: cat for cat, subjects in CATEGORIES.items() for s in subjects.split()}


def format_question(question: str, choices: list[str]) -> str:
    """lm-eval's doc_to_text: the stripped question, lettered choices, and ``Answer:``."""
    lines = [question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices, strict=True))]
    return "\n".join(lines) + "\nAnswer:"


def build_prompt(subject: str, shots: list[dict[str, Any]], question: dict[str, Any]) -> str:
    """Description, then the few-shot examples with their answers, then the question."""
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = [format_question(s["question"], s["choices"]) + " " + LETTERS[s["answer"]] for s in shots]
    return description + "".join(e + "\n\n" for e in examples) + format_question(question["question"], question["choices"])


def _parse_rows(path, rows) -> list[dict[str, Any]]:
    parsed = []
    for line, (question, a, b, c, d, answer) in rows:
        letter = answer.strip().upper()
        if letter not in LETTERS:
            raise PrunelabError(f"{path}:{line}: answer must be one of A, B, C, D, got {answer!r}")
        parsed.append({"question": question, "choices": [a, b, c, d], "answer": LETTERS.index(letter)})
    return parsed


def _load_local(root) -> tuple[dict[str, list], dict[str, list]]:
    test_dir, dev_dir = root / "test", root / "dev"
    if not test_dir.is_dir():
        raise PrunelabError(f"MMLU folder {root} has no test/ folder (expected test/<subject>_test.csv)")
    tests = {p.name.removesuffix("_test.csv"): p for p in sorted(test_dir.glob("*_test.csv"))}
    if not tests:
        raise PrunelabError(f"{test_dir}: no <subject>_test.csv files")
    test_rows = {s: _parse_rows(p, read_csv_rows(p, 6)) for s, p in tests.items()}
    dev_rows = {s: _parse_rows(dev_dir / f"{s}_dev.csv", read_csv_rows(dev_dir / f"{s}_dev.csv", 6)) for s in tests}
    return test_rows, dev_rows


def _load_hub() -> tuple[dict[str, list], dict[str, list]]:
    splits = []
    for split in ("test", "dev"):
        by_subject: dict[str, list] = defaultdict(list)
        for row in load_hub_split("cais/mmlu", "all", split):
            by_subject[row["subject"]].append(
                {"question": row["question"], "choices": list(row["choices"]), "answer": int(row["answer"])}
            )
        splits.append(dict(sorted(by_subject.items())))
    return splits[0], splits[1]


def load_items(source: DataSource, subset: Subset) -> list[Item]:
    root = source.local("mmlu")
    test_rows, dev_rows = _load_local(root) if root is not None else _load_hub()
    items = []
    for subject, rows in test_rows.items():
        shots = dev_rows.get(subject, [])
        for index in subset.select(subject, len(rows)):
            items.append(Item(f"{subject}/{index}", subject, {**rows[index], "subject": subject, "shots": shots}))
    return items


def evaluate(engine: Scorer, items: list[Item], options: dict[str, Any]) -> TaskResult:
    k = options["num_fewshot"]
    for item in items:
        if len(item.data["shots"]) < k:
            raise PrunelabError(f"MMLU {item.group}: {k}-shot needs {k} dev examples, found {len(item.data['shots'])}")
    requests = [
        LoglikelihoodRequest(build_prompt(i.group, i.data["shots"][:k], i.data), [" " + x for x in LETTERS], i.group)
        for i in items
    ]
    scores = engine.loglikelihoods(requests, progress=options.get("progress"))
    records = []
    for item, lls in zip(items, scores, strict=True):
        predicted = max(range(4), key=lambda j: lls[j])
        records.append({
            "item_id": item.id, "subject": item.group, "category": SUBJECT_CATEGORY.get(item.group, "other"),
            "prediction": LETTERS[predicted], "target": LETTERS[item.data["answer"]],
            "target_index": item.data["answer"],
            "correct": predicted == item.data["answer"], "loglikelihoods": lls,
            "gold_prob": letter_probabilities(lls)[item.data["answer"]],
        })
    acc, stderr = mean_and_stderr([float(r["correct"]) for r in records])
    breakdown = {
        "subjects": _grouped_accuracy(records, "subject"),
        "categories": _grouped_accuracy(records, "category"),
    }
    return TaskResult("mmlu", {"n": len(records), "acc": acc, "acc_stderr": stderr}, records, breakdown)


def letter_probabilities(loglikelihoods: list[float]) -> list[float]:
    """Softmax over the four letters' log-likelihoods (the model's choice distribution among A-D)."""
    top = max(loglikelihoods)
    weights = [math.exp(ll - top) for ll in loglikelihoods]
    total = math.fsum(weights)
    return [w / total for w in weights]


def _grouped_accuracy(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in records:
        groups[r[key]].append(float(r["correct"]))
    result = {}
    for name, values in sorted(groups.items()):
        acc, stderr = mean_and_stderr(values)
        result[name] = {"n": len(values), "acc": acc, "acc_stderr": stderr}
    return result


@hookimpl
def prunelab_evaluators() -> list[Evaluator]:
    return [Evaluator(
        name="mmlu",
        description="MMLU multiple choice, lm-eval format, k-shot from the dev split (accuracy)",
        load_items=load_items,
        evaluate=evaluate,
        options=(Option("num_fewshot", int, 5, "few-shot examples per subject (first k of dev)",
                        check=lambda v: None if 0 <= v <= 5 else "must be between 0 and 5"),),
        metrics=METRICS,
        answers=ANSWERS,
    )]
