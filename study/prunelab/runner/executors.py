"""Where a study's chunks are evaluated: in this process (the default), or on a Ray cluster.

The runner plans a study (variants x tasks x chunks) and hands the pending chunks to an
``Executor``. Every executor writes the same atomic chunk files into the same work folder, so a
local run, a Ray run and a resumed run of either give the same per-item results, and any of them
resumes any other. This module imports nothing of Ray: ``prunelab.runner.ray_executor`` is imported only
when a study asks for ``kind = "ray"`` (``pip install prunelab[ray]``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prunelab.errors import PrunelabError

if TYPE_CHECKING:
    from prunelab.runner.run import Session
    from prunelab.runner.workfolder import Plan

KINDS = ("local", "ray")


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


class Executor(Protocol):
    """What the runner asks of an executor; ``session`` is the runner's ``Session`` of this invocation."""

    def connect(self) -> None:
        """Reach the compute (a Ray cluster) now: a wrong address fails before any model is loaded."""

    def plan(self, session: Session) -> Plan:
        """The study's variants and chunks (needs the model's layer count and the task's windows)."""

    def evaluate(self, session: Session, plan: Plan) -> None:
        """Evaluate every chunk of ``plan`` that has no chunk file yet, writing each atomically."""

    def model_revision(self, session: Session) -> str | None:
        """The Hub commit of the loaded weights, for the manifest (None when not from the Hub)."""


class LocalExecutor:
    """Everything in this process, one variant at a time (the layer sweep shares single-layer removals)."""

    def connect(self) -> None:
        pass

    def plan(self, session: Session) -> Plan:
        return session.plan()

    def evaluate(self, session: Session, plan: Plan) -> None:
        session.evaluate(plan)

    def model_revision(self, session: Session) -> str | None:
        from prunelab.runner.run import model_revision

        return model_revision(session.dense)


def make_executor(settings: ExecutorSettings) -> Executor:
    """The executor ``settings`` ask for; Ray is imported only here, only when asked for."""
    if settings.kind == "local":
        return LocalExecutor()
    try:
        from prunelab.runner.ray_executor import RayExecutor
    except ImportError as exc:
        raise PrunelabError(f"the ray executor needs Ray: pip install 'prunelab[ray]' ({exc})") from None
    return RayExecutor(settings)
