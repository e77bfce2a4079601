"""GSM8K as lm-evaluation-harness's ``gsm8k`` task, with the first k train examples as shots.

Using the same k examples for every problem (lm-eval's ``fewshot_config: {sampler: first_n}``)
lets the engine encode their prefix once. Greedy decoding, 256 new tokens, stop at ``Question:``
and the model's end tokens; the answer is extracted strictly (``#### N``) and flexibly (the last
number), both compared after removing commas, ``$`` and a trailing period, as lm-eval does.
"""

from __future__ import annotations

import re
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.evaluate import DataSource, Subset, load_hub_split, read_jsonl
from prunelab.plugin import (
    Evaluator,
    GenerationRequest,
    Item,
    MetricSpec,
    Option,
    Scorer,
    TaskResult,
    hookimpl,
    mean_and_stderr,
)

STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"


def extract_strict(text: str) -> str:
    """The number after the first ``#### `` (lm-eval's strict-match filter)."""
    match = STRICT.findall(text)
    return match[0].strip() if match else INVALID


def extract_flexible(text: str) -> str:
    """The last number in the text (lm-eval's flexible-extract filter, group_select -1)."""
    matches = FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    groups = [g for g in matches[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalize(answer: str) -> str:
    """lm-eval's exact_match normalisation: drop commas, ``$``, anything up to ``#### ``, a final period."""
    for pattern in IGNORE:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def format_example(question: str, answer: str | None = None) -> str:
    text = f"Question: {question}\nAnswer:"
    return text if answer is None else f"{text} {answer}"


def build_prompt(shots: list[dict[str, str]], question: str) -> str:
    return "".join(format_example(s["question"], s["answer"]) + "\n\n" for s in shots) + format_example(question)


NUMBER = re.compile(r"-?[0-9.]*[0-9][0-9.]*")


def answer_problem(record: dict[str, Any]) -> str | None:
    """What makes a record unscorable: its target (``normalize`` of the answer: what follows the last
    ``#### ``) must be a number, i.e. the answer ends with a ``#### N`` line and nothing after it.

    Otherwise ``normalize`` keeps the whole solution text (or a stray character) as the target,
    which no generation matches: the row would be scored, silently, as a certain miss.
    """
    if "#### " not in record["answer"] or not NUMBER.fullmatch(normalize(record["answer"])):
        return "answer does not end with a '#### N' line (the final numeric answer)"
    if not record["question"].strip():
        return "empty question"
    return None


def _load_split(source: DataSource, split: str) -> list[dict[str, str]]:
    root = source.local("gsm8k")
    if root is not None:
        return read_jsonl(root / f"{split}.jsonl", ("question", "answer"), check=answer_problem)
    rows = [{"question": r["question"], "answer": r["answer"]} for r in load_hub_split("openai/gsm8k", "main", split)]
    for number, row in enumerate(rows):
        if problem := answer_problem(row):
            raise PrunelabError(f"openai/gsm8k {split} row {number}: {problem}")
    return rows


def load_items(source: DataSource, subset: Subset) -> list[Item]:
    test, train = _load_split(source, "test"), _load_split(source, "train")
    shots = train[:5]
    return [
        Item(f"test/{i}", "gsm8k", {**test[i], "shots": shots})
        for i in subset.select("gsm8k", len(test))
    ]


def evaluate(engine: Scorer, items: list[Item], options: dict[str, Any]) -> TaskResult:
    k = options["num_fewshot"]
    requests = [
        GenerationRequest(build_prompt(i.data["shots"][:k], i.data["question"]), STOP, options["max_new_tokens"], "gsm8k")
        for i in items
    ]
    outputs = engine.generate(requests, progress=options.get("progress"))
    records = []
    for item, text in zip(items, outputs, strict=True):
        target = normalize(item.data["answer"])
        strict, flexible = extract_strict(text), extract_flexible(text)
        records.append({
            "item_id": item.id, "generated": text, "target": target,
            "answer_strict": strict, "answer_flexible": flexible,
            "correct_strict": normalize(strict) == target, "correct_flexible": normalize(flexible) == target,
            "correct": normalize(strict) == target,
        })
    metrics: dict[str, Any] = {"n": len(records)}
    for name in ("strict", "flexible"):
        value, stderr = mean_and_stderr([float(r[f"correct_{name}"]) for r in records])
        metrics[f"exact_match_{name}"] = value
        metrics[f"exact_match_{name}_stderr"] = stderr
    return TaskResult("gsm8k", metrics, records)


@hookimpl
def prunelab_evaluators() -> list[Evaluator]:
    return [Evaluator(
        name="gsm8k",
        description="GSM8K grade-school math, lm-eval format, greedy, strict and flexible exact match",
        load_items=load_items,
        evaluate=evaluate,
        output_type="generate_until",
        metrics=(MetricSpec("exact_match_strict", "accuracy", "correct_strict", label="exact match (strict)"),
                 MetricSpec("exact_match_flexible", "accuracy", "correct_flexible", label="exact match (flexible)")),
        options=(
            Option("num_fewshot", int, 5, "few-shot examples (first k of train)",
                   check=lambda v: None if 0 <= v <= 5 else "must be between 0 and 5"),
            Option("max_new_tokens", int, 256, "generation budget per problem",
                   check=lambda v: None if v > 0 else "must be positive"),
        ),
    )]
