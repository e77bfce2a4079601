"""Chunks of a task (items, or a deferred-subset task's windows) and the per-item rows of one chunk.

A ``Chunk`` is the runner's unit of work and of resumption: one variant's rows of one slice of one
task, written as one file of the work folder.
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
from prunelab.records import (
    CORRECT,
    ITEM_ID,
    ITEM_SCHEMA,
    METRIC,
    NLL_SUM,
    PARAMS,
    STRATEGY,
    TASK,
    TOKENS,
    VALUE,
    VARIANT,
)
from prunelab.runner.variants import Variant


@dataclass(frozen=True)
class Chunk:
    """One variant's evaluation of items (or a deferred-subset task's units) ``start:stop`` of a task:
    the task's chunk number ``index``, whose rows are one file of the work folder."""

    variant: Variant
    task: str
    index: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        """How many items (or units) the chunk evaluates: what progress and the event log count."""
        return self.stop - self.start


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
        return pl.DataFrame(schema=ITEM_SCHEMA)
    specs = metrics
    fields = {spec.field for spec in specs if spec.field}
    rows = []
    for record in result.records:
        extras = {k: _flat(v) for k, v in record.items()
                  if k not in ITEM_SCHEMA and k not in fields and not k.startswith(CORRECT)}
        for spec in specs:
            per_item = record.get(spec.field) if spec.field else None
            rows.append({**extras, VARIANT: variant.name, STRATEGY: variant.strategy,
                         PARAMS: variant.params_json, TASK: task, METRIC: spec.name,
                         ITEM_ID: str(record["item_id"]),
                         CORRECT: per_item if spec.kind == "accuracy" else None,
                         VALUE: float(per_item) if spec.kind == "mean" and per_item is not None else None,
                         NLL_SUM: record.get("nll_sum") if spec.kind == "perplexity" else None,
                         TOKENS: record.get("tokens") if spec.kind == "perplexity" else None})
    frame = pl.DataFrame(rows, infer_schema_length=None, schema_overrides=ITEM_SCHEMA)
    return frame.select(*ITEM_SCHEMA, pl.exclude(*ITEM_SCHEMA))


def _flat(value: Any) -> Any:
    """Lists and dicts (MMLU's log-likelihoods) as JSON text, so the tables also export to CSV."""
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value
