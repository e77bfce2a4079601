"""The ``prunelab`` command: a thin argparse + rich layer over the Python API.

Each subcommand is one ``add_*`` function (its arguments) and one ``run_*`` function (its work),
registered in ``COMMANDS``. A ``PrunelabError`` becomes one red line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .errors import PrunelabError

console = Console(stderr=True)
out = Console()

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
    from .modeling import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, local HF folder, or .gguf file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", help="auto (CUDA bf16; CPU fp32 unless native bf16), float32, bfloat16, float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off by default)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="mmlu,gsm8k,wikitext", help="comma-separated task names (see `prunelab plugins`)")
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
    from .data import Subset

    return Subset(fraction=args.fraction, sample=args.sample, limit=args.limit, seed=args.seed)


def engine_for(loaded, args: argparse.Namespace):
    from .engine import Engine

    return Engine(loaded.model, loaded.tokenizer, loaded.adapter, batch_tokens=args.batch_tokens,
                  chat_template=args.chat_template, enable_thinking=args.enable_thinking)


def load_from(args: argparse.Namespace):
    from .modeling import load_model

    with console.status(f"loading {args.model}"):
        return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


# ---------------------------------------------------------------------- eval
def _add_eval(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_eval_arguments(parser)
    parser.add_argument("--out", default=None, help="folder for results.json and items.parquet")


@command("eval", "evaluate a model (MMLU, GSM8K, WikiText-2 perplexity)", _add_eval)
def run_eval(args: argparse.Namespace) -> int:
    from .data import DataSource
    from .evaluate import evaluate, parse_tasks, prepare_tasks, write_outputs

    subset = subset_from(args)
    tasks = prepare_tasks(parse_tasks(args.tasks), DataSource.resolve(args.data_dir), subset, common_task_options(args))
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
        console.print(f"wrote {path / 'results.json'} and {path / 'items.parquet'}")
    return 0


def _progress_total(task) -> int | None:
    """Units the evaluator reports progress in: items, or windows for a single-document task."""
    if task.evaluator.name == "wikitext":
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
@command("plugins", "list discovered strategies and evaluators", lambda parser: None)
def run_plugins(args: argparse.Namespace) -> int:
    from .registry import default_registry

    registry = default_registry()
    table = Table(title="prunelab plugins")
    for column in ("kind", "name", "package", "version", "description"):
        table.add_column(column)
    for name, (strategy, info) in sorted(registry.strategies.items()):
        table.add_row("strategy", name, info.package, info.version, strategy.description)
    for name, (evaluator, info) in sorted(registry.evaluators.items()):
        table.add_row("evaluator", name, info.package, info.version, evaluator.description)
    out.print(table)
    failed = [p for p in registry.plugins if p.error]
    for plugin in failed:
        console.print(f"[red]plugin '{plugin.name}' ({plugin.module}, {plugin.package} {plugin.version}) failed to load: {plugin.error}")
    return 0


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


def strategy_options_from(args: argparse.Namespace) -> dict[str, str]:
    """The --layers/--sparsity/--pattern shortcuts and every --option KEY=VALUE, as one mapping."""
    options: dict[str, str] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise PrunelabError(f"--option {item!r}: expected KEY=VALUE")
        if key in options:
            raise PrunelabError(f"option '{key}' given twice")
        options[key] = value.strip()
    for key in ("layers", "sparsity", "pattern"):
        value = getattr(args, key)
        if value is not None:
            if key in options:
                raise PrunelabError(f"option '{key}' given twice (--{key} and --option {key}=...)")
            options[key] = value
    return options


@command("prune", "prune a model with a strategy and save it as a normal checkpoint", _add_prune)
def run_prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import save_pruned
    from .pruning import prune, validate_options
    from .registry import default_registry

    options = strategy_options_from(args)
    strategy = default_registry().strategy(args.method)
    validate_options(strategy, options)  # fail before loading the model
    calibration = calibration_from(args, strategy)
    out_dir = Path(args.out)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise PrunelabError(f"output folder {out_dir} is not empty (choose another --out, or --overwrite)")
    loaded = load_from(args)
    with console.status(f"pruning with {args.method}"):
        report = prune(loaded, args.method, seed=args.seed, calibration=calibration, **options)
    with console.status(f"saving to {out_dir}"):
        path = save_pruned(loaded, out_dir, report, overwrite=args.overwrite, save_masks=not args.no_masks)
    out.print(prune_table(report, path))
    return 0


def calibration_from(args: argparse.Namespace, strategy) -> dict | None:
    """The --calibration* arguments as a calibration dict (None: the strategy's defaults)."""
    values = {"source": args.calibration, "samples": args.calibration_samples, "seqlen": args.calibration_seqlen}
    given = {key: value for key, value in values.items() if value is not None}
    if not given:
        return None
    if not strategy.needs_calibration:
        raise PrunelabError(f"strategy '{strategy.name}' uses no calibration data (drop the --calibration* arguments)")
    from .calibration import CalibrationSpec

    CalibrationSpec.from_mapping(given)  # checks the values before the model is loaded
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
    table.add_row("parameters", f"{report['parameters']['before']:,} -> {report['parameters']['after']:,}")
    if "sparsity" in report:
        total = report["sparsity"]["total"]
        table.add_row("achieved sparsity of targets", f"{total['sparsity_pct']:.2f}% ({total['zeros']:,} / {total['params']:,})")
    return table


# ---------------------------------------------------------------------- study and index
def _add_study(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="study_action", required=True)
    run = actions.add_parser("run", help="run (or resume) every variant x task pair of a study file",
                             description="Run every variant x task pair of a study file; rerunning resumes.")
    run.add_argument("file", help="study file (TOML), e.g. studies/smoke.toml")
    run.add_argument("--out", default="artifacts", help="artifacts root (default: artifacts)")
    run.add_argument("--data-dir", default=None, help="local data folder, overrides the study file's data_dir")
    run.add_argument("--rerun", action="store_true", help="compute a configuration that already finished again")


class StudyProgress:
    """The runner's reporter: an overall bar with ETA and one bar per pair (lines when not a terminal)."""

    def __init__(self, bars: Progress) -> None:
        self.bars, self.overall, self.current = bars, None, None

    def message(self, text: str) -> None:
        console.print(text, highlight=False)

    def start(self, total: int, done: int) -> None:
        self.overall = self.bars.add_task("study", total=total, completed=done)
        if done:
            console.print(f"resuming: {done} of {total} items already evaluated", highlight=False)

    def pair(self, variant: str, task: str, units: int) -> None:
        if self.current is not None:
            self.bars.remove_task(self.current)
        self.current = self.bars.add_task(f"{variant} · {task}", total=units)
        if not console.is_terminal:
            console.print(f"evaluating {variant} on {task} ({units} items)", highlight=False)

    def advance(self, units: int) -> None:
        for bar in (self.overall, self.current):
            if bar is not None:
                self.bars.advance(bar, units)


@command("study", "run a study file: every strategy x task pair, resumable, into versioned artifacts", _add_study)
def run_study_command(args: argparse.Namespace) -> int:
    from .runner import load_study, run_study

    study = load_study(args.file, data_dir=args.data_dir)  # validated before any model is loaded
    with progress_bars() as bars:
        run = run_study(study, args.out, rerun=args.rerun, reporter=StudyProgress(bars))
    out.print(f"run: {run}\nreport: {run / 'report.html'}\nindex: {run.parent.parent / 'index.html'}", highlight=False)
    return 0


def _add_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="artifacts", help="artifacts root (default: artifacts)")


@command("index", "rebuild the artifacts index.html from every run's manifest", _add_index)
def run_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .artifacts import build_index

    if not Path(args.root).is_dir():
        raise PrunelabError(f"artifacts folder not found: {args.root}")
    out.print(f"wrote {build_index(args.root)}", highlight=False)
    return 0


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunelab", description="Prune LLMs and measure what it costs.")
    parser.add_argument("--version", action="version", version=f"prunelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.environ.get("PRUNELAB_DEBUG"):
        warnings.filterwarnings("ignore", category=FutureWarning)
        _quiet_transformers()
    try:
        return args.handler(args)
    except PrunelabError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())


