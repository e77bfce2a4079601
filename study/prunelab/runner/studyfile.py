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

import dataclasses
import itertools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import Subset
from prunelab.model.loading import choose_device, choose_dtype
from prunelab.prune.masks import validate_options
from prunelab.prune.recovery import study_recovery
from prunelab.readers import read_utf8, reading
from prunelab.registry import Registry, default_registry
from prunelab.report import artifacts

EACH_LAYER = "each"  # ``layers = "each"``: one variant per decoder layer, known once the model is
CHUNK_ITEMS = 32
# Bounds checked before anything is expanded or allocated (docs/errors.md, "bounds"): a real study
# has tens to a few hundred variants and a study file a few kilobytes.
MAX_VARIANTS = 10_000
MAX_STUDY_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after expanding aliases
WORK = ".work"
KINDS = ("local", "ray")  # [executor] kind
TOP_KEYS = {"name", "model", "device", "dtype", "trust_remote_code", "allow_pickle", "prune_seed", "evaluation",
            "calibration", "strategies", "bench", "recovery", "executor", "tolerance"}
BENCH_DEFAULTS = {"prompt_lengths": [128], "batches": [1], "new_tokens": 16, "repeats": 3}
SUBSET_KEYS = {"fraction", "sample", "limit", "seed"}
EVALUATION_KEYS = SUBSET_KEYS | {"tasks", "chat_template", "enable_thinking", "batch_tokens",
                                                    "data_dir", "chunk_items"}


@dataclass(frozen=True)
class ExecutorSettings:
    """``[executor]`` of a study file, overridden by ``prunelab study run --executor/--address/--workers``.

    ``address``: None starts a Ray instance on this machine (or joins ``$RAY_ADDRESS``), ``auto``
    joins the cluster this machine is a node of, ``ray://HOST:PORT`` a remote one through Ray Client.
    ``workers``: Ray actors (default: as many as the cluster has GPUs, or CPUs / ``cpus_per_worker``).
    ``gpus_per_worker``: default 1 when the study runs on CUDA, else 0 (then ``cpus_per_worker``
    torch threads). ``wait_s``: how long to wait for a worker to be placed before failing.
    ``max_restarts``: how often Ray restarts a lost worker (on any node with the resources).
    """

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    wait_s: float = 600.0
    max_restarts: int = 3

    @classmethod
    def from_table(cls, table: Any, where: str) -> ExecutorSettings:
        if table is None:
            return cls()
        if not isinstance(table, dict):
            raise PrunelabError(f"{where}: expected a table (e.g. kind = \"ray\")")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - set(fields))
        if unknown:
            raise PrunelabError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(fields)})")
        return cls().replace(where, **table)

    def replace(self, where: str, **changes: Any) -> ExecutorSettings:
        """These settings with ``changes`` (None: keep), each checked; a bad value is a one-line error."""
        kinds = {"kind": str, "address": str, "workers": int, "cpus_per_worker": int,
                 "gpus_per_worker": float, "wait_s": float, "max_restarts": int}
        checked = {}
        for key, value in changes.items():
            if value is None:
                continue
            kind = kinds[key]
            allowed = (int, float) if kind is float else (kind,)
            if isinstance(value, bool) or not isinstance(value, allowed):
                raise PrunelabError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
            checked[key] = kind(value)
        settings = dataclasses.replace(self, **checked)
        if settings.kind not in KINDS:
            raise PrunelabError(f"{where}: kind must be one of {', '.join(KINDS)}, got {settings.kind!r}")
        for key in ("workers", "cpus_per_worker"):
            if getattr(settings, key) is not None and getattr(settings, key) < 1:
                raise PrunelabError(f"{where}: {key} must be at least 1, got {getattr(settings, key)!r}")
        for key in ("gpus_per_worker", "wait_s", "max_restarts"):
            if getattr(settings, key) is not None and getattr(settings, key) < 0:
                raise PrunelabError(f"{where}: {key} must not be negative, got {getattr(settings, key)!r}")
        return settings


