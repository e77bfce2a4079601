"""Chunks of a task (items, or a deferred-subset task's windows) and the per-item rows of one chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import Subset
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.run import PreparedTask
from prunelab.plugin import Item, MetricSpec, TaskResult
from prunelab.runner.studyfile import CORE_COLUMNS
from prunelab.runner.variants import Variant


class _Counted(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by ``_WindowCounter`` to report how many windows a deferred-subset task has."""

    def __init__(self, group: str, n: int) -> None:
        super().__init__(group, n)
        self.group, self.n = group, n


@dataclass(frozen=True)
class _WindowCounter:
    def select(self, group: str, n: int) -> list[int]:
        raise _Counted(group, n)


@dataclass(frozen=True)
class SubsetSlice:
    """Positions ``start:stop`` of what ``base`` selects: one chunk of a deferred-subset task's windows."""

    base: Subset
    start: int
    stop: int

    def select(self, group: str, n: int) -> list[int]:
        return self.base.select(group, n)[self.start:self.stop]


def _deferred(task: PreparedTask) -> bool:
    """A task whose one item carries the subset, applied when the model is known (WikiText's windows)."""
    return len(task.items) == 1 and isinstance(task.items[0].data.get("subset"), Subset)


def chunk_ranges(task: PreparedTask, engine: Engine, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of a task's items, or of its windows for a deferred-subset task."""
    count = len(task.items)
    if _deferred(task):  # ask the task how many windows the tokenized text has, without scoring any
        item = task.items[0]
        probe = Item(item.id, item.group, {**item.data, "subset": _WindowCounter()})
        try:
            task.evaluator.evaluate(engine, [probe], {**task.options, "progress": None})
            raise PrunelabError(f"task {task.evaluator.name}: could not count its windows")
        except _Counted as counted:
            count = len(item.data["subset"].select(counted.group, counted.n))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def chunk_task(task: PreparedTask, start: int, stop: int) -> PreparedTask:
    if _deferred(task):
        item = task.items[0]
        sliced = Item(item.id, item.group, {**item.data, "subset": SubsetSlice(item.data["subset"], start, stop)})
        return PreparedTask(task.evaluator, [sliced], task.options)
    return PreparedTask(task.evaluator, task.items[start:stop], task.options)



def item_rows(variant: Variant, task: str, result: TaskResult, metrics: tuple[MetricSpec, ...] = ()) -> pl.DataFrame:
    """The runner's per-item table rows of one chunk: one row per item and metric (see ``stats``).

    ``metrics``: what the evaluator declares (``Evaluator.metrics``); without a declaration the
    metrics are guessed from the record keys, as for plugins written before declarations existed.
    """
    if not result.records:
        return pl.DataFrame(schema=CORE_COLUMNS)
    specs = metrics or metric_columns(task, result)
    fields = {spec.field for spec in specs if spec.field}
    rows = []
    for record in result.records:
        extras = {k: _flat(v) for k, v in record.items()
                  if k not in CORE_COLUMNS and k not in fields and not k.startswith("correct")}
        for spec in specs:
            per_item = record.get(spec.field) if spec.field else None
            rows.append({**extras, "variant": variant.name, "strategy": variant.strategy,
                         "params": variant.params_json, "task": task, "metric": spec.name,
                         "item_id": str(record["item_id"]),
                         "correct": per_item if spec.kind == "accuracy" else None,
                         "value": float(per_item) if spec.kind == "mean" and per_item is not None else None,
                         "nll_sum": record.get("nll_sum") if spec.kind == "perplexity" else None,
                         "tokens": record.get("tokens") if spec.kind == "perplexity" else None})
    frame = pl.DataFrame(rows, infer_schema_length=None, schema_overrides=CORE_COLUMNS)
    return frame.select(*CORE_COLUMNS, pl.exclude(*CORE_COLUMNS))


def metric_columns(task: str, result: TaskResult) -> tuple[MetricSpec, ...]:
    """The metrics of an evaluator that declares none, guessed from its records.

    ``correct_<x>`` fields (GSM8K's strict/flexible) map to the task metric ending in ``_<x>``;
    otherwise ``correct`` maps to the task's first metric (MMLU's ``acc``); NLL windows to perplexity.
    """
    first = result.records[0]
    names = [m for m, v in result.metrics.items() if m != "n" and not m.endswith("_stderr") and isinstance(v, float)]
    named = [k for k in first if k.startswith("correct_")]
    if named:
        suffixes = [k.removeprefix("correct_") for k in named]
        return tuple(MetricSpec(next((m for m in names if m.endswith(f"_{s}")), f"correct_{s}"), "accuracy", k)
                     for s, k in zip(suffixes, named, strict=True))
    if first.get("correct") is not None:
        return (MetricSpec(names[0] if names else "acc", "accuracy", "correct"),)
    if "nll_sum" in first and "tokens" in first:
        return (MetricSpec("perplexity", "perplexity", higher_is_better=False),)
    raise PrunelabError(f"task {task}: its records have neither 'correct' nor 'nll_sum'/'tokens'")


def _flat(value: Any) -> Any:
    """Lists and dicts (MMLU's log-likelihoods) as JSON text, so the tables also export to CSV."""
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value
