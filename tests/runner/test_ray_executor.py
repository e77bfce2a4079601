"""Studies on Ray (``--executor ray``), on a local Ray instance of 2 CPUs with the tiny models.

The reference is always the local path: a Ray run -- whole, with a worker killed in the middle, or
resumed after its driver was killed -- must give every item the local run's result.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from prunelab.errors import PrunelabError
from prunelab.runner.chunks import Chunk
from prunelab.runner.executors import make_executor
from prunelab.runner.identity import identify
from prunelab.runner.run import run_study
from prunelab.runner.session import Reporter, prepare_study_tasks
from prunelab.runner.studyfile import WORK, ExecutorSettings, load_study

from ..conftest import chunk_files, sorted_items, study_text

ray = pytest.importorskip("ray")

COLUMNS = ["variant", "task", "metric", "item_id", "correct", "value", "nll_sum", "tokens", "prediction",
           "loglikelihoods", "generated"]  # "value": KL to dense and same-top-token, read from dense's reference
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (starting one costs seconds on 2 cores)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_executor(**settings) -> object:
    return make_executor(ExecutorSettings(kind="ray", cpus_per_worker=1, **settings))


def comparable(folder: Path) -> pl.DataFrame:
    items = sorted_items(folder)
    return items.select([c for c in COLUMNS if c in items.columns])


@pytest.fixture(scope="module")
def tiny_study(tiny_qwen3, small_data, tmp_path_factory) -> Path:  # noqa: F811
    """The runner tests' study (dense, two single-layer removals, magnitude 50 %) and its local run."""
    root = tmp_path_factory.mktemp("ray-study")
    study = root / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data))
    return study


@pytest.fixture(scope="module")
def local_run(tiny_study) -> Path:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_study(load_study(tiny_study), tiny_study.parent / "local")
    finally:
        torch.set_num_threads(threads)