@dataclass(frozen=True)
class StrategyGrid:
    """One ``[[strategies]]`` block: a strategy and its options, where a list means "each of these"."""

    name: str
    grid: dict[str, list[Any]]
    each_layer: tuple[str, ...] = ()  # options where "each" means every decoder layer (the strategy declares them)


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
    bench: dict[str, Any] | None = None  # ``[bench]``: measure each variant's speed (prunelab.model.bench)
    recovery: dict[str, Any] | None = None  # ``[recovery]``: heal variants (prunelab.prune.recovery.study_recovery)
    #: ``[tolerance.<task>] <metric> = x``: the study's own tolerance for a metric that declares one
    tolerances: dict[tuple[str, str], float] = field(default_factory=dict)
    # ``[executor]``: where the pairs run (local, ray); not in the configuration hash -- every executor
    # writes the same chunk files, so a Ray run resumes a local one and the other way round
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    # ``allow_pickle = true``: read pickle weights (unsafe); not in the hash -- it changes no result
    allow_pickle: bool = False
    notes: tuple[str, ...] = ()  # what was chosen for the user (a study name made from the file name)


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
    _check_keys(evaluation, EVALUATION_KEYS | common_task_options(registry) | set(registry.evaluators),
                f"{path} [evaluation]")
    # no list: every installed task, built-in or third-party alike (the core names none of them)
    tasks = _string_list(evaluation.get("tasks", list(registry.evaluators)), f"{path} [evaluation] tasks")
    strays = sorted(k for k in evaluation if k in registry.evaluators and k not in tasks)
    if strays:
        raise PrunelabError(f"{path}: [evaluation.{strays[0]}] is given but {strays[0]} is not in tasks")
    where = path.resolve().parent
    name, notes = _study_name(raw, path)
    if "model" not in raw:
        raise PrunelabError(f"{path}: no model (e.g. model = \"Qwen/Qwen3-0.6B\")")
    if not isinstance(raw["model"], str) or not raw["model"].strip():
        raise PrunelabError(f"{path}: model must be a Hub id or a path, got {raw['model']!r}")

    per_task = {task: _task_settings(registry, task, evaluation, path) for task in tasks}
    chunk = _typed(evaluation, "chunk_items", int, CHUNK_ITEMS, f"{path} [evaluation]")
    if chunk < 1:
        raise PrunelabError(f"{path} [evaluation] chunk_items must be a positive integer, got {chunk!r}")
    blocks = _blocks(raw, path)
    check_variant_count(sum(grid_size(block) for block in blocks), f"{path}", "its [[strategies]] grids")
    strategies = [_strategy_grid(block, i, registry, path) for i, block in enumerate(blocks)]
    calibration = _calibration(raw.get("calibration"), strategies, registry, where, path)
    bench = _bench_settings(raw.get("bench"), path)
    recovery = study_recovery(raw.get("recovery"), [s.name for s in strategies], registry, where, path)
    tolerances = _tolerances(raw.get("tolerance"), tasks, registry, path)
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
        **({"tolerance": raw["tolerance"]} if tolerances else {}),
    }
    return Study(
        name=name, path=path, text=text, model=_model_path(str(raw["model"]), where),
        device=device, dtype=dtype, trust_remote_code=settings["trust_remote_code"],
        prune_seed=settings["prune_seed"], tasks=tasks, subsets={t: s for t, (s, _) in per_task.items()},
        task_options={t: o for t, (_, o) in per_task.items()}, data_dir=chosen_data, calibration=calibration,
        strategies=strategies, settings=settings, bench=bench, recovery=recovery, tolerances=tolerances,
        executor=ExecutorSettings.from_table(raw.get("executor"), f"{path} [executor]"),
        allow_pickle=_typed(raw, "allow_pickle", bool, False, f"{path}"), notes=tuple(notes),
    )


