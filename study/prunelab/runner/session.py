"""One invocation's session: loads the dense model (only if something is left to compute), prunes
and heals each variant, and evaluates chunks into the work folder.

Every executor drives the same ``Session`` (``prunelab.runner.executors``: this process;
``prunelab.runner.ray_executor``: one per Ray worker), so a chunk is computed the same way wherever
it runs. This module imports no executor: the executors import it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.evaluate.data import DataSource
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.layersweep import LayerSweep
from prunelab.evaluate.reference import ReferenceStore
from prunelab.evaluate.run import PreparedTask, prepare_tasks, run_task
from prunelab.model.adapter import adapt
from prunelab.model.bench import measure, module_parameter_counts, parameter_count, parameter_counts
from prunelab.model.export import RECIPE_FILE, read_recipe, save_pruned
from prunelab.model.loading import LoadedModel, load_model
from prunelab.plugin import Scorer
from prunelab.prune.api import PruneReport, prune
from prunelab.prune.masks import MaskSet, validate_options
from prunelab.prune.recovery import heal, kept_layers, masks_of
from prunelab.readers import atomic_write
from prunelab.records import DENSE
from prunelab.registry import default_registry
from prunelab.report.sizes import variant_size
from prunelab.runner.chunks import Chunk, chunk_ranges, chunk_task, item_rows
from prunelab.runner.studyfile import Study
from prunelab.runner.variants import Variant, expand_variants
from prunelab.runner.workfolder import Plan, WorkFolder

RECIPE_ONLY = {"format", "created", "source", "dtype", "versions"}  # what build_recipe adds to a prune report


class Reporter:
    """What the runner tells its caller (the CLI draws progress bars); every method may be ignored."""

    def message(self, text: str) -> None: ...
    def start(self, total: int, done: int) -> None: ...
    def pair(self, variant: str, task: str, units: int) -> None: ...
    def advance(self, units: int) -> None: ...


def prepare_study_tasks(study: Study) -> list[PreparedTask]:
    """Each task's items as the study selects them (the driver and every Ray worker prepare the same)."""
    data = DataSource.resolve(study.data_dir)
    return [prepare_tasks([name], data, study.subsets[name], study.task_options[name])[0] for name in study.tasks]


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
                                    trust_remote_code=self.study.trust_remote_code,
                                    allow_pickle=self.study.allow_pickle)
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
        variants = expand_variants(self.study, dense.adapter.num_layers)
        check_variants(variants, dense)
        plan = Plan(variants, {name: chunk_ranges(task, engine, size) for name, task in self.tasks.items()},
                    dense.adapter.num_layers)
        self.record_unpruned_sizes(plan, dense)
        self.work.save_plan(plan)
        return plan

    def record_unpruned_sizes(self, plan: Plan, dense: LoadedModel) -> None:
        """Log the size of dense and of every one-layer variant (a layer sweep never builds those:
        each is dense without that layer, so its counts are dense's less the layer's)."""
        counts = parameter_counts(dense.adapter)
        self.work.log(event="size", variant=DENSE, size=variant_size(None, {}, removed_layers=(), counts=counts).to_json())
        for variant in plan.variants:
            if (layer := removed_layer(variant)) is not None:
                size = variant_size(default_registry().strategy(variant.strategy), variant.params, removed_layers=[layer],
                                    counts=counts.without(module_parameter_counts(dense.adapter.layers[layer])),
                                    num_layers=dense.adapter.num_layers)
                self.work.log(event="size", variant=variant.name, size=size.to_json())

    def pending(self, plan: Plan) -> list[Chunk]:
        """The plan's chunks without a trusted file (a damaged one is moved aside and counted as pending);
        tells the reporter how many units the plan has and how many are done."""
        chunks = list(plan.every_chunk())
        pending = [chunk for chunk in chunks if not self.work.finished_chunk(self.work.chunk(chunk))]
        if self.work.damaged:
            self.reporter.message(f"recomputing {len(self.work.damaged)} damaged chunk(s) (moved aside as *.damaged)")
        total = sum(chunk.size for chunk in chunks)
        self.reporter.start(total, total - sum(chunk.size for chunk in pending))
        return pending

    def evaluate(self, plan: Plan) -> None:
        pending = self.pending(plan)
        if pending and self.layer_sweep and any(removed_layer(v) is not None for v in plan.variants):
            swept = [chunk for chunk in pending if self.sweepable(chunk.variant, chunk.task)]
            if swept and LayerSweep.supports(self.load().adapter):
                self.evaluate_sweep(swept)
                pending = [chunk for chunk in pending if chunk not in swept]
        for variant, group in itertools.groupby(pending, key=lambda chunk: chunk.variant):
            chunks = list(group)
            loaded = self.variant_model(variant)
            self.bench(variant, loaded)
            engine = self.engine(loaded)
            for task, task_chunks in itertools.groupby(chunks, key=lambda chunk: chunk.task):
                task_chunks = list(task_chunks)
                self.reporter.pair(variant.name, task, sum(chunk.size for chunk in task_chunks))
                for chunk in task_chunks:
                    self.run_chunk(engine, chunk)
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

    def evaluate_sweep(self, chunks: list[Chunk]) -> None:
        """Single-layer removals (and the dense model) chunk by chunk through one ``LayerSweep``.

        Layers below the removed one compute what the dense model computes, so each chunk is run
        once through the dense model, recording every layer's input, and each variant runs only
        the layers after its removed one. Every variant's rows of a chunk are written when the
        chunk is done: a kill loses that chunk, nothing finished.
        """
        engine = self.engine(self.load())
        self.reporter.message(f"layer sweep: {len({chunk.variant.name for chunk in chunks})} variants share the "
                              "layers below each removed one")
        by_chunk = sorted(chunks, key=lambda chunk: (chunk.task, chunk.index))
        for (task, _), group in itertools.groupby(by_chunk, key=lambda chunk: (chunk.task, chunk.index)):
            group = list(group)
            layers = sorted({layer for chunk in group if (layer := removed_layer(chunk.variant)) is not None})
            sweep = LayerSweep(engine, layers)
            for chunk in group:
                self.reporter.pair(chunk.variant.name, task, chunk.size)
                self.run_chunk(sweep.view(removed_layer(chunk.variant)), chunk, swept=True)

    def variant_model(self, variant: Variant) -> LoadedModel:
        """The dense model itself, or a pruned (and, for a healed twin, healed) copy; dense is never changed.

        A healed twin starts from its unhealed variant's pruned weights, not from a second prune
        (``pruned``); ``dense+<method>`` starts from a copy of the dense model.
        """
        dense = self.load()
        if variant.strategy == DENSE:
            return dense
        start = time.perf_counter()
        loaded, report = self.pruned(variant)
        compact = compact_report(report)
        if variant.recovery:
            self.reporter.message(f"healing: {variant.name}")
            recovery = default_registry().recovery(variant.recovery)
            teacher = dense if recovery.uses_teacher else None
            layer_map = kept_layers(report.get("dropped_layers") or [], dense.adapter.num_layers)
            healed = heal(loaded, variant.recovery, masks=report.masks or MaskSet(), seed=self.study.prune_seed,
                          teacher=teacher,
                          layer_map=layer_map if len(layer_map) == loaded.adapter.num_layers else None,
                          **self.study.recovery["options"])
            compact["recovery"] = compact_report(healed)
        pruned_by = None if variant.pruned_by == DENSE else default_registry().strategy(variant.pruned_by)
        size = variant_size(pruned_by, report.get("options", {}), removed_layers=report.get("removed_layers", ()),
                            healed=bool(variant.recovery), counts=parameter_counts(loaded.adapter),
                            num_layers=dense.adapter.num_layers, report=report)
        self.work.log(event="prune", variant=variant.name, seconds=round(time.perf_counter() - start, 3),
                      report=compact, size=size.to_json())
        return loaded

    def pruned(self, variant: Variant) -> tuple[LoadedModel, PruneReport]:
        """A variant's pruned model and its prune report, pruning each unhealed variant once per run.

        An unhealed variant with a healed twin leaves its pruned model in the work folder
        (``WorkFolder.pruned``: a normal checkpoint with its masks and recipe), and the twin loads it
        from there instead of pruning again -- also in a later session or on another Ray worker;
        whichever of the two runs first prunes. ``dense+<method>`` heals a copy of dense.
        """
        dense = self.load()
        if variant.pruned_by == DENSE:
            model = copy.deepcopy(dense.model)
            return dataclasses.replace(dense, model=model, adapter=adapt(model)), PruneReport(strategy=DENSE)
        base = Variant(variant.unhealed, variant.pruned_by, variant.params)
        folder = self.work.pruned(base)
        if (folder / RECIPE_FILE).is_file():
            self.reporter.message(f"loading the pruned {base.name} (pruned once, for its healed twin)")
            loaded = load_model(str(folder), device=self.study.device, dtype=self.study.dtype)
            recipe = read_recipe(folder) or {}
            report = PruneReport({k: v for k, v in recipe.items() if k not in RECIPE_ONLY})
            report.masks = masks_of(folder, loaded.adapter)[0]
            return dataclasses.replace(loaded, source=dense.source, kind=dense.kind, local_dir=dense.local_dir), report
        self.reporter.message(f"pruning: {base.name}")
        model = copy.deepcopy(dense.model)
        loaded = dataclasses.replace(dense, model=model, adapter=adapt(model))
        report = prune(loaded, base.strategy, seed=self.study.prune_seed, calibration=self.study.calibration,
                       **base.params)
        loaded = dataclasses.replace(loaded, adapter=adapt(model))  # a structural strategy may replace modules
        if self.study.recovery and base.strategy in self.study.recovery["strategies"]:  # it has a healed twin
            save_pruned(loaded, folder, report, overwrite=True)
        return loaded, report

    def run_chunk(self, scorer: Scorer, chunk: Chunk, swept: bool = False) -> None:
        """Evaluate one chunk through ``scorer`` and write its rows (and log how long it took)."""
        begun = time.perf_counter()
        task = self.tasks[chunk.task]
        reference = (ReferenceStore(self.work.reference(chunk.task, chunk.index),
                                    is_dense=chunk.variant.strategy == DENSE)
                     if task.evaluator.compares_with_dense else None)
        result = run_task(scorer, chunk_task(task, chunk.start, chunk.stop), self.reporter.advance, reference)
        self.work.write_chunk(self.work.chunk(chunk), item_rows(chunk.variant, chunk.task, result,
                                                                task.evaluator.metrics))
        self.work.log(event="chunk", variant=chunk.variant.name, task=chunk.task, chunk=chunk.index,
                      items=chunk.size, seconds=round(time.perf_counter() - begun, 3), swept=swept)


def check_variants(variants: list[Variant], dense: LoadedModel) -> None:
    """Every variant's options against the loaded model (its strategy's ``check_model``), before any is pruned."""
    registry = default_registry()
    for variant in variants:
        if variant.pruned_by == DENSE:  # dense, or the healed-dense control: nothing pruned
            continue
        strategy = registry.strategy(variant.pruned_by)
        try:
            strategy.check_for_model(dense.adapter, validate_options(strategy, variant.params))
        except PrunelabError as exc:
            raise PrunelabError(f"variant {variant.name}: {exc}") from None


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


def compact_report(report: dict[str, Any]) -> dict[str, Any]:
    """A prune report without its per-tensor and per-layer detail (the manifest keeps the totals)."""
    compact = dict(report)
    if isinstance(compact.get("sparsity"), dict):
        compact["sparsity"] = {"total": compact["sparsity"].get("total")}
    return json.loads(json.dumps(compact, default=str))
