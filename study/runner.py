"""Run a study: every variant x task pair, resumable, handed over to the versioned artifacts folder.

A study file (TOML, or YAML with the same keys) names the model, the evaluation settings and the strategies with their grids;
``load_study`` validates all of it -- tasks, task options, every grid point against the strategy's
declared options -- before any model is loaded. ``run_study`` then

1. prepares the items once (every variant sees the same items) and hashes the configuration
   (settings, model weights, item contents);
2. evaluates every (variant, task) pair in chunks of ``chunk_items`` items (WikiText: windows) and
   writes each chunk's per-item rows atomically as a parquet file under
   ``<out>/<study>/.work/``: a kill loses at most the chunk in flight;
3. hands the per-item table to ``artifacts.write_run`` (tables, statistics, charts, report, index)
   and removes the work folder.

Resuming is running the same command again: finished chunks are read, never recomputed. The work
folder records its configuration hash; a different configuration of the same study is refused
while that work is unfinished (finish it, choose another ``--out``, or delete the folder). A
configuration that already finished is not recomputed unless ``rerun`` is asked for.

Relative paths in a study file (model files, ``data_dir``, a calibration file) are relative to the
study file's folder; ``${VAR}`` and ``${VAR:-default}`` are expanded, then ``~``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from . import artifacts
from .adapter import adapt
from .benchmodel import bench_rows, measure, parameter_count
from .data import DataSource, Subset
from .engine import Engine
from .errors import FileProblem, PrunelabError
from .evaluate import PreparedTask, prepare_tasks, run_task
from .executors import Executor, ExecutorSettings, LocalExecutor
from .hookspecs import MetricSpec
from .layersweep import LayerSweep
from .modeling import LoadedModel, choose_device, choose_dtype, load_model, source_fingerprint
from .pruning import MaskSet, prune, validate_options
from .readers import atomic_write, describe, read_json, read_parquet, read_utf8, reading
from .recovery import check_disjoint, heal, healed_name, study_recovery
from .reference import ReferenceStore
from .registry import Registry, default_registry
from .stats import DENSE
from .surgery import parse_layer_indices, single_layer
from .tasks import Item, TaskResult

EACH_LAYER = "each"  # ``layers = "each"``: one variant per decoder layer, known once the model is
CHUNK_ITEMS = 32
WORK = ".work"
TOP_KEYS = {"name", "model", "device", "dtype", "trust_remote_code", "prune_seed", "evaluation", "calibration",
            "strategies", "bench", "recovery", "executor"}
BENCH_DEFAULTS = {"prompt_lengths": [128], "batches": [1], "new_tokens": 16, "repeats": 3}
SUBSET_KEYS = {"fraction", "sample", "limit", "seed"}
TASK_OPTION_KEYS = {"num_fewshot", "seqlen", "max_new_tokens"}  # common settings, for the tasks that declare them
EVALUATION_KEYS = SUBSET_KEYS | TASK_OPTION_KEYS | {"tasks", "chat_template", "enable_thinking", "batch_tokens",
                                                    "data_dir", "chunk_items"}
CORE_COLUMNS = {"variant": pl.String, "strategy": pl.String, "params": pl.String, "task": pl.String,
                "metric": pl.String, "item_id": pl.String, "correct": pl.Boolean, "value": pl.Float64,
                "nll_sum": pl.Float64, "tokens": pl.Int64}


# ---------------------------------------------------------------------------------------- study files
@dataclass(frozen=True)
class StrategyGrid:
    """One ``[[strategies]]`` block: a strategy and its options, where a list means "each of these"."""

    name: str
    grid: dict[str, list[Any]]


@dataclass(frozen=True)
class Study:
    """A validated study file; ``settings`` is what the configuration hash covers (besides data/model)."""

    name: str
    path: Path
    text: str
    model: str  # as loadable here (variables expanded, relative paths resolved)
    device: str
    dtype: str
    trust_remote_code: bool
    prune_seed: int
    tasks: list[str]
    subsets: dict[str, Subset]  # per task
    task_options: dict[str, dict[str, Any]]  # per task
    data_dir: Path | None
    calibration: dict[str, Any] | None
    strategies: list[StrategyGrid]
    settings: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] | None = None  # ``[bench]``: measure each variant's speed (prunelab.benchmodel)
    recovery: dict[str, Any] | None = None  # ``[recovery]``: heal variants (prunelab.recovery.study_recovery)
    # ``[executor]``: where the pairs run (local, ray); not in the configuration hash -- every executor
    # writes the same chunk files, so a Ray run resumes a local one and the other way round
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the dense baseline or one grid point of a strategy."""

    name: str
    strategy: str
    params: dict[str, Any]
    recovery: str | None = None  # a healed twin: pruned with ``pruned_by``, then healed by this method

    @property
    def params_json(self) -> str:
        return json.dumps(self.params)

    @property
    def pruned_by(self) -> str:
        return self.strategy.removesuffix(f"+{self.recovery}") if self.recovery else self.strategy


DENSE_VARIANT = Variant(DENSE, DENSE, {})