def _study_name(raw: dict[str, Any], path: Path) -> tuple[str, list[str]]:
    """The study's folder name: ``name``, else the file's name -- made plain (and said so) when it is not one.

    A ``name`` written in the file must be a plain folder name (letters, digits, . _ -); the file's
    own name is the user's filesystem's business, so ``mon étude.toml`` becomes ``mon-etude``.
    """
    if "name" in raw:
        name = _typed(raw, "name", str, "", f"{path}")
        if not artifacts.STUDY_NAME.match(name):
            raise PrunelabError(f"{path}: study name {name!r} is not a plain folder name (letters, digits, . _ -)")
        return name, []
    if artifacts.STUDY_NAME.match(path.stem):
        return path.stem, []
    name = slugify(path.stem)
    return name, [f"study name: {name} (the file name {path.stem!r} is not a plain folder name; set name = ... "
                  "to choose another)"]


def slugify(text: str, default: str = "study") -> str:
    """A plain folder name from any text: accents dropped, every other run of characters one '-'."""
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text).strip("-._")[:80].strip("-._")
    return slug if artifacts.STUDY_NAME.match(slug) else default


def _tolerances(value: Any, tasks: list[str], registry: Registry, path: Path) -> dict[tuple[str, str], float]:
    """``[tolerance.<task>] <metric> = x``: only for metrics whose evaluator declares a tolerance."""
    if value is None:
        return {}
    where = f"{path} [tolerance]"
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise PrunelabError(f"{where}: expected [tolerance.<task>] tables of <metric> = number")
    found = {}
    for task, metrics in value.items():
        if task not in tasks:
            raise PrunelabError(f"{where}: task {task!r} is not in the study's tasks ({', '.join(tasks)})")
        declared = {m.name for m in registry.evaluator(task).metrics if m.tolerance is not None}
        for metric, number in metrics.items():
            if metric not in declared:
                raise PrunelabError(f"{where}: {task} metric {metric!r} takes no tolerance "
                                    f"(those that do: {', '.join(sorted(declared)) or 'none'})")
            if isinstance(number, bool) or not isinstance(number, int | float) or not 0 <= number < math.inf:
                raise PrunelabError(f"{where}: {task}.{metric} must be a non-negative number, got {number!r}")
            found[(task, metric)] = float(number)
    return found


def _read_study_file(path: Path) -> tuple[str, dict[str, Any]]:
    """The file's text and its table: YAML for ``.yaml``/``.yml``, TOML otherwise (same keys either way)."""
    with reading(path, "cannot read study file"):
        size = path.stat().st_size
    if size > MAX_STUDY_BYTES:
        raise PrunelabError(f"{path}: a study file of {size:,} bytes, more than prunelab's limit of "
                            f"{MAX_STUDY_BYTES:,}")
    text = read_utf8(path, "cannot read study file")
    if path.suffix.lower() in {".yaml", ".yml"}:
        with reading(path, "invalid YAML"):
            raw = yaml.load(text, Loader=BoundedLoader)  # plain data only: no tags that construct objects
        if not isinstance(raw, dict):
            raise PrunelabError(f"{path}: a study file is a mapping of settings (model, evaluation, strategies)")
        return text, raw
    with reading(path, "invalid TOML"):
        return text, tomllib.loads(text)


class BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a document whose nodes, with every alias expanded, exceed
    ``MAX_YAML_NODES``, and a recursive alias -- before anything is constructed.

    An alias is one node shared by reference, so a few lines of nested aliases (a "billion laughs")
    make a structure whose expanded size is exponential: every later walk of it (validation, the
    configuration hash) would take minutes and gigabytes. The expanded size is counted on the
    composed node graph, each distinct node once (memoized), so the check itself is linear.
    """

    def compose_document(self):
        node = super().compose_document()
        expanded_size(node, {}, set())
        return node


def expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes under ``node`` with aliases expanded; a ``yaml.YAMLError`` past the limit or on a cycle."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.YAMLError("a recursive alias (a node that contains itself)")
    open_nodes.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    total = 1
    for child in children:
        total += expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} nodes once aliases are expanded (an alias bomb?); "
                                 "prunelab's limit")
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _task_settings(registry: Registry, task: str, evaluation: dict[str, Any], path: Path):
    """(Subset, task options) of one task: ``[evaluation]`` settings, overridden by ``[evaluation.<task>]``.

    A common option (``seqlen``) applies to the tasks that declare it; one in a task's own table must
    be that task's.
    """
    evaluator = registry.evaluator(task)
    if not evaluator.metrics:  # the report compares only what an evaluator declares
        raise PrunelabError(f"{path}: task {task} declares no metrics (Evaluator.metrics), so a study cannot report it")
    own = evaluation.get(task, {})
    _check_keys(own, SUBSET_KEYS | {o.name for o in evaluator.options}, f"{path} [evaluation.{task}]")
    where = f"{path} [evaluation.{task}]" if own else f"{path} [evaluation]"
    merged = {**{k: v for k, v in evaluation.items() if k in SUBSET_KEYS}, **own}
    subset = Subset(fraction=_typed(merged, "fraction", float, 1.0, where),
                    sample=_typed(merged, "sample", str, "random", where),
                    limit=_typed(merged, "limit", int, None, where), seed=_typed(merged, "seed", int, 1234, where))
    declared = {o.name for o in evaluator.options}
    options = {k: v for k, v in evaluation.items() if k in common_task_options(registry) and k in declared} | {
        k: v for k, v in own.items() if k not in SUBSET_KEYS}
    try:
        evaluator.option_set.validate(options)
    except PrunelabError as exc:
        raise PrunelabError(f"{where}: {exc}") from None
    return subset, options


def common_task_options(registry: Registry) -> set[str]:
    """Task options an ``[evaluation]`` table may set for every task that declares them (``seqlen``).

    Whatever the installed evaluators declare: a new task's option needs no change here.
    """
    return {option.name for evaluator, _ in registry.evaluators.values() for option in evaluator.options}


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
        checked = {k: 0 if k in strategy.each_layer and v == EACH_LAYER else v for k, v in point.items()}
        try:
            validate_options(strategy, checked)
        except PrunelabError as exc:
            raise PrunelabError(f"{path}: {exc}") from None
    return StrategyGrid(strategy.name, grid, strategy.each_layer)


def grid_size(block: dict[str, Any]) -> int:
    """How many variants a ``[[strategies]]`` block expands to, from its list lengths (the product),
    without expanding it; ``"each"`` counts as one here (``expand_variants`` checks it with the layers)."""
    return math.prod(len(value) if isinstance(value, list) else 1 for key, value in block.items() if key != "name")


def check_variant_count(count: int, where: str, what: str) -> None:
    if count > MAX_VARIANTS:
        raise PrunelabError(f"{where}: {what} expand to {count:,} variants, more than prunelab's limit of "
                            f"{MAX_VARIANTS:,}")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the option lists, in file order (the last option varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _calibration(value: Any, strategies: list[StrategyGrid], registry: Registry, where: Path, path: Path):
    from prunelab.prune.calibration import HUB_SOURCES, CalibrationSpec

    if value is None:
        return None
    _check_keys(value, {"source", "samples", "seqlen"}, f"{path} [calibration]")
    spec = dict(value)
    if "source" in spec and spec["source"] not in HUB_SOURCES:
        spec["source"] = str(_resolve_path(spec["source"], where))
    CalibrationSpec.from_mapping(spec).check_source()  # values and file now, not after the dense evaluation
    if not any(registry.calibrates(s.name, point) for s in strategies for point in grid_points(s.grid)):
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
