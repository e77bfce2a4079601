"""The ``prunelab`` command: a thin argparse + rich layer over the Python API.

Each subcommand is one ``add_*`` function (its arguments) and one ``run_*`` function (its work),
registered in ``COMMANDS``. A ``PrunelabError`` becomes one red line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from prunelab import __version__
from prunelab.errors import PrunelabError
from prunelab.readers import atomic_write, check_output_file, check_output_folder, describe

# soft_wrap: a message is one line however long (a path); the terminal wraps it, a log file keeps it whole
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)  # printed paths (``report: .../report.html``) are read back by scripts: never wrapped

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add: Callable[[argparse.ArgumentParser], None]):
    """Register ``run`` as the handler of subcommand ``name`` whose arguments ``add`` declares."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, add, run)
        return run
    return register


@contextmanager
def progress_bars():
    """Rich progress bars with ETA on stderr (quiet when stderr is not a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bars:
        yield bars


# ---------------------------------------------------------------------- shared arguments
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from prunelab.model.loading import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local HF folder, or .gguf file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (CUDA bf16; CPU fp32 unless native bf16), float32, bfloat16, float16")
    add_trust_arguments(parser)


def add_trust_arguments(parser: argparse.ArgumentParser) -> None:
    """What a model's files may run: nothing unless asked (see docs/errors.md, "code from data")."""
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (auto_map; off by default)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="UNSAFE: read pickle weights (pytorch_model.bin) when there are no safetensors")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task names (default: every installed task; see `prunelab plugins`)")
    parser.add_argument("--data-dir", default=None, help="local data folder (mmlu/, gsm8k/, wikitext-2/); env PRUNELAB_DATA")
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction of each task (per MMLU subject), in (0, 1]")
    parser.add_argument("--sample", choices=("random", "first"), default="random",
                        help="random: seeded stratified sample; first: first items of each subject (lm-eval --limit)")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per task (per MMLU subject)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default 5)")
    parser.add_argument("--seqlen", type=int, default=None, help="perplexity window in tokens (default 2048)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="GSM8K generation budget (default 256)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--enable-thinking", action="store_true", help="with --chat-template: Qwen3 thinking on")
    parser.add_argument("--batch-tokens", type=int, default=None, help="token budget per micro-batch")


def common_task_options(args: argparse.Namespace) -> dict:
    return {"num_fewshot": args.num_fewshot, "seqlen": args.seqlen, "max_new_tokens": args.max_new_tokens}


def subset_from(args: argparse.Namespace):
    from prunelab.evaluate.data import Subset

    return Subset(fraction=args.fraction, sample=args.sample, limit=args.limit, seed=args.seed)


def engine_for(loaded, args: argparse.Namespace):
    from prunelab.evaluate.engine import Engine

    return Engine(loaded.model, loaded.tokenizer, loaded.adapter, batch_tokens=args.batch_tokens,
                  chat_template=args.chat_template, enable_thinking=args.enable_thinking)


def load_from(args: argparse.Namespace):
    from prunelab.model.loading import load_model

    with console.status(f"loading {args.model}"):
        return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                          allow_pickle=args.allow_pickle)