def load_study(path: str | os.PathLike, *, data_dir: str | os.PathLike | None = None,
               registry: Registry | None = None) -> Study:
    """Read and validate a study file; every mistake is a one-line ``PrunelabError`` naming it, no model needed."""
    try:
        return _load_study(Path(path), data_dir, registry or default_registry())
    except PrunelabError as exc:
        if str(path) in str(exc):
            raise
        raise PrunelabError(f"{path}: {exc}") from exc  # a value checked by a shared helper


def _load_study(path: Path, data_dir: str | os.PathLike | None, registry: Registry) -> Study:
    text, raw = _read_study_file(path)
    _check_keys(raw, TOP_KEYS, f"{path}")
    evaluation = raw.get("evaluation", {})
    _check_keys(evaluation, EVALUATION_KEYS | set(registry.evaluators), f"{path} [evaluation]")
    tasks = _string_list(evaluation.get("tasks", ["mmlu", "gsm8k", "wikitext"]), f"{path} [evaluation] tasks")
    strays = sorted(k for k in evaluation if k in registry.evaluators and k not in tasks)
    if strays:
        raise PrunelabError(f"{path}: [evaluation.{strays[0]}] is given but {strays[0]} is not in tasks")
    where = path.resolve().parent
    name = _typed(raw, "name", str, path.stem, f"{path}")
    if not artifacts.STUDY_NAME.match(name):
        raise PrunelabError(f"{path}: study name {name!r} is not a plain folder name (letters, digits, . _ -)")
    if "model" not in raw:
        raise PrunelabError(f"{path}: no model (e.g. model = \"Qwen/Qwen3-0.6B\")")
    if not isinstance(raw["model"], str) or not raw["model"].strip():
        raise PrunelabError(f"{path}: model must be a Hub id or a path, got {raw['model']!r}")

    per_task = {task: _task_settings(registry, task, evaluation, path) for task in tasks}
    chunk = _typed(evaluation, "chunk_items", int, CHUNK_ITEMS, f"{path} [evaluation]")
    if chunk < 1:
        raise PrunelabError(f"{path} [evaluation] chunk_items must be a positive integer, got {chunk!r}")
    strategies = [_strategy_grid(block, i, registry, path) for i, block in enumerate(_blocks(raw, path))]
    calibration = _calibration(raw.get("calibration"), strategies, registry, where, path)
    bench = _bench_settings(raw.get("bench"), path)
    recovery = study_recovery(raw.get("recovery"), [s.name for s in strategies], registry, where, path)
    chosen_data = Path(data_dir).expanduser() if data_dir else (
        _resolve_path(evaluation["data_dir"], where) if "data_dir" in evaluation else None)
    device = _typed(raw, "device", str, "auto", f"{path}")
    dtype = _typed(raw, "dtype", str, "auto", f"{path}")
    resolved_device = choose_device(device)
    engine = {"chat_template": _typed(evaluation, "chat_template", bool, False, f"{path} [evaluation]"),
              "enable_thinking": _typed(evaluation, "enable_thinking", bool, False, f"{path} [evaluation]"),
              "batch_tokens": _typed(evaluation, "batch_tokens", int, None, f"{path} [evaluation]")}
    settings = {
        "study": name, "model": raw["model"], "device": str(resolved_device),
        "dtype": str(choose_dtype(dtype, resolved_device)).removeprefix("torch."),
        "trust_remote_code": _typed(raw, "trust_remote_code", bool, False, f"{path}"),
        "prune_seed": _typed(raw, "prune_seed", int, 0, f"{path}"),
        "evaluation": {"tasks": {t: {**subset.as_dict(), **options} for t, (subset, options) in per_task.items()},
                       "chunk_items": chunk, **engine},
        "calibration": raw.get("calibration"),
        "strategies": [{"name": s.name, **s.grid} for s in strategies],
        **({"bench": bench} if bench else {}),
        **({"recovery": raw["recovery"]} if recovery else {}),
    }
    return Study(
        name=name, path=path, text=text, model=_model_path(str(raw["model"]), where),
        device=device, dtype=dtype, trust_remote_code=settings["trust_remote_code"],
        prune_seed=settings["prune_seed"], tasks=tasks, subsets={t: s for t, (s, _) in per_task.items()},
        task_options={t: o for t, (_, o) in per_task.items()}, data_dir=chosen_data, calibration=calibration,
        strategies=strategies, settings=settings, bench=bench, recovery=recovery,
        executor=ExecutorSettings.from_table(raw.get("executor"), f"{path} [executor]"),
    )


def _read_study_file(path: Path) -> tuple[str, dict[str, Any]]:
    """The file's text and its table: YAML for ``.yaml``/``.yml``, TOML otherwise (same keys either way)."""
    text = read_utf8(path, "cannot read study file")
    if path.suffix.lower() in {".yaml", ".yml"}:
        with reading(path, "invalid YAML"):
            raw = yaml.safe_load(text)  # plain data only: no tags that construct objects
        if not isinstance(raw, dict):
            raise PrunelabError(f"{path}: a study file is a mapping of settings (model, evaluation, strategies)")
        return text, raw
    with reading(path, "invalid TOML"):
        return text, tomllib.loads(text)


