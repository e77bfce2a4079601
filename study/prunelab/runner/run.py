"""The run driver: ``run_study`` and the session that loads, prunes and evaluates.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl

from prunelab.evaluate.data import DataSource
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.layersweep import LayerSweep
from prunelab.evaluate.reference import ReferenceStore
from prunelab.evaluate.run import PreparedTask, prepare_tasks, run_task
from prunelab.model.adapter import adapt
from prunelab.model.bench import bench_rows, measure, parameter_count
from prunelab.model.loading import LoadedModel, load_model, source_fingerprint
from prunelab.prune.api import prune
from prunelab.prune.masks import MaskSet
from prunelab.prune.recovery import check_disjoint, heal
from prunelab.readers import atomic_write, read_json
from prunelab.registry import default_registry
from prunelab.report import artifacts
from prunelab.report.stats import DENSE
from prunelab.runner.chunks import chunk_ranges, chunk_task, item_rows
from prunelab.runner.executors import Executor, LocalExecutor
from prunelab.runner.studyfile import WORK, Study, common_task_options
from prunelab.runner.variants import Variant, expand_variants
from prunelab.runner.workfolder import Plan, WorkFolder, config_without_code


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
    wanted = artifacts.config_hash(config_without_code(config))
    for manifest_path in sorted(study_dir.glob("*/manifest.json"), reverse=True):
        try:
            stored = json.loads(manifest_path.read_text(encoding="utf-8")).get("config") or {}
        except (OSError, ValueError):
            continue
        if artifacts.config_hash(config_without_code(stored)) == wanted:
            return manifest_path.parent, stored.get("code") or {}
    return None


def decoding_settings(study: Study) -> dict[str, Any]:
    """How text was produced and prompts built: greedy decoding, budgets, few-shot counts, templates."""
    evaluation = study.settings["evaluation"]
    return {"decoding": "greedy (argmax, no sampling)", "chat_template": evaluation["chat_template"],
            "enable_thinking": evaluation["enable_thinking"], "batch_tokens": evaluation["batch_tokens"],
            "tasks": {t: {k: v for k, v in options.items() if k in common_task_options(default_registry())}
                      for t, options in evaluation["tasks"].items()}}


def declared_metrics(tasks: list[PreparedTask]) -> list[dict[str, Any]]:
    """Each task's declared metrics as the manifest stores them (the report reads them back)."""
    return [{"task": t.evaluator.name, **dataclasses.asdict(m)} for t in tasks for m in t.evaluator.metrics]


def declared_answers(tasks: list[PreparedTask]) -> dict[str, dict[str, Any]]:
    """Each multiple-choice task's answer fields (``Evaluator.answers``) as the manifest stores them."""
    return {t.evaluator.name: dataclasses.asdict(t.evaluator.answers) for t in tasks if t.evaluator.answers}


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
    ``executor``: where the chunks are evaluated (default: this process; see ``prunelab.runner.executors``).
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
        state = Session(study, tasks, work, reporter, layer_sweep)
        plan = work.load_plan() or executor.plan(state)
        executor.evaluate(state, plan)
        items = collect_items(work, plan)
        manifest = {
            "config_hash": digest, "config": config, "study_file": study.text, "model": model_label(study.model),
            "model_path": study.model,
            "model_hash": config["model_hash"], "model_revision": executor.model_revision(state),
            "model_layers": plan.num_layers,
            "device": config["device"], "dtype": config["dtype"],
            "timings": timings(work.events(), time.perf_counter() - started),
            "variants": prune_reports(work.events()),
            "metrics": declared_metrics(tasks), "answers": declared_answers(tasks), "decoding": decoding_settings(study), "machine": artifacts.machine(),
        }
        run = artifacts.write_run(out, study.name, items, manifest, bench=collect_bench(work, plan))
    shutil.rmtree(work.root, ignore_errors=True)
    return run


class Session:
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
                    {name: chunk_ranges(task, engine, size) for name, task in self.tasks.items()},
                    dense.adapter.num_layers)
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
        reference = (ReferenceStore(self.work.reference(task, index), is_dense=variant.strategy == DENSE)
                     if self.tasks[task].evaluator.compares_with_dense else None)
        result = run_task(engine, chunk_task(self.tasks[task], start, stop), self.reporter.advance, reference)
        path = self.work.chunk(variant, task, index)
        self.work.write_chunk(path, item_rows(variant, task, result, self.tasks[task].evaluator.metrics))
        self.work.log(event="chunk", variant=variant.name, task=task, chunk=index, items=stop - start,
                      seconds=round(time.perf_counter() - begun, 3), swept=swept)


def removed_layer(variant: Variant) -> int | None:
    """The one layer a variant removes, as its strategy declares it (for this model, when the plan
    recorded it: ``Variant.layers``); None for any other variant."""
    if variant.recovery:  # a healed twin is trained after the removal: not the sweep's model
        return None
    if variant.layers is not None:
        return variant.layers[0] if len(variant.layers) == 1 else None
    return default_registry().removed_layer(variant.strategy, variant.params)


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
