"""The run driver: ``run_study`` identifies a study's results, reuses a finished run of them or
hands the pending chunks to an executor, and writes the run's artifacts.

The run's identity (``prunelab.runner.identity``), the session that loads, prunes and evaluates
(``prunelab.runner.session``) and where its chunks run (``prunelab.runner.executors``) each have
their own module; this one imports them and none of them imports it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from prunelab.evaluate.run import PreparedTask
from prunelab.model.bench import bench_rows
from prunelab.prune.recovery import check_disjoint
from prunelab.readers import read_json
from prunelab.registry import default_registry
from prunelab.report import artifacts
from prunelab.runner.executors import Executor, LocalExecutor
from prunelab.runner.identity import finished_run, identify, run_of_other_code
from prunelab.runner.session import Reporter, Session, prepare_study_tasks
from prunelab.runner.studyfile import WORK, Study, common_task_options
from prunelab.runner.workfolder import Plan, WorkFolder


def decoding_settings(study: Study) -> dict[str, Any]:
    """How text was produced and prompts built: greedy decoding, budgets, few-shot counts, templates."""
    evaluation = study.settings["evaluation"]
    return {"decoding": "greedy (argmax, no sampling)", "chat_template": evaluation["chat_template"],
            "enable_thinking": evaluation["enable_thinking"], "batch_tokens": evaluation["batch_tokens"],
            "tasks": {t: {k: v for k, v in options.items() if k in common_task_options(default_registry())}
                      for t, options in evaluation["tasks"].items()}}


def declared_metrics(tasks: list[PreparedTask], tolerances: Mapping[tuple[str, str], float] | None = None
                     ) -> list[dict[str, Any]]:
    """Each task's declared metrics as the manifest stores them (the report reads them back), with
    the study's own tolerances (``[tolerance]``) in place of the declared ones."""
    tolerances = tolerances or {}
    declared = [{"task": t.evaluator.name, **dataclasses.asdict(m)} for t in tasks for m in t.evaluator.metrics]
    return [{**m, "tolerance": tolerances.get((m["task"], m["name"]), m["tolerance"])} for m in declared]


def run_study(study: Study, out: str | os.PathLike = "artifacts", *, rerun: bool = False,
              reporter: Reporter | None = None, layer_sweep: bool = True, executor: Executor | None = None) -> Path:
    """Run (or resume) every variant x task pair and write the run's artifacts; returns the run folder.

    ``layer_sweep``: when the study removes single layers, score them (and the dense model) through
    one ``LayerSweep`` per chunk instead of one pruned model each -- the same per-item results
    (to float rounding), about half the compute. Off only to measure or debug that.
    ``executor``: where the chunks are evaluated (default: this process; see ``prunelab.runner.executors``).
    """
    reporter = reporter or Reporter()
    executor = executor or LocalExecutor()
    started = time.perf_counter()
    tasks = prepare_study_tasks(study)
    if study.recovery and isinstance(study.recovery["options"].get("data"), str):
        reporter.message(f"healing data: {check_disjoint(study.recovery['options']['data'], tasks)}")
    identity = identify(study, tasks)
    config, digest = identity.config(), identity.digest
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
        state = Session(study, tasks, work, reporter, layer_sweep)
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
            "metrics": declared_metrics(tasks, study.tolerances), "decoding": decoding_settings(study), "machine": artifacts.machine(),
        }
        run = artifacts.write_run(out, study.name, items, manifest, bench=collect_bench(work, plan))
    shutil.rmtree(work.root, ignore_errors=True)
    return run


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
    frames = [work.read_chunk(work.chunk(chunk)) for chunk in plan.every_chunk()]
    return pl.concat(frames, how="diagonal_relaxed")


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