def test_local_execution_imports_nothing_of_ray(tiny_study, tmp_path):
    """``import prunelab.cli`` and a whole local study leave Ray out of the process."""
    code = ("import sys; from prunelab.cli import main; assert 'ray' not in sys.modules; "
            f"status = main(['study', 'run', {str(tiny_study)!r}, '--out', {str(tmp_path)!r}]); "
            "assert status == 0, status; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_ray_run_equals_local_run_item_for_item(local_ray, tiny_study, local_run, tmp_path):
    run = run_study(load_study(tiny_study), tmp_path, executor=ray_executor(workers=2))
    assert comparable(run).equals(comparable(local_run))
    timings = json.loads((run / "manifest.json").read_text())["timings"]
    workers = [s for s in timings["sessions"] if s["chunks"]]
    assert len(workers) == 2, "both workers evaluated chunks"
    # the layer sweep is kept: dense + 2 removals share each mmlu and wikitext chunk (4 + 2 chunks)
    assert sum(s["swept_chunks"] for s in workers) == 3 * 6
    assert sum(s["chunks"] for s in timings["sessions"]) == 4 * 8  # 4 variants x 8 chunks, each once


def test_a_width_hidden_variant_gets_kl_to_dense_on_ray_as_locally(local_ray, tiny_qwen3, small_data, tmp_path):
    """Its head differs from dense's: the workers read the dense head from the shared work folder, as
    they read the chunk references (the two dense chunks may be evaluated at once, each keeping it)."""
    import torch

    strategies = '[[strategies]]\nname = "width"\nhidden = [0.25]\nimportance = ["magnitude"]\n'
    study = tmp_path / "width.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_study(load_study(study), tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    run = run_study(load_study(study), tmp_path / "ray", executor=ray_executor(workers=2))
    assert comparable(run).equals(comparable(local))
    kl = comparable(run).filter(pl.col("metric") == "kl_mean", pl.col("variant") != "dense")["value"]
    assert kl.len() == 2 and kl.null_count() == 0 and (kl > 0).all()


class Messages(Reporter):
    """A reporter that keeps the runner's messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


@contextlib.contextmanager
def killing_a_worker(log: Path, after_chunks: int = 3):
    """SIGKILL the first worker process once ``after_chunks`` chunks are in the work folder's log;
    yields the list of killed pids (filled when the block ends)."""
    killed: list[int] = []
    finished = threading.Event()

    def kill_a_worker_mid_run() -> None:  # no deadline: on a loaded machine 3 chunks can take minutes
        while not finished.is_set():
            text = log.read_text() if log.is_file() else ""
            events = [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()]  # whole lines only
            chunks = [e for e in events if e.get("event") == "chunk"]
            if len(chunks) >= after_chunks:  # some work is done; the workers are in the middle of more
                victim = next(e for e in events if e.get("event") == "worker")["pid"]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker_mid_run)
    killer.start()
    try:
        yield killed
    finally:
        finished.set()
        killer.join()


def test_killed_worker_loses_only_its_chunk_and_the_study_equals_local(local_ray, tiny_study, local_run, tmp_path):
    """SIGKILL a worker process while it evaluates: its unit is evaluated again, nothing else changes."""
    messages = Messages()
    with killing_a_worker(tmp_path / "tiny" / WORK / "log.jsonl") as killed:
        run = run_study(load_study(tiny_study), tmp_path, executor=ray_executor(workers=2), reporter=messages)
    assert killed, "no worker was killed"
    lost = [line for line in messages.lines if line.startswith("a Ray worker was lost during")]
    assert len(lost) == 1, messages.lines  # one unit in flight on the killed worker, evaluated again
    assert comparable(run).equals(comparable(local_run))


def test_killed_driver_resumes_from_the_work_folder(tiny_study, local_run, tmp_path):
    """SIGKILL ``prunelab study run --executor ray`` mid-run; the same command finishes the study."""
    command = [sys.executable, "-m", "prunelab.cli", "study", "run", str(tiny_study), "--out", str(tmp_path),
               "--executor", "ray", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    work = tmp_path / "tiny" / WORK
    while len(chunk_files(tmp_path) if work.is_dir() else {}) < 4:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no chunk written in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray instance it started
    process.wait()
    process.stderr.close()
    before = {path: pl.read_parquet(path) for path in chunk_files(tmp_path)}
    assert 4 <= len(before) < 32, "killed too late: the run had finished"

    again = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    run = next((tmp_path / "tiny").glob("*-*"))
    assert comparable(run).equals(comparable(local_run))
    sessions = json.loads((run / "manifest.json").read_text())["timings"]["sessions"]
    assert sum(s["chunks"] for s in sessions) <= 32 + 2 * 3  # at most the 2 in-flight units were redone


def test_unreachable_address_fails_in_one_line_before_any_model(tiny_study, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "prunelab.cli", "study", "run", str(tiny_study), "--out",
                           str(tmp_path), "--executor", "ray", "--address", f"ray://127.0.0.1:{port}"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Ray cluster at ray://127.0.0.1:{port} is not reachable" in lines[0], done.stderr
    assert not (tmp_path / "tiny").exists(), "nothing was started"
    assert time.monotonic() - started < 60


def test_a_request_no_node_can_satisfy_fails_after_the_wait(local_ray, tiny_study, tmp_path):
    """A GPU worker on this CPU-only Ray instance: a clear error after ``wait_s``, not a hang."""
    executor = ray_executor(workers=1, gpus_per_worker=1, wait_s=3)
    started = time.monotonic()
    with pytest.raises(PrunelabError, match=r"no Ray worker started within 3 s: each needs .*'GPU': 1"):
        run_study(load_study(tiny_study), tmp_path, executor=executor)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(("table", "fragment"), [
    ('kind = "dask"', "kind must be one of local, ray"),
    ("workers = 0", "workers must be at least 1"),
    ('wait_s = "long"', "wait_s must be float"),
    ("nodes = 2", "unknown key(s) nodes"),
])
def test_bad_executor_tables_are_one_line_errors(tiny_study, tmp_path, table, fragment):
    study = tmp_path / "bad.toml"
    study.write_text(tiny_study.read_text() + f"\n[executor]\n{table}\n")
    with pytest.raises(PrunelabError, match=r"bad\.toml \[executor\]") as error:
        load_study(study)
    assert fragment in str(error.value)


def test_the_study_file_chooses_the_executor_and_the_command_line_overrides_it(tiny_study, tmp_path):
    study = tmp_path / "ray.toml"
    study.write_text(tiny_study.read_text() + '\n[executor]\nkind = "ray"\naddress = "auto"\nwait_s = 5\n')
    settings = load_study(study).executor
    assert (settings.kind, settings.address, settings.wait_s) == ("ray", "auto", 5.0)
    assert settings.replace("command line", kind="local", workers=3).kind == "local"
    plain = load_study(tiny_study)
    assert identify(plain, prepare_study_tasks(plain)).digest == identify(
        load_study(study), prepare_study_tasks(plain)).digest, "the executor is not in the config hash"


def test_a_workers_error_is_reported_by_its_message(local_ray):
    """What a worker raises reaches the command line as its one-line message, not Ray's traceback."""
    from prunelab.runner.ray_executor import cause_line

    @ray.remote(num_cpus=1)
    def fails() -> None:
        raise PrunelabError("data folder /nowhere does not exist on this node")

    with pytest.raises(ray.exceptions.RayTaskError) as error:
        ray.get(fails.remote())
    assert "Traceback" in str(error.value) or "\n" in str(error.value)
    assert cause_line(error.value) == "data folder /nowhere does not exist on this node"


def test_only_chunks_compared_with_dense_wait_and_only_for_denses_same_chunk():
    """A variant's chunk of a task that ``compares_with_dense`` waits for dense's chunk of the same
    task and index, wherever that one is evaluated (alone or in a layer sweep); nothing else waits."""
    from types import SimpleNamespace

    from prunelab.runner.ray_executor import units
    from prunelab.runner.variants import DENSE_VARIANT, Variant

    drop = Variant("drop-layers-1", "drop-layers", {"layers": [1]})
    magnitude = Variant("magnitude-50", "magnitude", {"sparsity": 0.5})
    tasks = {"wikitext": SimpleNamespace(evaluator=SimpleNamespace(compares_with_dense=True)),
             "mmlu": SimpleNamespace(evaluator=SimpleNamespace(compares_with_dense=False))}
    session = SimpleNamespace(tasks=tasks, sweepable=lambda variant, task: variant is not magnitude)
    pending = [Chunk(v, task, index, index, index + 1) for v in (DENSE_VARIANT, drop, magnitude)
               for task in tasks for index in (0, 1) if not (v is DENSE_VARIANT and (task, index) == ("wikitext", 1))]
    waits = {u.describe(): set(u.waits_for) for u in units(session, pending, sweep=False)}
    assert waits["magnitude-50 wikitext chunk 0"] == {("wikitext", 0)}
    assert waits["magnitude-50 wikitext chunk 1"] == set()  # dense's chunk 1 is finished already
    assert waits["drop-layers-1 wikitext chunk 0"] == {("wikitext", 0)}
    assert all(not waits[f"{v.name} mmlu chunk {i}"] for v in (DENSE_VARIANT, drop, magnitude) for i in (0, 1))
    assert not waits["dense wikitext chunk 0"]

    swept = units(session, pending, sweep=True)  # dense and the removal share a sweep unit per chunk
    sweeps = [u for u in swept if u.kind == "sweep"]
    assert not any(u.waits_for for u in sweeps)
    assert set().union(*(u.provides for u in sweeps)) == {("mmlu", 0), ("mmlu", 1), ("wikitext", 0)}
    waits = {u.describe(): set(u.waits_for) for u in swept if u.kind == "chunk"}
    assert waits == {"magnitude-50 wikitext chunk 0": {("wikitext", 0)}, "magnitude-50 wikitext chunk 1": set(),
                     "magnitude-50 mmlu chunk 0": set(), "magnitude-50 mmlu chunk 1": set()}


def test_a_free_worker_shares_a_held_variant_only_when_pruning_it_costs_less_than_its_queued_chunks():
    """Two workers on 2 CPUs: a second prune of Wanda pays only if the chunks left outlast it."""
    from prunelab.runner.ray_executor import Unit, WorkerPool
    from prunelab.runner.variants import Variant

    wanda = Variant("wanda-50", "wanda", {"sparsity": 0.5})
    pool = object.__new__(WorkerPool)  # the scheduling state only: no Ray actors
    pool.holds = {"busy": wanda.name, "free": "dense"}
    pool.prune_s, pool.unit_s, pool.task_s = {}, {}, {}
    chunk = Chunk(wanda, "gsm8k", 0, 0, 2)

    def choice(chunks: int, *, may_wait: bool = True) -> int | None:
        queue = [Unit("chunk", (chunk,), wanda)] * chunks
        return pool.choose(queue, list(range(chunks)), "free", may_wait=may_wait)

    assert choice(1) == 0  # nothing measured yet: share
    pool.prune_s[wanda.name], pool.unit_s[wanda.name] = 30.0, [4.0, 6.0]
    assert choice(6) is None  # 6 chunks x 5 s = 30 s left: a 30 s prune does not pay, wait
    assert choice(7) == 0  # 35 s left: it does
    assert choice(1, may_wait=False) == 0  # nothing else in flight: never idle


def test_variants_slow_to_prepare_are_queued_and_taken_first():
    """Healed, then calibrated variants come first, so that their long prune does not start last and
    leave the other workers idle at the end; within a rank the plan's order is kept."""
    from types import SimpleNamespace

    from prunelab.runner.ray_executor import WorkerPool, units
    from prunelab.runner.variants import DENSE_VARIANT, Variant

    magnitude = Variant("magnitude-50", "magnitude", {"sparsity": 0.5})
    healed = Variant("magnitude-50+lora", "magnitude+lora", {"sparsity": 0.5}, recovery="lora")
    wanda = Variant("wanda-50", "wanda", {"sparsity": 0.5})
    session = SimpleNamespace(tasks={"gsm8k": SimpleNamespace(evaluator=SimpleNamespace(compares_with_dense=False))})
    pending = [Chunk(v, "gsm8k", index, index, index + 1) for v in (DENSE_VARIANT, magnitude, healed, wanda)
               for index in (0, 1)]
    queue = units(session, pending, sweep=False)
    assert [u.describe() for u in queue] == [f"{v.name} gsm8k chunk {i}" for v in (healed, wanda, DENSE_VARIANT, magnitude)
                                            for i in (0, 1)]

    pool = object.__new__(WorkerPool)  # the scheduling state only: no Ray actors
    pool.holds, pool.prune_s, pool.unit_s, pool.task_s = {"a": None, "b": None}, {}, {}, {}
    ready = list(range(len(queue)))
    assert queue[pool.choose(queue, ready, "a", may_wait=True)].variant is healed
    pool.holds["a"] = healed.name
    assert queue[pool.choose(queue, ready, "b", may_wait=True)].variant is wanda


def test_a_worker_takes_its_variants_longest_chunk_first_as_measured_per_task():
    """Long chunks first, short ones for the end: of the held variant's ready chunks, the one whose
    task took longest per chunk so far; a task not measured yet first; queue order on ties."""
    from prunelab.runner.ray_executor import Unit, WorkerPool
    from prunelab.runner.variants import Variant

    magnitude = Variant("magnitude-50", "magnitude", {"sparsity": 0.5})
    other = Variant("magnitude-60", "magnitude", {"sparsity": 0.6})
    queue = [Unit("chunk", (Chunk(variant, task, 0, 0, 8),), variant)
             for variant, task in ((magnitude, "wikitext"), (other, "gsm8k"), (magnitude, "mmlu"), (magnitude, "gsm8k"))]
    pool = object.__new__(WorkerPool)  # the scheduling state only: no Ray actors
    pool.holds, pool.prune_s, pool.unit_s = {"w": magnitude.name}, {}, {}

    def chosen(task_s: dict[str, list[float]], ready: list[int] | None = None) -> str:
        pool.task_s = task_s
        ready = list(range(len(queue))) if ready is None else ready
        unit = queue[pool.choose(queue, ready, "w", may_wait=True)]
        assert unit.variant is magnitude  # the held variant still comes first, whatever its chunks cost
        return unit.chunks[0].task

    assert chosen({}) == "wikitext"  # nothing measured: queue order
    assert chosen({"wikitext": [3.0], "gsm8k": [12.0, 14.0], "mmlu": [9.0]}) == "gsm8k"
    assert chosen({"wikitext": [3.0], "gsm8k": [12.0, 14.0]}) == "mmlu"  # not measured yet: first
    assert chosen({"wikitext": [3.0], "gsm8k": [12.0], "mmlu": [9.0]}, ready=[0, 1, 2]) == "mmlu"  # ready ones only


# ---------------------------------------------------------------------- lost workers (issue 27 part 5)
class FakeRef:
    """What ``worker.<method>.remote()`` returns in the fake pool: ``ray.get`` calls ``answer``."""

    def __init__(self, answer) -> None:
        self.answer = answer


class FakeWorker:
    """An actor whose process dies while running the units in ``kills`` (each up to ``times``) and which
    Ray then restarts: it answers "temporarily unavailable" to the first ``unavailable`` probes."""

    def __init__(self, kills: set[str], times: int = 10**6, unavailable: int = 2) -> None:
        from types import SimpleNamespace

        from prunelab.runner.ray_executor import Done

        self.kills, self.times, self.unavailable, self.ran = kills, times, unavailable, []
        self.probes_unanswered = 0

        def run(unit):
            def answer():
                if unit.describe() in self.kills and self.times > 0:
                    self.times -= 1
                    self.probes_unanswered = self.unavailable
                    raise ray.exceptions.ActorUnavailableError("the actor's process died", None)
                self.ran.append(unit.describe())
                return Done(unit.items, 0.0, 0.0)
            return FakeRef(answer)

        def ready():
            def answer():
                if self.probes_unanswered:
                    self.probes_unanswered -= 1
                    raise ray.exceptions.ActorUnavailableError("restarting", None)
                return 1234
            return FakeRef(answer)

        self.run, self.ready = SimpleNamespace(remote=run), SimpleNamespace(remote=ready)


def fake_pool(monkeypatch, workers: list[FakeWorker]):
    """A ``WorkerPool`` over fake actors, with ``ray.wait``/``ray.get`` answering in submission order."""
    from types import SimpleNamespace

    from prunelab.runner import ray_executor

    monkeypatch.setattr(ray_executor, "REPROBE_S", 0.0)
    monkeypatch.setattr(ray_executor, "ray", SimpleNamespace(
        wait=lambda refs, num_returns, timeout: (refs[:1], refs[1:]), get=lambda ref: ref.answer()))
    events: list[dict] = []
    pool = object.__new__(ray_executor.WorkerPool)
    pool.settings = ExecutorSettings(kind="ray", wait_s=60.0)
    pool.session = SimpleNamespace(work=SimpleNamespace(log=lambda **e: events.append(e), root=Path("/w")),
                                   reporter=Reporter())
    pool.workers, pool.free, pool.holds = list(workers), [], {}
    pool.starting = {w.ready.remote(): w for w in workers}
    pool.lost_at, pool.unit_losses, pool.prune_s, pool.unit_s, pool.task_s = {}, {}, {}, {}, {}
    return pool, events


def chunk_units(n: int) -> list:
    from prunelab.runner.chunks import Chunk
    from prunelab.runner.ray_executor import Unit
    from prunelab.runner.variants import Variant

    variant = Variant("magnitude-50", "magnitude", {"sparsity": 0.5})
    return [Unit("chunk", (Chunk(variant, "mmlu", i, i, i + 1),), variant) for i in range(n)]


@pytest.mark.parametrize("count", [1, 2])
def test_a_worker_lost_while_ray_restarts_it_is_asked_again_and_every_unit_runs_once(count, monkeypatch):
    """The in-flight unit is evaluated again; the restarting worker answers "unavailable" twice, then
    comes back and is used again (it is not dropped from the pool)."""
    queue = chunk_units(5)
    workers = [FakeWorker({queue[1].describe()}, times=1)] + [FakeWorker(set()) for _ in range(count - 1)]
    pool, events = fake_pool(monkeypatch, workers)
    pool.drain(queue)
    ran = [name for w in workers for name in w.ran]
    assert sorted(ran) == sorted(u.describe() for u in queue), "every unit evaluated exactly once"
    assert pool.workers == workers, "the restarted worker was dropped from the pool"
    if count == 1:  # alone, it evaluated everything after its loss
        assert workers[0] in pool.free and workers[0].ran[-1] == queue[-1].describe()
    assert [e["unit"] for e in events if e["event"] == "lost"] == [queue[1].describe()]


def test_a_unit_that_keeps_killing_its_workers_stops_the_run_in_one_line_naming_it(monkeypatch):
    from prunelab.runner.ray_executor import UNIT_LOSS_LIMIT

    queue = chunk_units(4)
    poison = queue[2].describe()
    workers = [FakeWorker({poison}), FakeWorker({poison})]
    pool, events = fake_pool(monkeypatch, workers)
    with pytest.raises(PrunelabError) as error:
        pool.drain(queue)
    message = str(error.value)
    assert message.startswith(f"{poison}: its Ray worker process died {UNIT_LOSS_LIMIT} times") and "\n" not in message
    assert [e["losses"] for e in events if e["event"] == "lost"] == list(range(1, UNIT_LOSS_LIMIT + 1))


def test_a_worker_ray_reports_dead_for_good_leaves_the_pool(monkeypatch):
    worker = FakeWorker(set())
    pool, events = fake_pool(monkeypatch, [worker])
    pool.starting = {FakeRef(lambda: (_ for _ in ()).throw(ray.exceptions.ActorDiedError())): worker}
    with pytest.raises(PrunelabError, match="every Ray worker was lost, each after 3 restart"):
        pool.first_ready()
    assert pool.workers == [] and [e["event"] for e in events] == ["worker_gone"]


def test_the_only_worker_killed_mid_run_is_restarted_and_the_study_equals_local(local_ray, tiny_study, local_run,
                                                                                tmp_path):
    """One worker on a local Ray instance, SIGKILLed after a few chunks: Ray restarts it, the driver
    hands it the lost unit again, and the run finishes with the local run's items."""
    messages = Messages()
    with killing_a_worker(tmp_path / "tiny" / WORK / "log.jsonl") as killed:
        run = run_study(load_study(tiny_study), tmp_path, executor=ray_executor(workers=1), reporter=messages)
    assert killed, "the worker was not killed"
    lost = [line for line in messages.lines if line.startswith("a Ray worker was lost during")]
    assert len(lost) == 1, messages.lines
    assert comparable(run).equals(comparable(local_run))
