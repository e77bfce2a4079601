"""A study on a Ray cluster: actors that each keep the dense model and evaluate chunks of it.

Each worker is a Ray actor with a resource request (``gpus_per_worker`` GPUs on CUDA, else
``cpus_per_worker`` CPUs and as many torch threads). It loads the dense model once, keeps it, and
keeps the pruned copy of the variant it evaluated last. The driver (``prunelab study run``) hands
out **units** one at a time to whichever worker is free:

* a *chunk* unit: one (variant, task, chunk) -- the runner's chunk, written as the same atomic
  parquet file the local path writes;
* a *sweep* unit: one (task, chunk) for the dense model and every single-layer removal at once,
  through one ``LayerSweep`` as the local path does it (the layer sweep is kept, per chunk);
* a *bench* unit: ``[bench]`` of a variant none of whose chunks needed its pruned model;
* a *prune* unit: a worker with nothing ready to evaluate prunes (and benches) a variant whose
  chunks are still waiting, so it holds that variant when they become ready.

Order: a chunk of a task that compares variants with the dense model (``compares_with_dense``: KL
to dense) waits for dense's chunk of the same task and index, whose reference it reads -- that one
chunk, not the whole dense evaluation (which writes the dense output head into the same shared
folder before its reference, for variants whose head differs). Every other unit is ready at once. Variants that take long
to prepare (healed, then calibrated ones) are queued first, so that their prune does not start last.

Why chunks, with variant affinity, and not whole variants: a free worker is given a chunk of the
variant it already holds, else one of a variant no other worker holds, so a variant is pruned about
once per worker that helps with it -- and the last variants are shared out chunk by chunk instead
of leaving workers idle (7 variants over 2 workers is 4:3 at variant granularity). A worker joins a
variant another one holds only while pruning it (as measured) costs less than the variant's queued
chunks (as measured): then both finish sooner; otherwise it waits for other work. See
BENCHMARKS.md "Studies on Ray" for the measured costs behind this choice.

Faults: the driver, not Ray, retries units. A lost worker (its process or its node) fails its one
unit in flight; the unit goes back to the front of the queue for the first free worker, and Ray
restarts the actor (``max_restarts``) wherever the resources are. While Ray restarts it, the driver
asks it again every ``REPROBE_S`` (Ray answers "temporarily unavailable" until it is back) for up
to ``wait_s``; only an actor Ray reports dead for good leaves the pool. A unit that was lost with
its worker ``UNIT_LOSS_LIMIT`` times stops the run with one line naming it: it kills its workers,
and evaluating it again would only kill more. Finished chunks are files in the shared work folder,
so a killed driver resumes from them when started again (its actors die with it).
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from prunelab.errors import PrunelabError
from prunelab.evaluate.engine import Engine
from prunelab.evaluate.layersweep import LayerSweep
from prunelab.model.loading import choose_device
from prunelab.records import DENSE
from prunelab.registry import default_registry
from prunelab.runner.chunks import Chunk
from prunelab.runner.session import Reporter, Session, model_revision, prepare_study_tasks, removed_layer
from prunelab.runner.studyfile import ExecutorSettings, Study
from prunelab.runner.variants import Variant
from prunelab.runner.workfolder import Plan, WorkFolder

CONNECT_TIMEOUT_S = 5.0
#: a unit whose worker process dies this many times stops the run, naming it (it kills workers: out of
#: memory, a crash); any other lost unit is evaluated again by a restarted or another worker
UNIT_LOSS_LIMIT = 3
#: how long the driver waits before asking a worker Ray is restarting again whether it is up
REPROBE_S = 0.5


@dataclass(frozen=True)
class Unit:
    """What one worker call evaluates; ``variant`` is the model it needs (None: the dense model)."""

    kind: str  # "chunk", "sweep", "bench" or "prune"
    chunks: tuple[Chunk, ...]
    variant: Variant | None
    #: (task, chunk index) of the dense chunks whose reference this unit reads: it runs after them
    waits_for: frozenset[tuple[str, int]] = frozenset()

    @property
    def items(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    @property
    def provides(self) -> set[tuple[str, int]]:
        """The dense chunks this unit evaluates (and so the references it writes)."""
        return {(chunk.task, chunk.index) for chunk in self.chunks if chunk.variant.strategy == DENSE}

    def describe(self) -> str:
        if self.kind == "sweep":
            first = self.chunks[0]
            return f"layer sweep of {first.task} chunk {first.index} ({len(self.chunks)} variants)"
        if self.kind in ("bench", "prune"):
            return f"{self.kind} of {self.variant.name}"
        first = self.chunks[0]
        return f"{first.variant.name} {first.task} chunk {first.index}"


@dataclass(frozen=True)
class Done:
    """What a worker reports of a unit: items evaluated, and seconds spent pruning and evaluating."""

    items: int
    prune_s: float
    eval_s: float


# ---------------------------------------------------------------------------------------- the worker
class StudyWorker:
    """One Ray actor: the study's tasks, the dense model (loaded on first use) and the variant it holds."""

    def __init__(self, study: Study, work_root: str, layer_sweep: bool, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        here = str(choose_device(study.device))
        if here != study.settings["device"]:  # the configuration hash names the driver's device
            raise PrunelabError(f"this Ray worker resolves device '{study.device}' to {here}, the driver to "
                                f"{study.settings['device']}; name the device in the study file")
        self.work = WorkFolder(Path(work_root))
        self.session = Session(study, prepare_study_tasks(study), self.work, Reporter(), layer_sweep)
        self.held: tuple[str, Engine] | None = None
        self.work.log(event="worker", pid=os.getpid(), node=ray.util.get_node_ip_address())

    def ready(self) -> int:
        return os.getpid()

    def plan(self) -> Plan:
        return self.session.plan()

    def describe(self) -> dict[str, Any]:
        loaded = self.session.load()
        return {"sweep": LayerSweep.supports(loaded.adapter), "revision": model_revision(loaded)}

    def run(self, unit: Unit) -> Done:
        """Evaluate the unit's chunks that have no file yet (another attempt may have written them)."""
        todo = [chunk for chunk in unit.chunks if not self.work.chunk(chunk).is_file()]
        if unit.kind == "sweep":
            began = time.perf_counter()
            if todo:
                self.session.evaluate_sweep(todo)
            return Done(unit.items, 0.0, time.perf_counter() - began)
        prune_s = self.hold(unit.variant)
        began = time.perf_counter()
        for chunk in todo:
            self.session.run_chunk(self.held[1], chunk)
        return Done(unit.items, prune_s, time.perf_counter() - began)

    def hold(self, variant: Variant) -> float:
        """Hold the variant's engine: prune (and ``[bench]``) it unless held already; the seconds it took."""
        if self.held is not None and self.held[0] == variant.name:
            return 0.0
        began = time.perf_counter()
        self.held = None  # free the previous pruned copy before making the next
        loaded = self.session.variant_model(variant)
        self.session.bench(variant, loaded)
        self.held = (variant.name, self.session.engine(loaded))
        return time.perf_counter() - began


# ---------------------------------------------------------------------------------------- the driver
_RAISED = re.compile(r"^[\w.]*(?:Error|Exception): (.+)$")


def cause_line(exc: Exception) -> str:
    """The message a worker's exception was raised with, from the traceback text Ray wraps it in."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [m[1] for line in lines if (m := _RAISED.match(line))]
    return (raised or lines or [type(exc).__name__])[-1]


def check_reachable(address: str) -> None:
    """``ray://HOST:PORT`` or ``HOST:PORT`` answers a TCP connection, or a one-line error now."""
    if address == "auto":
        return
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise PrunelabError(f"Ray address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise PrunelabError(f"Ray cluster at {address} is not reachable: {exc.strerror or exc}") from None


class RayExecutor:
    """Runs the runner's pending chunks on Ray actors; see the module docstring."""

    def __init__(self, settings: ExecutorSettings) -> None:
        self.settings = settings
        self.revision: str | None = None

    # -- connecting
    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.settings.address or os.environ.get("RAY_ADDRESS")  # else "local": a new instance
        options: dict[str, Any] = {"log_to_driver": bool(os.environ.get("PRUNELAB_DEBUG")),
                                   "include_dashboard": False}
        if address:
            check_reachable(address)
        else:  # a Ray instance on this machine, sized to the workers asked for
            workers = self.settings.workers
            options["num_cpus"] = workers * self.settings.cpus_per_worker if workers else os.cpu_count()
            # Ray starts workers at niceness 15; here they are the study itself, not background work
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            ray.init(address=address or "local", **options)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            raise PrunelabError(f"cannot connect to Ray at {address or 'a new local instance'}: "
                                f"{' '.join(str(exc).split())[:300]}") from None

    # -- the Executor interface
    def plan(self, session: Session) -> Plan:
        self.connect()
        pool = self.pool(session)
        try:
            plan = ray.get(pool.first_ready().plan.remote())
        except BaseException:
            self.close_pool()
            raise
        session.work.save_plan(plan)  # the worker wrote it to the shared folder; this one is the driver's
        return plan

    def evaluate(self, session: Session, plan: Plan) -> None:
        self.connect()
        pending = session.pending(plan)
        pool = self.pool(session)
        try:
            if pending:
                info = ray.get(pool.first_ready().describe.remote())
                self.revision = info["revision"]
                pool.drain(units(session, pending, sweep=session.layer_sweep and info["sweep"]))
            if session.study.bench:
                missing = [v for v in plan.variants if not session.work.bench(v).is_file()]
                pool.drain([Unit("bench", (), v) for v in missing])
        finally:
            self.close_pool()

    def model_revision(self, session: Session) -> str | None:
        return self.revision

    # -- workers
    def pool(self, session: Session) -> WorkerPool:
        if getattr(self, "_pool", None) is None:
            self._pool = WorkerPool(self.settings, session)
        return self._pool

    def close_pool(self) -> None:
        """End the workers (also those still waiting for resources): nothing outlives the run."""
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
            self._pool = None


def units(session: Session, pending: list[Chunk], *, sweep: bool) -> list[Unit]:
    """Sweep units (one per task chunk shared by dense and single-layer removals) first, then chunks,
    the slowest variants to prepare first (``preparation_rank``).

    A chunk unit of a task that ``compares_with_dense`` waits for dense's pending chunk of the same
    task and index (a finished one has left its reference already).
    """
    swept: dict[tuple[str, int], list[Chunk]] = {}
    if sweep and any(removed_layer(chunk.variant) is not None for chunk in pending):
        for chunk in pending:
            if session.sweepable(chunk.variant, chunk.task):
                swept.setdefault((chunk.task, chunk.index), []).append(chunk)
    taken = {id(chunk) for group in swept.values() for chunk in group}
    dense_pending = {(c.task, c.index) for c in pending if c.variant.strategy == DENSE}  # in a sweep unit or not

    def waits_for(chunk: Chunk) -> frozenset[tuple[str, int]]:
        compares = session.tasks[chunk.task].evaluator.compares_with_dense
        needed = compares and chunk.variant.strategy != DENSE and (chunk.task, chunk.index) in dense_pending
        return frozenset({(chunk.task, chunk.index)}) if needed else frozenset()

    chunks = [Unit("chunk", (c,), c.variant, waits_for(c)) for c in pending if id(c) not in taken]
    chunks.sort(key=lambda u: -preparation_rank(u.variant))  # stable: plan order within a rank
    return [Unit("sweep", tuple(group), None) for group in swept.values()] + chunks


def preparation_rank(variant: Variant) -> int:
    """How long a variant takes to prepare before its first chunk, as a rank: 2 healed (pruned,
    then trained), 1 calibrated (forward passes over calibration text first), 0 anything else.

    Chunks are queued by this rank, highest first, and a free worker takes the first variant nobody
    holds: the longest serial steps start early, while other workers evaluate, and the study ends on
    variants that any worker can prepare in a moment and so share (longest-processing-time first).
    Measured on the quick smoke study: Wanda's prune, queued last, left one worker idle at the end.
    """
    if variant.recovery:
        return 2
    return int(default_registry().calibrates(variant.pruned_by, variant.params))


class WorkerPool:
    """The study's actors, and the driver's queue of units: one unit in flight per worker."""

    def __init__(self, settings: ExecutorSettings, session: Session) -> None:
        self.settings, self.session = settings, session
        on_cuda = session.study.settings["device"].startswith("cuda")
        gpus = settings.gpus_per_worker if settings.gpus_per_worker is not None else (1.0 if on_cuda else 0.0)
        self.resources = {"CPU": settings.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        count = settings.workers or self.cluster_capacity(gpus)
        remote = ray.remote(StudyWorker).options(
            num_cpus=settings.cpus_per_worker, num_gpus=gpus, max_restarts=settings.max_restarts,
            max_task_retries=0)  # the driver re-queues a lost unit, to any worker
        threads = None if gpus else settings.cpus_per_worker
        self.workers = [remote.remote(session.study, str(session.work.root), session.layer_sweep, threads)
                        for _ in range(count)]
        self.starting = {w.ready.remote(): w for w in self.workers}  # not yet known to be up
        self.lost_at: dict[Any, float] = {}  # worker -> when it was lost (while Ray restarts it)
        self.unit_losses: dict[str, int] = {}  # unit -> how often a worker died running it
        self.free: list[Any] = []
        self.holds: dict[Any, str | None] = {}  # worker -> the variant it holds
        self.prune_s: dict[str, float] = {}  # variant -> seconds one worker took to prune it
        self.unit_s: dict[str, list[float]] = {}  # variant -> seconds each of its chunk units took
        self.task_s: dict[str, list[float]] = {}  # task -> seconds each chunk unit of it took

    def cluster_capacity(self, gpus: float) -> int:
        total = ray.cluster_resources()
        fits = total.get("GPU", 0) // gpus if gpus else total.get("CPU", 0) // self.settings.cpus_per_worker
        return max(1, int(fits))

    def first_ready(self) -> Any:
        while not self.free:
            self.wait(inflight={})
        return self.free[0]

    def wait(self, inflight: dict) -> list:
        """Wait for a worker to come up or a unit to finish; fail when nothing can run for ``wait_s``."""
        refs = [*inflight, *self.starting]
        if not refs:
            raise PrunelabError(f"every Ray worker was lost, each after {self.settings.max_restarts} restart(s) "
                                "([executor] max_restarts; finished chunks are kept: run the study again to resume)")
        done, _ = ray.wait(refs, num_returns=1, timeout=None if inflight else self.settings.wait_s)
        if not done:
            raise PrunelabError(
                f"no Ray worker started within {self.settings.wait_s:g} s: each needs {self.resources}, the "
                f"cluster has {ray.cluster_resources()} ([executor] wait_s, cpus_per_worker, gpus_per_worker)")
        for ref in done:
            if ref in self.starting:
                worker = self.starting.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError as exc:
                    if exc.actor_init_failed:  # the same on every node: say why, now
                        raise PrunelabError(f"a Ray worker could not start: {cause_line(exc)}") from None
                    self.not_up(worker, exc)
                    continue
                self.lost_at.pop(worker, None)
                self.free.append(worker)
                self.holds.setdefault(worker, None)
        return [ref for ref in done if ref in inflight]

    def not_up(self, worker: Any, exc: RayActorError) -> None:
        """A worker that did not answer: ask again while Ray restarts it (``ActorUnavailableError``, for
        up to ``wait_s``); one that Ray reports dead for good (restarts used up, no node) leaves the pool."""
        lost_at = self.lost_at.setdefault(worker, time.monotonic())
        if isinstance(exc, ActorUnavailableError) and time.monotonic() - lost_at < self.settings.wait_s:
            time.sleep(REPROBE_S)
            self.starting[worker.ready.remote()] = worker
            return
        self.workers.remove(worker)
        self.holds.pop(worker, None)
        self.session.work.log(event="worker_gone", error=" ".join(str(exc).split())[:200])

    def drain(self, queue: list[Unit]) -> None:
        """Evaluate every unit, each once the dense chunks it waits for are done; a unit whose worker
        is lost goes back to the queue. A free worker with nothing ready prunes a waiting variant."""
        queue = list(queue)
        inflight: dict[Any, tuple[Any, Unit]] = {}
        done: set[tuple[str, int]] = set()
        while queue or inflight:
            for worker in list(self.free):
                ready = [i for i, u in enumerate(queue) if u.waits_for <= done]
                position = self.choose(queue, ready, worker, may_wait=bool(inflight)) if ready else None
                unit = queue.pop(position) if position is not None else self.prune_ahead(queue, worker)
                if unit is None:
                    continue
                self.free.remove(worker)
                self.holds[worker] = unit.variant.name if unit.variant is not None else self.holds[worker]
                inflight[worker.run.remote(unit)] = (worker, unit)
            for ref in self.wait(inflight):
                worker, unit = inflight.pop(ref)
                try:
                    result: Done = ray.get(ref)
                except RayActorError as exc:
                    self.lost(worker, unit, queue, exc)
                    continue
                except RayTaskError as exc:  # the evaluation itself failed: it would fail anywhere
                    raise PrunelabError(f"{unit.describe()} failed on a Ray worker: {cause_line(exc)}") from None
                done |= unit.provides
                self.measured(unit, result)
                self.session.reporter.advance(result.items)
                self.free.append(worker)

    def measured(self, unit: Unit, result: Done) -> None:
        if unit.variant is None:
            return
        if result.prune_s:
            self.prune_s[unit.variant.name] = result.prune_s
        if unit.kind == "chunk":
            self.unit_s.setdefault(unit.variant.name, []).append(result.eval_s)
            self.task_s.setdefault(unit.chunks[0].task, []).append(result.eval_s)

    def choose(self, queue: list[Unit], ready: list[int], worker: Any, *, may_wait: bool) -> int | None:
        """The queue position (one of ``ready``) for ``worker``: its held variant, else a sweep, else
        a variant nobody holds, else one another worker holds if sharing it pays; None: better wait
        (only while other units are in flight), else the first. Of the chosen variant's ready
        chunks, the longest (``longest``)."""
        held = self.holds.get(worker)
        others = {v for w, v in self.holds.items() if w is not worker}
        for rank in (lambda u: u.variant is not None and u.variant.name == held,
                     lambda u: u.variant is None,
                     lambda u: u.variant.name not in others,
                     lambda u: self.worth_sharing(queue, u.variant.name)):
            for position in ready:
                if rank(queue[position]):
                    return self.longest(queue, ready, position)
        return None if may_wait else self.longest(queue, ready, ready[0])

    def longest(self, queue: list[Unit], ready: list[int], chosen: int) -> int:
        """Of the ready chunks of the chosen unit's variant, the one whose task's chunks took longest
        so far (a task not measured yet counts as longest; ties keep queue order). Long units go
        first and short ones are left for the end, where a worker that has run out of work waits
        only for a short one (longest-processing-time first)."""
        unit = queue[chosen]
        if unit.kind != "chunk":
            return chosen
        same = [p for p in ready if queue[p].kind == "chunk" and queue[p].variant == unit.variant]

        def expected_s(position: int) -> float:
            seconds = self.task_s.get(queue[position].chunks[0].task)
            return sum(seconds) / len(seconds) if seconds else math.inf

        return max(same, key=expected_s)

    def worth_sharing(self, queue: list[Unit], variant: str) -> bool:
        """Should a second worker prune ``variant`` to share its queued chunks? Splitting R seconds of
        chunks after a P-second prune ends at (R + P) / 2 instead of R: yes while P < R (and before
        either was measured)."""
        prune_s, unit_s = self.prune_s.get(variant), self.unit_s.get(variant)
        if prune_s is None or not unit_s:
            return True
        queued = sum(1 for u in queue if u.variant is not None and u.variant.name == variant)
        return prune_s < queued * sum(unit_s) / len(unit_s)

    def prune_ahead(self, queue: list[Unit], worker: Any) -> Unit | None:
        """A prune unit for a waiting variant nobody holds, unless the worker's own still has units."""
        held = self.holds.get(worker)
        if any(u.variant is not None and u.variant.name == held for u in queue):
            return None
        holders = set(self.holds.values())
        waiting = [u.variant for u in queue if u.variant is not None and u.variant.name not in holders]
        return Unit("prune", (), waiting[0]) if waiting else None

    def lost(self, worker: Any, unit: Unit, queue: list[Unit], exc: Exception) -> None:
        """Re-queue the unit (a prune unit is only a head start); the worker counts again once Ray has
        restarted it (if it can). The ``UNIT_LOSS_LIMIT``-th loss of the same unit stops the run."""
        what = unit.describe()
        losses = self.unit_losses[what] = self.unit_losses.get(what, 0) + 1
        self.holds[worker] = None
        self.lost_at[worker] = time.monotonic()
        self.session.work.log(event="lost", unit=what, losses=losses, error=" ".join(str(exc).split())[:200])
        if losses >= UNIT_LOSS_LIMIT:
            raise PrunelabError(
                f"{what}: its Ray worker process died {losses} times while running it (out of memory? a crash?); "
                f"stopped instead of losing more workers (the finished chunks are kept in {self.session.work.root}: "
                "run the study again to resume)")
        if unit.kind != "prune":
            queue.insert(0, unit)
        self.session.reporter.message(f"a Ray worker was lost during {what}: evaluating it again")
        self.starting[worker.ready.remote()] = worker

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
