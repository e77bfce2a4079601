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