# ---------------------------------------------------------------------- eval
def _add_eval(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--out", default=None, help="folder for results.json and items.parquet")


@command("eval", "evaluate a model (MMLU, GSM8K, WikiText-2 perplexity)", _add_eval)
def run_eval(args: argparse.Namespace) -> int:
    from prunelab.evaluate.data import DataSource
    from prunelab.evaluate.run import evaluate, parse_tasks, prepare_tasks, write_outputs
    from prunelab.registry import default_registry

    subset = subset_from(args)
    if args.out:
        check_output_folder(args.out)  # before an evaluation that could not be saved
    names = parse_tasks(list(default_registry().evaluators) if args.tasks is None else args.tasks)  # default: all
    tasks = prepare_tasks(names, DataSource.resolve(args.data_dir), subset, common_task_options(args))
    loaded = load_from(args)
    with progress_bars() as bars:
        def start(task):
            bar = bars.add_task(task.evaluator.name, total=_progress_total(task))
            return lambda n: bars.advance(bar, n)

        run = evaluate(loaded, tasks, engine=engine_for(loaded, args), on_task_start=start,
                       config={"subset": subset.as_dict(), "data": DataSource.resolve(args.data_dir).describe()})
    out.print(summary_table(run))
    if args.out:
        path = write_outputs(run, args.out)
        console.print(f"wrote {path / 'results.json'} and {path / 'items.parquet'}", highlight=False, markup=False)
    return 0


def _progress_total(task) -> int | None:
    """Units the evaluator reports progress in: its items, or unknown before the model is for a task whose
    units depend on the tokenizer (it declares ``count_units``: WikiText's windows)."""
    if task.evaluator.count_units is not None:
        return None
    return len(task.items)


def summary_table(run) -> Table:
    table = Table(title=f"{run.config['model']} ({run.config['dtype']}, {run.config['device']})")
    for column in ("task", "n", "metric", "value", "± stderr", "time (s)"):
        table.add_column(column, justify="left" if column in {"task", "metric"} else "right")
    for name, result in run.results.items():
        for metric, value in result.metrics.items():
            if metric == "n" or metric.endswith("_stderr") or not isinstance(value, float):
                continue
            stderr = result.metrics.get(f"{metric}_stderr")
            table.add_row(name, str(result.metrics["n"]), metric, f"{value:.4f}",
                          "" if stderr is None else f"{stderr:.4f}", f"{run.timings[name]:.1f}")
    return table


# ---------------------------------------------------------------------- plugins
@command("plugins", "list discovered strategies, evaluators and recovery methods", lambda parser: None)
def run_plugins(args: argparse.Namespace) -> int:
    from prunelab.registry import default_registry

    registry = default_registry()
    table = Table(title="prunelab plugins")
    for column in ("kind", "name", "package", "version", "description"):
        table.add_column(column)
    for name, (strategy, info) in sorted(registry.strategies.items()):
        table.add_row("strategy", name, info.package, info.version, strategy.description)
    for name, (evaluator, info) in sorted(registry.evaluators.items()):
        table.add_row("evaluator", name, info.package, info.version, evaluator.description)
    for name, (recovery, info) in sorted(registry.recoveries.items()):
        table.add_row("recovery", name, info.package, info.version, recovery.description)
    out.print(table)
    out.print(plugins_table(registry))
    failed = [p for p in registry.plugins if p.error]
    for plugin in failed:
        console.print(f"[red]plugin '{plugin.name}' ({plugin.module}, {plugin.package} {plugin.version}) failed to load: {plugin.error}")
    return 0


def plugins_table(registry) -> Table:
    """Each plugin (entry point) with its distribution, version and how many items of each kind it adds:
    a plugin that loads but adds nothing shows as such."""
    table = Table(title="prunelab plugin packages")
    for column in ("plugin", "module", "package", "version", "adds"):
        table.add_column(column)
    for plugin in registry.plugins:
        counts = {kind.kind: sum(1 for _, info in kind.values() if info == plugin)
                  for kind in (registry.strategies, registry.evaluators, registry.recoveries)}
        adds = "failed to load" if plugin.error else ", ".join(f"{kind} × {n}" for kind, n in counts.items() if n)
        table.add_row(plugin.name, plugin.module, plugin.package, plugin.version, adds or "nothing")
    return table


# ---------------------------------------------------------------------- prune
def _add_prune(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--method", required=True, help="strategy name: drop-layers, magnitude, ... (see `prunelab plugins`)")
    parser.add_argument("--layers", default=None, help="drop-layers: indices to remove, e.g. 3,7,12 or 0-3")
    parser.add_argument("--sparsity", default=None, help="percent in [0, 100] (a fraction < 1 is accepted)")
    parser.add_argument("--pattern", default=None, help="unstructured, or N:M such as 2:4 / 4:8")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other strategy option (repeatable), e.g. --option order=largest")
    parser.add_argument("--seed", type=int, default=0, help="seed for calibration sampling / random choices")
    parser.add_argument("--calibration", default=None, metavar="SOURCE",
                        help="calibration text for Wanda/SparseGPT/OWL: c4, wikitext2 (Hub) or a local text file")
    parser.add_argument("--calibration-samples", type=int, default=None, help="calibration samples (default 128)")
    parser.add_argument("--calibration-seqlen", type=int, default=None, help="tokens per calibration sample (default 2048)")
    parser.add_argument("--out", required=True, help="folder for the pruned model and prunelab.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-masks", action="store_true", help="do not write masks.safetensors")


def strategy_options_from(args: argparse.Namespace,
                          shortcuts: tuple[str, ...] = ("layers", "sparsity", "pattern")) -> dict[str, str]:
    """The shortcut arguments (--layers/--sparsity/--pattern) and every --option KEY=VALUE, as one mapping."""
    options: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PrunelabError(f"--option {item!r}: expected KEY=VALUE")
        if key in options:
            raise PrunelabError(f"option '{key}' given twice")
        options[key] = value.strip()
    for key in shortcuts:
        value = getattr(args, key)
        if value is not None:
            if key in options:
                raise PrunelabError(f"option '{key}' given twice (--{key} and --option {key}=...)")
            options[key] = value
    return options


@command("prune", "prune a model with a strategy and save it as a normal checkpoint", _add_prune)
def run_prune(args: argparse.Namespace) -> int:
    from prunelab.model.export import save_pruned
    from prunelab.prune.api import prune
    from prunelab.prune.masks import validate_options
    from prunelab.registry import default_registry

    options = strategy_options_from(args)
    strategy = default_registry().strategy(args.method)
    validate_options(strategy, options)  # fail before loading the model
    calibration = calibration_from(args, strategy, options)
    out_dir = check_output_folder(args.out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise PrunelabError(f"output folder {out_dir} is not empty (choose another --out, or --overwrite)")
    loaded = load_from(args)
    with console.status(f"pruning with {args.method}"):
        report = prune(loaded, args.method, seed=args.seed, calibration=calibration, **options)
    with console.status(f"saving to {out_dir}"):
        path = save_pruned(loaded, out_dir, report, overwrite=args.overwrite, save_masks=not args.no_masks)
    out.print(prune_table(report, path))
    out.print(f"wrote {path}", highlight=False, markup=False)  # whole on one line: a script reads it back
    return 0


def calibration_from(args: argparse.Namespace, strategy, options: dict) -> dict | None:
    """The --calibration* arguments as a calibration dict (None: the strategy's defaults)."""
    values = {"source": args.calibration, "samples": args.calibration_samples, "seqlen": args.calibration_seqlen}
    given = {key: value for key, value in values.items() if value is not None}
    if not given:
        return None
    if not strategy.uses_calibration(options):
        raise PrunelabError(f"strategy '{strategy.name}' uses no calibration data with these options "
                            "(drop the --calibration* arguments)")
    from prunelab.prune.calibration import CalibrationSpec

    CalibrationSpec.from_mapping(given).check_source()  # checks the values and the file before the model is loaded
    return given


def prune_table(report, path) -> Table:
    table = Table(title=f"{report['strategy']} -> {path}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in report["options"].items():
        if value is not None and value is not False:
            table.add_row(f"option {key}", str(value))
    if "layers_before" in report:
        table.add_row("decoder layers", f"{report['layers_before']} -> {report['layers_after']}")
        table.add_row("removed layers", ", ".join(map(str, report.get("dropped_layers", []))))
    for key, (before, after) in (report.get("width") or {}).get("config", {}).items():  # prunelab.model's width record
        table.add_row(f"config {key}", f"{before} -> {after}")
    table.add_row("parameters", f"{report['parameters']['before']:,} -> {report['parameters']['after']:,}")
    if "sparsity" in report:
        total = report["sparsity"]["total"]
        table.add_row("achieved sparsity of targets", f"{total['sparsity_pct']:.2f}% ({total['zeros']:,} / {total['params']:,})")
    return table


# ---------------------------------------------------------------------- heal
HEAL_SHORTCUTS = ("rank", "alpha", "steps", "lr", "batch", "seqlen", "data", "target_modules")


def _add_heal(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--method", default="lora", help="recovery method (see `prunelab plugins`; default lora)")
    parser.add_argument("--rank", default=None, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", default=None, help="LoRA alpha (default 16)")
    parser.add_argument("--steps", default=None, help="optimizer steps (default 100)")
    parser.add_argument("--lr", default=None, help="learning rate (default 2e-4)")
    parser.add_argument("--batch", default=None, help="windows per step (default 4)")
    parser.add_argument("--seqlen", default=None, help="tokens per window (default 512)")
    parser.add_argument("--data", default=None, metavar="SOURCE",
                        help="wikitext2 (Hub train split), c4 (Hub) or a local text/.jsonl file; never the test set")
    parser.add_argument("--target-modules", dest="target_modules", default=None,
                        help="Linear names to adapt, e.g. q_proj,v_proj (default: every decoder Linear)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other option of the method (repeatable), e.g. --option dropout=0")
    parser.add_argument("--masks", default="auto", metavar="auto|none|zeros|FILE",
                        help="pruning masks to keep: auto = the folder's masks.safetensors (or its zeros if its "
                             "prunelab.json records a weight pruning); zeros = every zero weight; none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter init, dropout and data order")
    parser.add_argument("--out", required=True, help="folder for the healed model, adapter/ and prunelab.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")


@command("heal", "fine-tune a pruned model to recover quality (LoRA), keeping its masks; save it merged", _add_heal)
def run_heal(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from prunelab.model.export import read_recipe, save_pruned
    from prunelab.prune.recovery import (
        check_training_source,
        heal,
        healed_recipe,
        masks_of,
        validate_recovery,
    )

    options = strategy_options_from(args, HEAL_SHORTCUTS)
    _, validated = validate_recovery(args.method, options)  # bad options fail before the model loads
    if isinstance(validated.get("data"), str):
        check_training_source(validated["data"])  # a missing file too
    out_dir = Path(args.out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise PrunelabError(f"output folder {out_dir} is not empty (choose another --out, or --overwrite)")
    if args.masks not in {"auto", "none", "zeros"} and not Path(args.masks).is_file():
        raise PrunelabError(f"masks file not found: {args.masks}")
    loaded = load_from(args)
    masks, masks_source = masks_of(loaded.local_dir if loaded.kind == "dir" else None, loaded.adapter, args.masks)
    steps = int(validated.get("steps") or 0) or None
    with tempfile.TemporaryDirectory(prefix="prunelab-adapter-") as adapter_dir, progress_bars() as bars:
        bar = bars.add_task(f"{args.method}: healing", total=steps)

        def step_done(step: int, loss: float) -> None:
            bars.update(bar, completed=step, description=f"{args.method}: loss {loss:.3f}")

        report = heal(loaded, args.method, masks=masks, seed=args.seed, progress=step_done,
                      adapter_dir=adapter_dir, **options)
        recipe = healed_recipe(report, read_recipe(loaded.local_dir) if loaded.kind == "dir" else None, masks_source)

        def copy_adapter(folder: Path) -> None:
            if any(Path(adapter_dir).iterdir()):
                shutil.copytree(adapter_dir, folder / "adapter")

        with console.status(f"saving to {out_dir}"):
            path = save_pruned(loaded, out_dir, recipe, overwrite=args.overwrite, extra_files=copy_adapter)
    out.print(heal_table(report, path))
    out.print(f"wrote {path}", highlight=False, markup=False)
    return 0


def heal_table(report, path) -> Table:
    table = Table(title=f"{report['method']} -> {path}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in report["options"].items():
        table.add_row(f"option {key}", str(value))
    losses = report.get("loss") or []
    if losses:
        table.add_row("loss (first -> last step)", f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    if report.get("trainable_parameters") is not None:
        table.add_row("trainable parameters", f"{report['trainable_parameters']:,}")
    table.add_row("pruned weights kept at zero", f"{report['masks']['pruned_weights_kept_zero']:,}")
    table.add_row("seconds", f"{report['seconds']:.1f}")
    return table


# ---------------------------------------------------------------------- study and index
def _add_study(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="study_action", required=True)
    run = actions.add_parser("run", help="run (or resume) every variant x task pair of a study file",
                             description="Run every variant x task pair of a study file; rerunning resumes.")
    run.add_argument("file", help="study file (TOML or YAML), e.g. studies/smoke.toml")
    run.add_argument("--out", default="artifacts", help="artifacts root (default: artifacts)")
    run.add_argument("--data-dir", default=None, help="local data folder, overrides the study file's data_dir")
    run.add_argument("--rerun", action="store_true", help="compute a configuration that already finished again")
    run.add_argument("--executor", choices=("local", "ray"), default=None,
                     help="where the chunks run (default: the study file's [executor], else local); see docs/scale-out.md")
    run.add_argument("--address", default=None,
                     help="ray: auto or ray://HOST:PORT (default: a new Ray instance here, or $RAY_ADDRESS)")
    run.add_argument("--workers", type=int, default=None, help="ray: number of workers (default: what the cluster fits)")


class StudyProgress:
    """The runner's reporter: an overall bar with ETA and one bar per pair (lines when not a terminal)."""

    def __init__(self, bars: Progress) -> None:
        self.bars, self.overall, self.current = bars, None, None

    def message(self, text: str) -> None:
        console.print(text, highlight=False, markup=False)

    def start(self, total: int, done: int) -> None:
        self.overall = self.bars.add_task("study", total=total, completed=done)
        if done:
            console.print(f"resuming: {done} of {total} items already evaluated", highlight=False, markup=False)

    def pair(self, variant: str, task: str, units: int) -> None:
        if self.current is not None:
            self.bars.remove_task(self.current)
        self.current = self.bars.add_task(escape(f"{variant} · {task}"), total=units)
        if not console.is_terminal:
            console.print(f"evaluating {variant} on {task} ({units} items)", highlight=False, markup=False)

    def advance(self, units: int) -> None:
        for bar in (self.overall, self.current):
            if bar is not None:
                self.bars.advance(bar, units)


@command("study", "run a study file: every strategy x task pair, resumable, into versioned artifacts", _add_study)
def run_study_command(args: argparse.Namespace) -> int:
    from prunelab.runner.executors import make_executor
    from prunelab.runner.run import run_study
    from prunelab.runner.studyfile import load_study

    study = load_study(args.file, data_dir=args.data_dir)  # validated before any model is loaded
    for note in study.notes:
        console.print(note, highlight=False, markup=False)
    check_output_folder(args.out)
    executor = make_executor(study.executor.replace(
        "command line", kind=args.executor, address=args.address, workers=args.workers))
    executor.connect()  # an unreachable cluster fails here, before any model is loaded
    with progress_bars() as bars:
        run = run_study(study, args.out, rerun=args.rerun, reporter=StudyProgress(bars), executor=executor)
    out.print(f"run: {run}\nreport: {run / 'report.html'}\nindex: {index_of(run.parent.parent)}",
              highlight=False, markup=False)
    return 0


def index_of(root) -> str:
    """Where prunelab's index of ``root`` is; the user is told (stderr) when an ``index.html`` prunelab
    did not write was kept and the index written beside it."""
    from prunelab.report.artifacts import INDEX, index_file

    index = index_file(root)
    if index.name != INDEX:
        _tell(f"kept {index.with_name(INDEX)} (prunelab did not write it); prunelab's index is {index}")
    return str(index)


def _add_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="artifacts", help="artifacts root (default: artifacts)")


@command("index", "rebuild the artifacts index.html from every run's manifest", _add_index)
def run_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prunelab.report.artifacts import build_index

    if not Path(args.root).is_dir():
        raise PrunelabError(f"artifacts folder not found: {args.root}")
    out.print(f"wrote {build_index(args.root, tell=_tell)}", highlight=False, markup=False)
    return 0


def _tell(text: str) -> None:
    console.print(text, highlight=False, markup=False)


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished run folder, e.g. artifacts/my-study/20261128T143000Z-abc1234-9f8e7d6c")


@command("report", "rebuild a run's summary, charts, report and the index from its stored items (no model)",
         _add_report)
def run_report(args: argparse.Namespace) -> int:
    from prunelab.report.artifacts import has_prunelab_index, rebuild_run

    folder = rebuild_run(args.run_dir, tell=_tell)
    out.print(f"rebuilt {folder / 'report.html'}", highlight=False, markup=False)
    if has_prunelab_index(folder.parent.parent):
        out.print(f"index: {index_of(folder.parent.parent)}", highlight=False, markup=False)
    return 0


# ---------------------------------------------------------------------- importance
def _add_importance(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--metric", default="bi,angular,ppl", help="comma-separated metrics: bi, angular, ppl")
    parser.add_argument("--n", type=int, default=None, help="angular: size of the contiguous block to drop")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (default 8)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per calibration sample (default 512)")
    parser.add_argument("--calibration", default=None, metavar="SOURCE",
                        help="calibration text: c4, wikitext2 (Hub) or a local text/.jsonl file (default c4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--last-token", action="store_true",
                        help="average similarities over each sample's last token only (Gromov et al.)")
    parser.add_argument("--sweep", default=None, metavar="SUMMARY",
                        help="a layer-sweep study's summary.parquet/.csv: Spearman of each metric vs the measured harm")
    parser.add_argument("--out", required=True, help="folder for importance.parquet/.csv/.json/.html/.png")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier importance files in --out")


@command("importance", "score every decoder layer (bi, angular, ppl) from calibration text", _add_importance)
def run_importance(args: argparse.Namespace) -> int:
    from prunelab.prune.layer_scores import importance_spec, layer_importance, parse_metrics
    from prunelab.report.importance import check_output, read_sweep, sweep_correlations, write_importance

    metrics = parse_metrics(args.metric)
    calibration = {"source": args.calibration, "samples": args.samples, "seqlen": args.seqlen}
    importance_spec(calibration)  # bad values fail before the model loads
    check_output_folder(args.out)
    check_output(args.out, args.overwrite)
    sweep = read_sweep(args.sweep) if args.sweep else None
    loaded = load_from(args)
    with console.status(f"scoring layers by {', '.join(metrics)}"):
        result = layer_importance(loaded, metrics, n=args.n, calibration=calibration, seed=args.seed,
                                  last_token=args.last_token)
    correlations = sweep_correlations(result.scores, sweep) if sweep is not None else None
    facts = {"model": args.model, "dtype": loaded.dtype_name, "device": str(loaded.device), "sweep": args.sweep}
    files = write_importance(result, args.out, correlations=correlations, facts=facts, overwrite=args.overwrite,
                             title=f"Layer importance: {args.model}")
    out.print(importance_table(result))
    if correlations is not None:
        out.print(correlation_table(correlations))
    console.print(f"wrote {', '.join(files)} in {args.out}", highlight=False)
    return 0


def importance_table(result) -> Table:
    table = Table(title="layer importance (rank 1 = drop first)")
    table.add_column("layer", justify="right")
    for metric in result.scores:
        table.add_column(f"{metric} score", justify="right")
        table.add_column("rank", justify="right")
    ranks = {m: {layer: r + 1 for r, layer in enumerate(order)} for m, order in result.summary()["order"].items()}
    for layer in range(len(next(iter(result.scores.values())).scores)):
        cells = []
        for metric, scores in result.scores.items():
            cells += [f"{scores.scores[layer]:.4g}", str(ranks[metric][layer])]
        table.add_row(str(layer), *cells)
    best = result.best_block()
    if best:
        table.caption = f"best block of {best['n']} by angular distance: layers {best['layers'][0]}-{best['layers'][-1]}"
    return table


def correlation_table(correlations) -> Table:
    table = Table(title="Spearman rank correlation with the measured harm of removing each layer")
    for column in ("metric", "task", "task metric", "layers", "spearman"):
        table.add_column(column, justify="right" if column in {"layers", "spearman"} else "left")
    for row in correlations.iter_rows(named=True):
        rho = "—" if row["spearman"] is None else f"{row['spearman']:+.3f}"
        table.add_row(row["importance_metric"], row["task"], row["task_metric"], str(row["layers"]), rho)
    return table


# ---------------------------------------------------------------------- bench-model
def _add_bench_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder (e.g. a `prunelab prune` output), .gguf file or Hub id")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--prompt-lengths", default="128,512", help="prefill prompt lengths in tokens (batch 1)")
    parser.add_argument("--batch", default="1,8", help="decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    parser.add_argument("--semi-structured", action="store_true",
                        help="CUDA only: run 2:4-pruned Linear weights on PyTorch's semi-structured sparse kernels")
    parser.add_argument("--out", default="bench-model.json", help="JSON file for the results")
    add_trust_arguments(parser)


@command("bench-model", "measure a model's size, peak memory, prefill and decode throughput", _add_bench_model)
def run_bench_model(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from prunelab.model.bench import bench_model, parse_int_list

    lengths = parse_int_list(args.prompt_lengths, "--prompt-lengths")
    batches = parse_int_list(args.batch, "--batch")
    check_output_file(args.out)
    with console.status(f"benchmarking {args.model}"):
        result = bench_model(args.model, device=args.device, dtype=args.dtype, prompt_lengths=lengths,
                             batches=batches, new_tokens=args.new_tokens, repeats=args.repeats,
                             semi_structured=args.semi_structured, trust_remote_code=args.trust_remote_code,
                             allow_pickle=args.allow_pickle)
    out.print(bench_table(result))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda staging: staging.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    console.print(f"wrote {path}", highlight=False)
    return 0


def bench_table(result: dict) -> Table:
    table = Table(title=f"{result['model']} ({result['dtype']}, {result['device']}"
                        + (f", {result['threads']} threads)" if result.get("threads") else ")"))
    table.add_column("what")
    table.add_column("value", justify="right")
    mib = 1024 * 1024
    table.add_row("decoder layers", str(result["decoder_layers"]))
    table.add_row("parameters", f"{result['parameters']:,}")
    if result.get("weights_file_bytes") is not None:
        table.add_row("weight files", f"{result['weights_file_bytes'] / mib:,.1f} MiB")
    table.add_row("peak memory", f"{result['peak_memory_bytes'] / mib:,.1f} MiB ({result['peak_memory_kind']})")
    for row in result["prefill"]:
        table.add_row(f"prefill {row['prompt_length']} tokens", f"{row['tokens_per_s']:,.1f} tok/s")
    for row in result["decode"]:
        table.add_row(f"decode batch {row['batch']} ({row['new_tokens']} steps)", f"{row['tokens_per_s']:,.1f} tok/s")
    if result.get("semi_structured"):
        table.add_row("2:4 sparse Linears", str(result["semi_structured"]["converted"]))
    table.caption = f"median of {result['repeats']} runs after {result['warmup']} warm-up"
    return table


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunelab", description="Prune LLMs and measure what it costs.")
    parser.add_argument("--version", action="version", version=f"prunelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error (or PRUNELAB_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand: the one place where an expected failure becomes one line and exit 2.

    Expected failures are the user's input (``PrunelabError``, which readers raise naming the file)
    and the OS refusing a read or write (``OSError``: disk full, permission, a parent that is a
    file). Anything else is a bug and keeps its traceback; ``--debug`` or ``PRUNELAB_DEBUG=1``
    shows the full traceback of the expected ones too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PRUNELAB_DEBUG", "") not in {"", "0"}
    args = build_parser().parse_args([a for a in argv if a != "--debug"])  # accepted after any subcommand
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        _quiet_transformers()
    previous = _exit_on_sigterm()
    try:
        return args.handler(args)
    except (PrunelabError, OSError) as exc:
        if debug:
            raise
        console.print(f"[red]error:[/red] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM ends the command as Ctrl-C does, through every ``finally`` (staging folders are removed,
    finished chunks kept), with status 143; returns the handler it replaced (None: not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return previous


def one_line(exc: BaseException) -> str:
    """The message of an expected failure on one line; an ``OSError`` names its file."""
    if isinstance(exc, OSError):
        names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
        text = f"{' -> '.join(names)}: {describe(exc)}" if names else describe(exc)
    else:
        text = str(exc)
    return " ".join(text.split())


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # offline retries are summarised by our one-line error
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())


