"""Evaluate one loaded model on a set of tasks: the API behind ``prunelab eval`` and the runner.

Tasks are evaluator plugins found through the registry. Items are loaded (and the subset chosen)
before the model is touched, so a bad data file or option fails in a second. Results are written
as ``results.json`` (stable keys for scripts) and ``items.parquet`` (one row per item).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import DataSource, Subset
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.reference import ReferenceStore
from prunelab.model.loading import LoadedModel
from prunelab.plugin import Evaluator, Item, TaskResult
from prunelab.readers import atomic_write
from prunelab.registry import Registry, default_registry
from prunelab.versions import EVALUATION_PACKAGES, package_versions


@dataclass
class PreparedTask:
    """A task with its items chosen and its options validated, ready to run on any model."""

    evaluator: Evaluator
    items: list[Item]
    options: dict[str, Any]


@dataclass
class EvalRun:
    """Everything one evaluation produced."""

    results: dict[str, TaskResult]
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise PrunelabError("no tasks given (e.g. --tasks mmlu,gsm8k,wikitext)")
    return list(dict.fromkeys(names))


def task_options_for(evaluator: Evaluator, common: dict[str, Any], own: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate the common settings (num_fewshot, seqlen, ...) that this task declares, then the
    options given to this task alone (``--task-option task.key=value``; an unknown one is an error)."""
    declared = {o.name for o in evaluator.options}
    return evaluator.option_set.validate({**{k: v for k, v in common.items() if k in declared}, **(own or {})})


def parse_task_options(specs: list[str], tasks: list[str]) -> dict[str, dict[str, str]]:
    """``TASK.KEY=VALUE`` strings (``--task-option``) as options per task; the task must be evaluated."""
    found: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        task, dot, key = name.strip().rpartition(".")
        key = key.strip().replace("-", "_")
        if not sep or not dot or not task or not key:
            raise PrunelabError(f"--task-option {spec!r}: expected TASK.KEY=VALUE (e.g. mmlu.num_fewshot=0)")
        if task not in tasks:
            raise PrunelabError(f"--task-option {spec!r}: task '{task}' is not in --tasks ({', '.join(tasks)})")
        if key in found.setdefault(task, {}):
            raise PrunelabError(f"--task-option: option '{key}' of task '{task}' given twice")
        found[task][key] = value.strip()
    return found


def prepare_tasks(
    names: list[str],
    data: DataSource,
    subset: Subset,
    common_options: dict[str, Any] | None = None,
    registry: Registry | None = None,
    task_options: dict[str, dict[str, Any]] | None = None,
) -> list[PreparedTask]:
    """Look up, validate and load every task's items; fails before any model work.

    ``common_options`` go to every task that declares them; ``task_options`` (by task name) to that
    task alone. ``load_items`` is handed the validated options when it takes them.
    """
    registry = registry or default_registry()
    evaluators = [registry.evaluator(name) for name in names]
    prepared = []
    for evaluator in evaluators:
        options = task_options_for(evaluator, common_options or {}, (task_options or {}).get(evaluator.name))
        prepared.append(PreparedTask(evaluator, evaluator.items(data, subset, options), options))
    return prepared


def run_task(engine: Engine, task: PreparedTask, progress: Callable[[int], None] | None = None,
             reference: ReferenceStore | None = None) -> TaskResult:
    """Evaluate a task; ``reference`` is where the dense model leaves, and a variant finds, its outputs."""
    return task.evaluator.evaluate(engine, task.items, {**task.options, "progress": progress, "reference": reference})


def evaluate(
    loaded: LoadedModel,
    tasks: list[PreparedTask],
    *,
    engine: Engine | None = None,
    on_task_start: Callable[[PreparedTask], Callable[[int], None] | None] | None = None,
    config: dict[str, Any] | None = None,
) -> EvalRun:
    """Run every prepared task on the loaded model; ``on_task_start`` may return a progress callback."""
    engine = engine or Engine(loaded.model, loaded.tokenizer, loaded.adapter)
    results: dict[str, TaskResult] = {}
    timings: dict[str, float] = {}
    for task in tasks:
        progress = on_task_start(task) if on_task_start else None
        start = time.perf_counter()
        results[task.evaluator.name] = run_task(engine, task, progress)
        timings[task.evaluator.name] = round(time.perf_counter() - start, 3)
    run_config = {
        "model": loaded.source, "model_kind": loaded.kind, "device": str(loaded.device),
        "dtype": loaded.dtype_name, "chat_template": engine.chat_template,
        "task_options": {t.evaluator.name: t.options for t in tasks},
        "plugins": {t.evaluator.name: default_registry().identity("task", t.evaluator.name) for t in tasks},
        **(config or {}),
    }
    return EvalRun(results, run_config, timings)


def versions() -> dict[str, str]:
    """The packages that decide an evaluation's numbers, with their versions."""
    return package_versions(EVALUATION_PACKAGES)


def results_document(run: EvalRun) -> dict[str, Any]:
    """The ``results.json`` content: ``tasks`` keyed by name with ``n`` and main metrics first."""
    tasks = {}
    for name, result in run.results.items():
        tasks[name] = {**_finite(result.metrics), **_finite(result.breakdown)}
    return {
        "tasks": tasks,
        "config": run.config,
        "item_ids": {name: [r["item_id"] for r in result.records] for name, result in run.results.items()},
        "versions": versions(),
        "timings_s": run.timings,
    }


def items_frame(run: EvalRun) -> pl.DataFrame:
    """One row per item across tasks (columns a task lacks are null)."""
    frames = [
        pl.DataFrame(result.records, infer_schema_length=None).with_columns(pl.lit(name).alias("task"))
        for name, result in run.results.items() if result.records
    ]
    if not frames:
        return pl.DataFrame()
    frame = pl.concat(frames, how="diagonal_relaxed")
    return frame.select("task", "item_id", pl.exclude("task", "item_id"))


def write_outputs(run: EvalRun, out_dir: str | os.PathLike) -> Path:
    """Write results.json and items.parquet atomically (a reader never sees half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(results_document(run), indent=2) + "\n"))
    atomic_write(out / "items.parquet", lambda p: items_frame(run).write_parquet(p))
    return out



def _finite(value: Any) -> Any:
    """NaN is not JSON: report an undefined stderr (n < 2) as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
