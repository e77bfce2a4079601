"""Studies on Ray: the smoke study locally, and on a local Ray instance with 1 and 2 workers.

Every configuration runs the whole study from scratch (model load, pruning, evaluation, artifacts)
with one torch thread per worker, side by side in one process, and the per-item results of every
Ray run are checked against the local run's. Prints one row per configuration and writes
``benchmarks/results/ray_scaling.json``:

    OMP_NUM_THREADS=1 python benchmarks/bench_ray.py [--study studies/smoke.toml] [--order ray2,ray1,local] [--quick]

``--quick``: the smoke study's model and 7 variants, on smaller subsets in finer chunks (GSM8K: 4
problems, 32 new tokens; WikiText-2: 8 windows of 256 tokens; no MMLU; 2 items a chunk) -- what
fits a shared 2-core machine several times over.

Throughput is evaluated items (MMLU questions, GSM8K problems, WikiText windows, per variant) per
second of wall time. ``chunk_s`` sums the seconds the chunks took inside the workers; ``prune_s``
the pruning; what the wall time has beyond them is start-up (Ray, actors, model loads) and the
driver's scheduling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import torch

from prunelab.runner.executors import make_executor
from prunelab.runner.run import run_study
from prunelab.runner.studyfile import ExecutorSettings, Study, load_study
from prunelab.runner.workfolder import WorkFolder

ROOT = Path(__file__).resolve().parents[1]


def run_once(study: Study, out: Path, workers: int | None) -> dict:
    executor = None if workers is None else make_executor(ExecutorSettings(kind="ray", workers=workers))
    load = os.getloadavg()[0]
    started, epoch = time.perf_counter(), time.time()
    with kept_log() as log:
        folder = run_study(study, out, executor=executor)
    wall = time.perf_counter() - started
    manifest = json.loads((folder / "manifest.json").read_text())
    timings = manifest["timings"]
    items = pl.read_parquet(folder / "items.parquet")
    evaluated = items.select("variant", "task", "item_id").unique().height
    return {"config": "local" if workers is None else f"ray{workers}", "wall_s": round(wall, 2),
            "items": evaluated, "rows": items.height, "items_per_s": round(evaluated / wall, 3),
            "chunk_s": timings["evaluate_total_s"], "prune_s": round(sum(timings["prune_s"].values()), 2),
            "load_s": timings["load_s"], "sessions": len(timings["sessions"]),
            "loadavg_1min_before": round(load, 2), "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "variant_s": variant_seconds(timings), "timeline": timeline(log, epoch, wall), "folder": str(folder)}


@contextlib.contextmanager
def kept_log() -> Iterator[list[dict]]:
    """The work folder's event log, read just before the finished run removes the folder."""
    events: list[dict] = []
    remove = shutil.rmtree

    def read_then_remove(path, *args, **kwargs):
        events.extend(WorkFolder(Path(path)).events())
        remove(path, *args, **kwargs)

    shutil.rmtree = read_then_remove
    try:
        yield events
    finally:
        shutil.rmtree = remove


def timeline(events: list[dict], epoch: float, wall: float) -> list[dict]:
    """Per process (driver or worker): when its first timed step began and its last ended (seconds
    from the run's start), and the seconds it spent loading, pruning and evaluating in between --
    where a run on several workers loses time: late starts, gaps, and early ends before the last."""
    by_session: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("event") in ("load", "prune", "chunk") and "seconds" in e:
            by_session.setdefault(e["session"], []).append((e["time"] - e["seconds"] - epoch, e["time"] - epoch))
    rows = []
    for spans in by_session.values():
        first, last = min(b for b, _ in spans), max(e for _, e in spans)
        busy = sum(e - b for b, e in spans)
        rows.append({"first_s": round(first, 1), "last_s": round(last, 1), "busy_s": round(busy, 1),
                     "gaps_s": round(last - first - busy, 1), "wall_s": round(wall, 1)})
    return sorted(rows, key=lambda r: r["first_s"])


def variant_seconds(timings: dict) -> dict[str, float]:
    """Prune + evaluation seconds of each variant (a swept chunk's time is carried by the dense model)."""
    return {v: round(timings["prune_s"].get(v, 0.0) + sum(tasks.values()), 2)
            for v, tasks in timings["evaluate_s"].items()}