def _task_settings(registry: Registry, task: str, evaluation: dict[str, Any], path: Path):
    """(Subset, task options) of one task: ``[evaluation]`` settings, overridden by ``[evaluation.<task>]``.

    A common option (``seqlen``) applies to the tasks that declare it; one in a task's own table must
    be that task's.
    """
    evaluator = registry.evaluator(task)
    own = evaluation.get(task, {})
    _check_keys(own, SUBSET_KEYS | {o.name for o in evaluator.options}, f"{path} [evaluation.{task}]")
    where = f"{path} [evaluation.{task}]" if own else f"{path} [evaluation]"
    merged = {**{k: v for k, v in evaluation.items() if k in SUBSET_KEYS}, **own}
    subset = Subset(fraction=_typed(merged, "fraction", float, 1.0, where),
                    sample=_typed(merged, "sample", str, "random", where),
                    limit=_typed(merged, "limit", int, None, where), seed=_typed(merged, "seed", int, 1234, where))
    declared = {o.name for o in evaluator.options}
    options = {k: v for k, v in evaluation.items() if k in TASK_OPTION_KEYS and k in declared} | {
        k: v for k, v in own.items() if k not in SUBSET_KEYS}
    try:
        evaluator.option_set.validate(options)
    except PrunelabError as exc:
        raise PrunelabError(f"{where}: {exc}") from None
    return subset, options


