"""What an evaluator produces: items with stable ids, and per-task results.

Every item keeps an id (MMLU: ``subject/row``; GSM8K: ``test/row``; WikiText: ``window/i``) so that
each reported number can be traced to and recomputed from exactly the items that made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Item:
    """One evaluation item: a stable id, the group it belongs to, and its payload."""

    id: str
    group: str
    data: dict[str, Any]


@dataclass
class TaskResult:
    """Metrics for one task plus one record per item (for ``items.parquet`` and paired tests).

    ``records`` rows share the keys ``item_id`` and ``correct`` (bool or None) plus task-specific
    fields (prediction, log-likelihoods, generated text, NLL sums).
    """

    task: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, dict[str, Any]] = field(default_factory=dict)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports them."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