def makespan(costs: list[float], workers: int) -> float:
    """Wall time of units of ``costs`` handed in order to the first free of ``workers``."""
    free = [0.0] * workers
    for cost in costs:
        free[free.index(min(free))] += cost
    return max(free)


def ray_call_ms(calls: int = 200) -> float:
    """Round trip of an actor call that does nothing: the driver's cost per unit."""
    import ray

    @ray.remote(num_cpus=1)
    class Echo:
        def ping(self, unit):
            return unit

    echo = Echo.remote()
    ray.get(echo.ping.remote(0))
    started = time.perf_counter()
    for i in range(calls):
        ray.get(echo.ping.remote(i))
    ray.kill(echo)
    return round((time.perf_counter() - started) / calls * 1000, 3)


QUICK = {"tasks": 'tasks = ["gsm8k", "wikitext"]', "[evaluation.mmlu]": "[evaluation.unused]",
         "limit = 1           # per subject: 57 questions\n": "", "num_fewshot = 0     # 5-shot": "# 5-shot",
         "limit = 8\nnum_fewshot = 5\nmax_new_tokens = 64": "limit = 4\nnum_fewshot = 5\nmax_new_tokens = 32",
         "limit = 12          # windows": "limit = 8          # windows"}


def quick_study(path: Path) -> Path:
    """The smoke study on smaller subsets, 2 items a chunk, next to the original (same relative paths)."""
    text = path.read_text(encoding="utf-8")
    text = text.replace('tasks = ["mmlu", "gsm8k", "wikitext"]', QUICK["tasks"])
    for old, new in list(QUICK.items())[1:]:
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace("[evaluation.unused]\n", "").replace("[evaluation]\n", "[evaluation]\nchunk_items = 2\n", 1)
    quick = path.with_name(f"{path.stem}-quick.toml")  # removed once loaded
    quick.write_text(text, encoding="utf-8")
    return quick


def same_items(a: str, b: str) -> bool:
    cols = ["variant", "task", "metric", "item_id", "correct", "value", "nll_sum", "tokens"]  # value: KL, top-1
    left = pl.read_parquet(Path(a) / "items.parquet").sort(cols[:4]).select(cols)
    right = pl.read_parquet(Path(b) / "items.parquet").sort(cols[:4]).select(cols)
    return left.equals(right)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(ROOT / "studies" / "smoke.toml"))
    parser.add_argument("--order", default="ray2,ray1,local", help="configurations, in running order")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_scaling.json"))
    parser.add_argument("--quick", action="store_true", help="smaller subsets, finer chunks (see above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(args.study)
    if args.quick:
        path = quick_study(path)
    try:
        study = load_study(path)
    finally:
        if args.quick:
            path.unlink()
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")  # as the executor's own local instance: no handicap
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as scratch:
        for config in args.order.split(","):
            workers = None if config == "local" else int(config.removeprefix("ray"))
            row = run_once(study, Path(scratch) / config, workers)
            rows.append(row)
            print(json.dumps(row), flush=True)
        local = next((r for r in rows if r["config"] == "local"), None)
        for row in rows:
            row["identical_to_local"] = same_items(row["folder"], local["folder"]) if local else None
        for row in rows:
            row.pop("folder")
        shutil.rmtree(scratch, ignore_errors=True)
    by = {r["config"]: r for r in rows}
    summary = {"cpu": os.cpu_count(), "torch_threads_per_worker": 1, "study": Path(args.study).name,
               "quick": args.quick, "runs": rows}
    if "ray1" in by and "ray2" in by:
        summary["speedup_2_workers"] = round(by["ray1"]["wall_s"] / by["ray2"]["wall_s"], 3)
    if "ray1" in by and "local" in by:
        summary["ray_overhead_1_worker"] = round(by["ray1"]["wall_s"] / by["local"]["wall_s"] - 1, 3)
    if "ray1" in by:  # the unit choice: whole variants on 2 workers, from the measured per-variant seconds
        costs = list(by["ray1"]["variant_s"].values())
        summary["variant_units_2_workers_s"] = round(makespan(costs, 2), 2)
        summary["ideal_2_workers_s"] = round(sum(costs) / 2, 2)
    summary["ray_call_ms"] = ray_call_ms()
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