def _check_keys(table: Any, known: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise PrunelabError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(map(str, set(table) - known))  # YAML keys may be numbers
    if unknown:
        raise PrunelabError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _typed(table: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    """``table[key]`` checked against ``kind`` (an int is a float too); a bad type is a one-line error."""
    value = table.get(key, default)
    if value is None and default is None:  # an explicit null (YAML) only where "not set" is allowed
        return None
    allowed = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, allowed):
        raise PrunelabError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return kind(value)


def _string_list(value: Any, where: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise PrunelabError(f"{where}: expected a list of names, got {value!r}")
    return list(dict.fromkeys(values))


def _blocks(raw: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    blocks = raw.get("strategies", [])
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise PrunelabError(f"{path}: strategies must be [[strategies]] tables")
    return blocks


def _strategy_grid(block: dict[str, Any], index: int, registry: Registry, path: Path) -> StrategyGrid:
    """Check the block's name and every grid point against the strategy's declared options."""
    if not isinstance(block.get("name"), str):
        raise PrunelabError(f"{path}: [[strategies]] number {index + 1} has no name (e.g. name = \"magnitude\")")
    strategy = registry.strategy(block["name"])
    grid = {key: value if isinstance(value, list) else [value] for key, value in block.items() if key != "name"}
    for key, values in grid.items():
        if not values:
            raise PrunelabError(f"{path}: strategy '{strategy.name}' option '{key}' is an empty list")
    for point in grid_points(grid):
        checked = {k: 0 if k == "layers" and v == EACH_LAYER else v for k, v in point.items()}
        try:
            validate_options(strategy, checked)
        except PrunelabError as exc:
            raise PrunelabError(f"{path}: {exc}") from None
    return StrategyGrid(strategy.name, grid)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the option lists, in file order (the last option varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _calibration(value: Any, strategies: list[StrategyGrid], registry: Registry, where: Path, path: Path):
    from .calibration import HUB_SOURCES, CalibrationSpec

    if value is None:
        return None
    _check_keys(value, {"source", "samples", "seqlen"}, f"{path} [calibration]")
    spec = dict(value)
    if "source" in spec and spec["source"] not in HUB_SOURCES:
        spec["source"] = str(_resolve_path(spec["source"], where))
    CalibrationSpec.from_mapping(spec).check_source()  # values and file now, not after the dense evaluation
    if not any(registry.strategy(s.name).uses_calibration(point) for s in strategies for point in grid_points(s.grid)):
        raise PrunelabError(f"{path}: [calibration] is given but no strategy uses calibration data")
    return spec


def _bench_settings(value: Any, path: Path) -> dict[str, Any] | None:
    """``[bench]`` (``bench = true`` for the defaults): prompt lengths, batch sizes, new tokens, repeats."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    where = f"{path} [bench]"
    if not isinstance(value, dict):
        raise PrunelabError(f"{where}: expected a table (or bench = true)")
    _check_keys(value, set(BENCH_DEFAULTS), where)
    settings = {**BENCH_DEFAULTS, **value}
    for key in ("prompt_lengths", "batches"):
        values = settings[key] if isinstance(settings[key], list) else [settings[key]]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise PrunelabError(f"{where} {key} must be positive integers, got {settings[key]!r}")
        settings[key] = values
    for key in ("new_tokens", "repeats"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise PrunelabError(f"{where} {key} must be a positive integer, got {settings[key]!r}")
    return settings


_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand(text: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` from the environment, then ``~``; an unset variable is an error."""
    def replace(match: re.Match) -> str:
        value = os.environ.get(match[1]) or match[2]
        if value is None:
            raise PrunelabError(f"environment variable {match[1]} is not set (used in {text!r})")
        return value
    return os.path.expanduser(_VARIABLE.sub(replace, text))


def _resolve_path(value: Any, where: Path) -> Path:
    path = Path(expand(str(value)))
    return path if path.is_absolute() else where / path


def _model_path(spec: str, where: Path) -> str:
    """A path-like model (``./``, ``../``, ``/``, ``~``, ``$``, ``.gguf``) is resolved; a Hub id is kept."""
    if spec.startswith(("./", "../", "/", "~", "$")) or spec.lower().endswith(".gguf"):
        return str(_resolve_path(spec, where))
    return spec


# ---------------------------------------------------------------------------------------- variants
def expand_variants(study: Study, num_layers: int) -> list[Variant]:
    """The dense baseline, then every grid point of every strategy (``layers = "each"`` -> each layer).

    With ``[recovery]`` each variant of a healed strategy is followed by its healed twin
    (``<variant>+lora``), so every statistic compares it with dense like any other variant.
    """
    variants = [DENSE_VARIANT]
    for block in study.strategies:
        grid = {k: [layer for value in values for layer in (range(num_layers) if value == EACH_LAYER else [value])]
                if k == "layers" else values for k, values in block.grid.items()}
        for point in grid_points(grid):
            _check_layers(block.name, point, num_layers)
            settings = ",".join(f"{k}={v}" for k, v in point.items())
            variants.append(Variant(f"{block.name}[{settings}]" if settings else block.name, block.name, point))
            if study.recovery and block.name in study.recovery["strategies"]:  # its healed twin right after it
                method = study.recovery["method"]
                variants.append(Variant(healed_name(variants[-1].name, method), healed_name(block.name, method),
                                        point, method))
    seen: set[str] = set()
    for variant in variants:
        if variant.name in seen:
            raise PrunelabError(f"variant {variant.name} appears twice in {study.path}")
        seen.add(variant.name)
    return variants


def _check_layers(strategy: str, point: dict[str, Any], num_layers: int) -> None:
    """Layer indices beyond the model fail before any variant runs, not half-way through the study."""
    if "layers" in point:
        try:
            beyond = [i for i in parse_layer_indices(point["layers"]) if i >= num_layers]
        except PrunelabError:  # not a layer list in this strategy's sense: its own checks apply
            return
        if beyond:
            raise PrunelabError(f"strategy '{strategy}': layers {beyond} out of range, the model has "
                                f"layers 0-{num_layers - 1}")


# ---------------------------------------------------------------------------------------- chunks
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


# ---------------------------------------------------------------------------------------- per-item rows
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


# ---------------------------------------------------------------------------------------- the work folder
class WorkFolder:
    """``<out>/<study>/.work``: the configuration, the plan, one parquet file per chunk and an event log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.session = os.urandom(6).hex()  # tells this invocation's log events from a resumed one's
        self.damaged: list[Path] = []  # chunks this invocation found damaged and moved aside

    def config_hash(self) -> str | None:
        """The configuration this folder's chunks belong to; a damaged marker is refused, never guessed."""
        marker = self.root / "config.json"
        if not marker.is_file():
            return None
        digest = read_json(marker, "damaged work folder marker").get("config_hash")
        if not isinstance(digest, str):
            raise FileProblem(marker, "damaged work folder marker: no config_hash (delete the folder to start over)")
        return digest

    def holds(self, digest: str) -> bool:
        return self.config_hash() == digest

    def claim(self, config: dict[str, Any], digest: str) -> None:
        """Create the folder for this configuration, or accept it if it holds this configuration's work."""
        found = self.config_hash()
        if found is not None:
            if found != digest:
                stored = json.loads((self.root / "config.json").read_text(encoding="utf-8")).get("config") or {}
                what = ("the same settings computed by other code or with another calibration text "
                        f"(code then: {stored.get('code')}, now: {config.get('code')})"
                        if artifacts.config_hash(_without_code(stored)) == artifacts.config_hash(_without_code(config))
                        else "a different configuration")
                raise PrunelabError(
                    f"{self.root} holds unfinished results of {what} of study "
                    f"'{config['study']}' (config {found[:8]}, this file {digest[:8]}); finish that run, "
                    f"use another --out, or delete the folder to discard it")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "config.json", lambda p: p.write_text(json.dumps({"config_hash": digest, "config": config}, indent=2)))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process per work folder: a second one would evaluate the same chunks."""
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            yield
            return
        with open(self.root / "lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PrunelabError(f"another prunelab process is running this study ({self.root})") from None
            yield

    def variant_folder(self, variant: Variant) -> Path:
        slug = re.sub(r"[^\w.=,-]+", "_", variant.name)[:80]
        return self.root / f"{slug}-{hashlib.sha1(variant.name.encode()).hexdigest()[:8]}"

    def chunk(self, variant: Variant, task: str, index: int) -> Path:
        return self.variant_folder(variant) / f"{task}-{index:04d}.parquet"

    def bench(self, variant: Variant) -> Path:
        return self.variant_folder(variant) / "bench.json"

    def reference(self, task: str, index: int) -> Path:
        """The dense model's reference for one task chunk (``prunelab.reference``), if its task keeps one."""
        return self.root / "reference" / f"{task}-{index:04d}.safetensors"

    def write_chunk(self, path: Path, frame: pl.DataFrame) -> None:
        """Write one chunk and its checksum; a failed write leaves every finished chunk as it was.

        The checksum is written first and the chunk renamed into place last, so a chunk file that
        exists either matches its checksum or is detected as damaged and computed again.
        """
        staging = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(staging)
            digest = file_digest(staging)
            atomic_write(checksum_path(path), lambda p: p.write_text(digest + "\n", encoding="utf-8"))
            os.replace(staging, path)
        except (OSError, pl.exceptions.PolarsError) as exc:
            staging.unlink(missing_ok=True)
            raise FileProblem(path, f"cannot write this chunk: {describe(exc)}; the finished chunks are kept in "
                                    f"{self.root}: run the same command again to resume") from exc

    def chunk_problem(self, path: Path) -> str | None:
        """Why a chunk file cannot be trusted (None: it can): missing, checksum mismatch, unreadable, wrong columns."""
        if not path.is_file():
            return "missing"
        sidecar = checksum_path(path)
        try:
            if sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip() != file_digest(path):
                return "checksum mismatch"
            schema = read_parquet(path).schema  # every page decodes
        except (OSError, ValueError) as exc:  # the checksum file
            return f"unreadable checksum ({describe(exc)})"
        except FileProblem as exc:  # the parquet file
            return f"unreadable ({exc.problem})"
        wrong = [name for name, kind in CORE_COLUMNS.items() if schema.get(name) not in (kind, pl.Null)]
        return f"wrong columns {', '.join(wrong)}" if wrong else None

    def finished_chunk(self, path: Path) -> bool:
        """True for a chunk that can be trusted; a damaged one is moved aside (``.damaged``) to be recomputed."""
        problem = self.chunk_problem(path)
        if problem in (None, "missing"):
            return problem is None
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".damaged"))
        self.damaged.append(path)
        self.log(event="damaged", chunk=str(path.relative_to(self.root)), problem=problem)
        return False

    def read_chunk(self, path: Path) -> pl.DataFrame:
        """A verified chunk's rows; a chunk damaged since it was checked is a one-line error naming it."""
        problem = self.chunk_problem(path)
        if problem:
            raise FileProblem(path, f"damaged chunk ({problem}): run the same command again to recompute it")
        return read_parquet(path)

    def load_plan(self) -> Plan | None:
        """The saved plan, or None when there is none or it is damaged (it is then made again)."""
        path = self.root / "plan.json"
        if not path.is_file():
            return None
        try:
            doc = read_json(path)
            plan = Plan([Variant(str(v["name"]), str(v["strategy"]), dict(v["params"])) for v in doc["variants"]],
                        {str(t): [(int(a), int(b)) for a, b in rs] for t, rs in doc["chunks"].items()})
        except (PrunelabError, LookupError, TypeError, ValueError, AttributeError):
            return None
        return plan if plan.variants else None

    def save_plan(self, plan: Plan) -> None:
        doc = {"variants": [dataclasses.asdict(v) for v in plan.variants], "chunks": plan.chunks}
        atomic_write(self.root / "plan.json", lambda p: p.write_text(json.dumps(doc, indent=1)))

    def log(self, **event: Any) -> None:
        """Append one event (a chunk evaluated, a variant pruned); a torn last line is skipped on reading."""
        with open(self.root / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "session": self.session, **event}, default=str) + "\n")

    def events(self) -> list[dict[str, Any]]:
        """Every readable event; torn or damaged lines, and lines that are not events, are skipped."""
        path = self.root / "log.jsonl"
        found = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
            with contextlib.suppress(ValueError, RecursionError):
                event = json.loads(line)
                if _whole_event(event):
                    found.append(event)
        return found


