"""The hook specifications: the whole contract between prunelab and its plugins.

A plugin is any module registered under the ``prunelab`` entry-point group (built-ins use the
same group). It implements any of the hooks and returns descriptions of what it adds: a
``Strategy`` changes a model, an ``Evaluator`` scores one, a ``Recovery`` heals a pruned one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pluggy

from prunelab.options import Option, OptionSet

__all__ = [
    "Evaluator", "Item", "MetricSpec", "Option", "OptionSet", "Recovery", "Strategy", "TaskResult", "hookimpl",
    "hookspec", "mean_and_stderr",
]

if TYPE_CHECKING:
    from prunelab.evaluate.data import DataSource, Subset
    from prunelab.evaluate.engine import Engine
    from prunelab.prune.recovery import RecoveryContext

hookspec = pluggy.HookspecMarker("prunelab")
hookimpl = pluggy.HookimplMarker("prunelab")


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy: declared options and a function that prunes a loaded model in place.

    ``prune(model, options, context)`` returns a JSON-able report (at least the achieved
    sparsity); ``context`` carries the calibration source and the seed.
    """

    name: str
    description: str
    prune: Callable[..., dict[str, Any]]
    options: tuple[Option, ...] = field(default_factory=tuple)
    needs_calibration: bool | Callable[[Mapping[str, Any]], bool] = False

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"strategy '{self.name}'", self.options)

    def uses_calibration(self, options: Mapping[str, Any]) -> bool:
        """Whether these options need calibration text: OWL's allocation does, even for magnitude.

        ``needs_calibration`` may be a function of the options (drop-greedy guided by a task needs none).
        """
        if callable(self.needs_calibration):
            return bool(self.needs_calibration(options))
        return self.needs_calibration or options.get("allocation") == "owl"


@dataclass(frozen=True)
class MetricSpec:
    """A metric an evaluator reports per item, and how a report compares it with the dense model."""

    name: str  # the value in items.metric, e.g. "acc", "perplexity", "kl_mean"
    kind: Literal["accuracy", "perplexity", "mean"]  # accuracy: bool per item; perplexity: nll_sum/tokens per window; mean: a float per item
    field: str | None = None  # the record key holding the per-item value (None for perplexity)
    higher_is_better: bool = True
    label: str = ""  # human-readable name for reports


@dataclass(frozen=True)
class Evaluator:
    """An evaluation task: loads its items, then scores them through the shared engine.

    Like lm-evaluation-harness, the task only builds requests (log-likelihoods, generations,
    rolling windows); the engine in ``prunelab.evaluate.engine`` answers them for any model.
    """

    name: str
    description: str
    load_items: Callable[[DataSource, Subset], list[Item]]
    evaluate: Callable[[Engine, list[Item], dict[str, Any]], TaskResult]
    options: tuple[Option, ...] = field(default_factory=tuple)
    #: True when the task asks the engine to generate text. A layer sweep shares work between
    #: variants only for scoring (log-likelihoods, perplexity); generation diverges after the
    #: prompt, so the runner evaluates generating tasks one pruned model at a time.
    generates: bool = False
    #: What each record reports and how to compare it with dense (``MetricSpec``). Empty: the
    #: runner guesses from the record keys (``correct``/``correct_<x>``, ``nll_sum``/``tokens``).
    metrics: tuple[MetricSpec, ...] = ()

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"task '{self.name}'", self.options)


@dataclass(frozen=True)
class Recovery:
    """A recovery ("healing") method: fine-tunes a pruned model in place, keeping its masks.

    ``recover(model, options, context)`` trains, leaves a plain model (adapters merged) and returns
    a JSON-able report (at least the loss curve). The core re-applies the pruning masks afterwards,
    so a pruned weight stays zero whatever the method did (see ``prunelab.prune.recovery.heal``).
    """

    name: str
    description: str
    recover: Callable[[Any, dict[str, Any], RecoveryContext], dict[str, Any]]
    options: tuple[Option, ...] = field(default_factory=tuple)

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"recovery '{self.name}'", self.options)


# ---------------------------------------------------------------------------- what an evaluator produces
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


# ---------------------------------------------------------------------------- the hooks
@hookspec
def prunelab_strategies() -> list[Strategy]:
    """Return the pruning strategies this plugin adds."""


@hookspec
def prunelab_evaluators() -> list[Evaluator]:
    """Return the evaluation tasks this plugin adds."""


@hookspec
def prunelab_recoveries() -> list[Recovery]:
    """Return the recovery (healing) methods this plugin adds."""
