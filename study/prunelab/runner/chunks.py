"""Chunks of a task (items, or a deferred-subset task's windows) and the per-item rows of one chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import Subset
from prunelab.evaluate.run import PreparedTask
from prunelab.plugin import Item, MetricSpec, Scorer, TaskResult
from prunelab.runner.studyfile import CORE_COLUMNS
from prunelab.runner.variants import Variant


@dataclass(frozen=True)
class SubsetSlice:
    """Positions ``start:stop`` of what ``base`` selects: one chunk of a deferred-subset task's units."""

    base: Subset
    start: int
    stop: int

    def select(self, group: str, n: int) -> list[int]:
        return self.base.select(group, n)[self.start:self.stop]


def _deferred(task: PreparedTask) -> bool:
    """A task whose units are known only with the model: it declares how to count them (WikiText's windows)."""
    return task.evaluator.count_units is not None


def chunk_ranges(task: PreparedTask, scorer: Scorer, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of a task's items, or of its units for a deferred-subset task."""
    count = len(task.items)
    if _deferred(task):  # the task's own count, from the tokenizer alone: nothing is scored
        count = task.evaluator.count_units(scorer, task.items, dict(task.options))
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def chunk_task(task: PreparedTask, start: int, stop: int) -> PreparedTask:
    if _deferred(task):
        sliced = [Item(item.id, item.group, {**item.data, "subset": SubsetSlice(item.data["subset"], start, stop)})
                  for item in task.items]
        return PreparedTask(task.evaluator, sliced, task.options)
    return PreparedTask(task.evaluator, task.items[start:stop], task.options)


def item_rows(variant: Variant, task: str, result: TaskResult, metrics: tuple[MetricSpec, ...]) -> pl.DataFrame:
    """The runner's per-item table rows of one chunk: one row per item and metric (see ``stats``).

    ``metrics``: what the evaluator declares (``Evaluator.metrics``): the core reads per-item
    values only where a declaration says they are, never from the record keys' names.
    """
    if not metrics:
        raise PrunelabError(f"task {task}: its evaluator declares no metrics (Evaluator.metrics)")
    if not result.records:
        return pl.DataFrame(schema=CORE_COLUMNS)
    specs = metrics
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


def _flat(value: Any) -> Any:
    """Lists and dicts (MMLU's log-likelihoods) as JSON text, so the tables also export to CSV."""
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value