EVENT_FIELDS = {"chunk": ("variant", "task", "items", "seconds"), "prune": ("variant", "seconds", "report"),
                "load": ("seconds",)}
EVENT_TYPES: dict[str, Any] = {"event": str, "session": str, "variant": str, "task": str, "items": int,
                               "seconds": int | float, "report": dict}


def _whole_event(event: Any) -> bool:
    """An event the summaries can use: a mapping with the fields its kind needs, of their types."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return False
    if any(k not in event for k in EVENT_FIELDS.get(event["event"], ())):
        return False
    return all(isinstance(event[k], kind) and not isinstance(event[k], bool)
               for k, kind in EVENT_TYPES.items() if k in event)


@dataclass
class Plan:
    """Every variant, and each task's chunks as ``(start, stop)`` of its items or windows."""

    variants: list[Variant]
    chunks: dict[str, list[tuple[int, int]]]

    def pairs(self) -> Iterator[tuple[Variant, str, int, tuple[int, int]]]:
        for variant in self.variants:
            for task, ranges in self.chunks.items():
                for index, bounds in enumerate(ranges):
                    yield variant, task, index, bounds



def checksum_path(chunk: Path) -> Path:
    return chunk.with_name(chunk.name + ".sha256")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------- running
class Reporter:
    """What the runner tells its caller (the CLI draws progress bars); every method may be ignored."""

    def message(self, text: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def pair(self, variant: str, task: str, units: int) -> None: ...
    def advance(self, units: int) -> None: ...


def study_config(study: Study, tasks: list[PreparedTask]) -> dict[str, Any]:
    """What identifies the results: the settings, the model's weights and the evaluated items."""
    data = {}
    for task in tasks:
        digest = hashlib.sha256()
        for item in task.items:
            digest.update(json.dumps([item.id, item.group, item.data], sort_keys=True, default=str).encode())
        data[task.evaluator.name] = digest.hexdigest()[:16]
    return {**study.settings, "model_hash": source_fingerprint(study.model), "data": data,
            "calibration_text": calibration_fingerprint(study.calibration), "code": artifacts.code_version()}


def calibration_fingerprint(calibration: dict[str, Any] | None) -> str | None:
    """SHA-256 of a local calibration file's bytes (an edited file is another configuration); a Hub
    source by name (its text is fixed by the dataset revision the loader pins)."""
    source = (calibration or {}).get("source")
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        return f"hub:{source}"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def finished_run(study_dir: Path, digest: str) -> Path | None:
    """The newest finished run folder of this configuration, if any."""
    for folder in sorted(study_dir.glob(f"*-{digest[:8]}"), reverse=True):
        try:
            if json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("config_hash") == digest:
                return folder
        except (OSError, ValueError):
            continue
    return None


def run_of_other_code(study_dir: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The newest finished run with these settings, model and items but another prunelab version or commit."""
    wanted = artifacts.config_hash(_without_code(config))
    for manifest_path in sorted(study_dir.glob("*/manifest.json"), reverse=True):
        try:
            stored = json.loads(manifest_path.read_text(encoding="utf-8")).get("config") or {}
        except (OSError, ValueError):
            continue
        if artifacts.config_hash(_without_code(stored)) == wanted:
            return manifest_path.parent, stored.get("code") or {}
    return None


def _without_code(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in {"code", "calibration_text"}}


def decoding_settings(study: Study) -> dict[str, Any]:
    """How text was produced and prompts built: greedy decoding, budgets, few-shot counts, templates."""
    evaluation = study.settings["evaluation"]
    return {"decoding": "greedy (argmax, no sampling)", "chat_template": evaluation["chat_template"],
            "enable_thinking": evaluation["enable_thinking"], "batch_tokens": evaluation["batch_tokens"],
            "tasks": {t: {k: v for k, v in options.items() if k in TASK_OPTION_KEYS}
                      for t, options in evaluation["tasks"].items()}}


def declared_metrics(tasks: list[PreparedTask]) -> list[dict[str, Any]]:
    """Each task's declared metrics as the manifest stores them (the report reads them back)."""
    return [{"task": t.evaluator.name, **dataclasses.asdict(m)} for t in tasks for m in t.evaluator.metrics]
def prepare_study_tasks(study: Study) -> list[PreparedTask]:
    """Each task's items as the study selects them (the driver and every Ray worker prepare the same)."""
    data = DataSource.resolve(study.data_dir)
    return [prepare_tasks([name], data, study.subsets[name], study.task_options[name])[0] for name in study.tasks]


def run_study(study: Study, out: str | os.PathLike = "artifacts", *, rerun: bool = False,
              reporter: Reporter | None = None, layer_sweep: bool = True, executor: Executor | None = None) -> Path:
    """Run (or resume) every variant x task pair and write the run's artifacts; returns the run folder.

    ``layer_sweep``: when the study removes single layers, score them (and the dense model) through
    one ``LayerSweep`` per chunk instead of one pruned model each -- the same per-item results
    (to float rounding), about half the compute. Off only to measure or debug that.
    ``executor``: where the chunks are evaluated (default: this process; see ``prunelab.executors``).
    """
    reporter = reporter or Reporter()
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    tasks = prepare_study_tasks(study)
    if study.recovery and isinstance(study.recovery["options"].get("data"), str):
        reporter.message(f"healing data: {check_disjoint(study.recovery['options']['data'], tasks)}")
    config = study_config(study, tasks)
    digest = artifacts.config_hash(config)
    study_dir = Path(out) / study.name
    work = WorkFolder(study_dir / WORK)
    if not rerun and (done := finished_run(study_dir, digest)):
        reporter.message(f"this configuration already finished: {done} (pass --rerun to compute it again)")
        if work.holds(digest):  # left behind by a run stopped right after writing its artifacts
            shutil.rmtree(work.root, ignore_errors=True)
        artifacts.build_index(out)
        return done
    if not rerun and not work.holds(digest) and (other := run_of_other_code(study_dir, config)):
        code = other[1]
        reporter.message(f"{other[0]} ran this configuration with other code (prunelab {code.get('prunelab', '?')}, "
                         f"commit {code.get('commit') or '?'}; now {config['code']['prunelab']}, commit "
                         f"{config['code']['commit'] or '?'}) or another calibration text: computing it again")
    work.claim(config, digest)
    with work.locked():
        state = _Session(study, tasks, work, reporter, layer_sweep)
        plan = work.load_plan() or executor.plan(state)
        executor.evaluate(state, plan)
        items = collect_items(work, plan)
        manifest = {
            "config_hash": digest, "config": config, "study_file": study.text, "model": model_label(study.model),
            "model_path": study.model,
            "model_hash": config["model_hash"], "model_revision": executor.model_revision(state),
            "device": config["device"], "dtype": config["dtype"],
            "timings": timings(work.events(), time.perf_counter() - started),
            "variants": prune_reports(work.events()),
            "metrics": declared_metrics(tasks), "decoding": decoding_settings(study), "machine": artifacts.machine(),
        }
        run = artifacts.write_run(out, study.name, items, manifest, bench=collect_bench(work, plan))
    shutil.rmtree(work.root, ignore_errors=True)
    return run


class _Session:
    """One invocation's model and engine: loads the dense model only if something is left to compute."""

    def __init__(self, study: Study, tasks: list[PreparedTask], work: WorkFolder, reporter: Reporter,
                 layer_sweep: bool = True) -> None:
        self.study, self.tasks, self.work, self.reporter = study, {t.evaluator.name: t for t in tasks}, work, reporter
        self.layer_sweep = layer_sweep
        self.dense: LoadedModel | None = None

    def load(self) -> LoadedModel:
        if self.dense is None:
            self.reporter.message(f"loading {self.study.model}")
            start = time.perf_counter()
            self.dense = load_model(self.study.model, device=self.study.device, dtype=self.study.dtype,
                                    trust_remote_code=self.study.trust_remote_code)
            self.work.log(event="load", seconds=round(time.perf_counter() - start, 3))
        return self.dense

    def engine(self, loaded: LoadedModel) -> Engine:
        options = self.study.settings["evaluation"]
        return Engine(loaded.model, loaded.tokenizer, loaded.adapter, batch_tokens=options["batch_tokens"],
                      chat_template=options["chat_template"], enable_thinking=options["enable_thinking"])

    def plan(self) -> Plan:
        dense = self.load()
        engine = self.engine(dense)
        size = self.study.settings["evaluation"]["chunk_items"]
        plan = Plan(expand_variants(self.study, dense.adapter.num_layers),
                    {name: chunk_ranges(task, engine, size) for name, task in self.tasks.items()})
        self.work.save_plan(plan)
        return plan

    def evaluate(self, plan: Plan) -> None:
        pending = [(v, t, i, b) for v, t, i, b in plan.pairs() if not self.work.finished_chunk(self.work.chunk(v, t, i))]
        if self.work.damaged:
            self.reporter.message(f"recomputing {len(self.work.damaged)} damaged chunk(s) (moved aside as *.damaged)")
        units = sum(b[1] - b[0] for *_, b in plan.pairs())
        self.reporter.start(units, units - sum(b[1] - b[0] for *_, b in pending))
        if pending and self.layer_sweep and any(removed_layer(v) is not None for v in plan.variants):
            swept = [p for p in pending if self.sweepable(p[0], p[1])]
            if swept and LayerSweep.supports(self.load().adapter):
                self.evaluate_sweep(swept)
                pending = [p for p in pending if p not in swept]
        for variant, group in itertools.groupby(pending, key=lambda p: p[0]):
            chunks = list(group)
            loaded = self.variant_model(variant)
            self.bench(variant, loaded)
            engine = self.engine(loaded)
            for task, task_chunks in itertools.groupby(chunks, key=lambda p: p[1]):
                task_chunks = list(task_chunks)
                self.reporter.pair(variant.name, task, sum(b[1] - b[0] for *_, b in task_chunks))
                for _, _, index, (start, stop) in task_chunks:
                    self.run_chunk(engine, variant, task, index, start, stop)
            del loaded, engine
        for variant in plan.variants:  # swept variants, and any killed between evaluation and bench
            if self.study.bench and not self.work.bench(variant).is_file():
                self.bench(variant, self.variant_model(variant))

    def bench(self, variant: Variant, loaded: LoadedModel) -> None:
        """Measure the variant's size and speed once (``[bench]``), before evaluating it."""
        path = self.work.bench(variant)
        if not self.study.bench or path.is_file():
            return
        self.reporter.message(f"benchmarking: {variant.name}")
        result = {"parameters": parameter_count(loaded.model), "decoder_layers": loaded.adapter.num_layers,
                  **measure(loaded.adapter, **self.study.bench)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda staging: staging.write_text(json.dumps(result, default=str), encoding="utf-8"))
        self.work.log(event="bench", variant=variant.name)

    def sweepable(self, variant: Variant, task: str) -> bool:
        """Can this pair share a layer sweep: dense or one removed layer, on a scoring task."""
        if self.tasks[task].evaluator.generates:
            return False
        return variant.strategy == DENSE or removed_layer(variant) is not None

    def evaluate_sweep(self, pairs: list[tuple[Variant, str, int, tuple[int, int]]]) -> None:
        """Single-layer removals (and the dense model) chunk by chunk through one ``LayerSweep``.

        Layers below the removed one compute what the dense model computes, so each chunk is run
        once through the dense model, recording every layer's input, and each variant runs only
        the layers after its removed one. Every variant's rows of a chunk are written when the
        chunk is done: a kill loses that chunk, nothing finished.
        """
        engine = self.engine(self.load())
        self.reporter.message(f"layer sweep: {len({p[0].name for p in pairs})} variants share the layers "
                              "below each removed one")
        by_chunk = sorted(pairs, key=lambda p: (p[1], p[2]))
        for (task, index), group in itertools.groupby(by_chunk, key=lambda p: (p[1], p[2])):
            group = list(group)
            layers = sorted({layer for v, *_ in group if (layer := removed_layer(v)) is not None})
            sweep = LayerSweep(engine, layers)
            for variant, _, _, (start, stop) in group:
                self.reporter.pair(variant.name, task, stop - start)
                self.run_chunk(sweep.view(removed_layer(variant)), variant, task, index, start, stop, swept=True)

    def variant_model(self, variant: Variant) -> LoadedModel:
        """The dense model itself, or a pruned deep copy of it (the dense one is never changed)."""
        dense = self.load()
        if variant.strategy == DENSE:
            return dense
        self.reporter.message(f"pruning: {variant.name}")
        start = time.perf_counter()
        model = copy.deepcopy(dense.model)
        loaded = dataclasses.replace(dense, model=model, adapter=adapt(model))
        report = prune(loaded, variant.pruned_by, seed=self.study.prune_seed, calibration=self.study.calibration,
                       **variant.params)
        compact = compact_report(report)
        if variant.recovery:
            self.reporter.message(f"healing: {variant.name}")
            healed = heal(loaded, variant.recovery, masks=report.masks or MaskSet(), seed=self.study.prune_seed,
                          **self.study.recovery["options"])
            compact["recovery"] = compact_report(healed)
        self.work.log(event="prune", variant=variant.name, seconds=round(time.perf_counter() - start, 3),
                      report=compact)
        return loaded

    def run_chunk(self, engine: Engine, variant: Variant, task: str, index: int, start: int, stop: int,
                  swept: bool = False) -> None:
        begun = time.perf_counter()
        reference = ReferenceStore(self.work.reference(task, index), is_dense=variant.strategy == DENSE)
        result = run_task(engine, chunk_task(self.tasks[task], start, stop), self.reporter.advance, reference)
        path = self.work.chunk(variant, task, index)
        self.work.write_chunk(path, item_rows(variant, task, result, self.tasks[task].evaluator.metrics))
        self.work.log(event="chunk", variant=variant.name, task=task, chunk=index, items=stop - start,
                      seconds=round(time.perf_counter() - begun, 3), swept=swept)


def removed_layer(variant: Variant) -> int | None:
    """The one layer a ``drop-layers`` variant removes, or None for any other variant."""
    return single_layer(variant.params.get("layers")) if variant.strategy == "drop-layers" else None


def model_revision(loaded: LoadedModel | None) -> str | None:
    """The Hub commit the weights came from (transformers records it on the config); None otherwise.

    A Hub id alone does not pin the weights (``model_hash`` is ``hub:<id>``), so the manifest keeps
    the commit of the snapshot this session loaded.
    """
    return getattr(loaded.model.config, "_commit_hash", None) if loaded is not None else None


def model_label(model: str) -> str:
    """A Hub id as is; a local file or folder by its name (the index has no room for home paths)."""
    path = Path(model)
    return path.name if path.exists() else model


def collect_bench(work: WorkFolder, plan: Plan) -> pl.DataFrame | None:
    """One row per variant of what ``[bench]`` measured (None when the study measures nothing)."""
    found = [(v, work.bench(v)) for v in plan.variants if work.bench(v).is_file()]
    if not found:
        return None
    return bench_rows([(v.name, v.strategy, v.params_json, read_json(path, "damaged bench result"))
                       for v, path in found])


def collect_items(work: WorkFolder, plan: Plan) -> pl.DataFrame:
    """Every chunk's rows, in plan order: the run's per-item table."""
    frames = [work.read_chunk(work.chunk(v, t, i)) for v, t, i, _ in plan.pairs()]
    return pl.concat(frames, how="diagonal_relaxed")


def compact_report(report: dict[str, Any]) -> dict[str, Any]:
    """A prune report without its per-tensor and per-layer detail (the manifest keeps the totals)."""
    compact = dict(report)
    if isinstance(compact.get("sparsity"), dict):
        compact["sparsity"] = {"total": compact["sparsity"].get("total")}
    return json.loads(json.dumps(compact, default=str))


def prune_reports(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["variant"]: e["report"] for e in events if e.get("event") == "prune"}


def timings(events: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Seconds spent, summed over every session of the run, and what each session computed."""
    pairs: dict[str, dict[str, float]] = {}
    sessions: dict[str, dict[str, int]] = {}
    for e in events:
        session = sessions.setdefault(e.get("session", "?"), {"chunks": 0, "items": 0, "swept_chunks": 0})
        if e.get("event") == "chunk":
            task_seconds = pairs.setdefault(e["variant"], {})
            task_seconds[e["task"]] = round(task_seconds.get(e["task"], 0.0) + e["seconds"], 3)
            session["chunks"] += 1
            session["items"] += e["items"]
            session["swept_chunks"] += bool(e.get("swept"))
    return {
        "wall_s": round(wall, 3),  # the last session's, from start to artifacts
        "load_s": round(math.fsum(e["seconds"] for e in events if e.get("event") == "load"), 3),
        "prune_s": {e["variant"]: e["seconds"] for e in events if e.get("event") == "prune"},
        "evaluate_s": pairs,
        "evaluate_total_s": round(math.fsum(s for tasks in pairs.values() for s in tasks.values()), 3),
        # a layer-swept chunk computes every variant on its first one: that variant carries the time
        "layer_sweep_s": round(math.fsum(e["seconds"] for e in events if e.get("event") == "chunk" and e.get("swept")), 3),
        "sessions": [{"id": key, **counts} for key, counts in sessions.items()],
    }
