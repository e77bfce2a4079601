"""Where a study's chunks are evaluated: in this process (the default), or on a Ray cluster.

The runner plans a study (variants x tasks x chunks) and hands the pending chunks to an
``Executor``. Every executor writes the same atomic chunk files into the same work folder, so a
local run, a Ray run and a resumed run of either give the same per-item results, and any of them
resumes any other. This module imports nothing of Ray: ``prunelab.runner.ray_executor`` is imported only
when a study asks for ``kind = "ray"`` (``pip install prunelab[ray]``). Both drive a
``prunelab.runner.session.Session`` and import it; neither is imported by it.
"""

from __future__ import annotations

from typing import Protocol

from prunelab.errors import PrunelabError
from prunelab.runner.session import Session, model_revision
from prunelab.runner.studyfile import ExecutorSettings
from prunelab.runner.workfolder import Plan


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
