"""``<out>/<study>/.work``: the configuration, the plan, one parquet file per chunk and an event log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from prunelab.errors import FileProblem, PrunelabError
from prunelab.readers import (
    LINK_REFUSED,
    atomic_write,
    describe,
    open_no_follow,
    read_json,
    read_parquet,
    refuse_links,
    writing,
)
from prunelab.records import ITEM_SCHEMA
from prunelab.runner.chunks import Chunk
from prunelab.runner.identity import same_settings
from prunelab.runner.variants import Variant


class WorkFolder:
    """``<out>/<study>/.work``: the configuration, the plan, one parquet file per chunk and an event log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.session = os.urandom(6).hex()  # tells this invocation's log events from a resumed one's
        self.damaged: list[Path] = []  # chunks this invocation found damaged and moved aside

    def config_hash(self) -> str | None:
        """The configuration this folder's chunks belong to; a damaged marker is refused, never guessed."""
        self.check_links()  # before anything in it is read or written
        marker = self.root / "config.json"
        if not marker.is_file():
            return None
        digest = read_json(marker, "damaged work folder marker").get("config_hash")
        if not isinstance(digest, str):
            raise FileProblem(marker, "damaged work folder marker: no config_hash (delete the folder to start over)")
        return digest

    def holds(self, digest: str) -> bool:
        return self.config_hash() == digest

    def claim(self, config: dict[str, Any], digest: str) -> None:
        """Create the folder for this configuration, or accept it if it holds this configuration's work."""
        found = self.config_hash()
        if found is not None:
            if found != digest:
                stored = json.loads((self.root / "config.json").read_text(encoding="utf-8")).get("config") or {}
                what = ("the same settings computed by other code or with another calibration text "
                        f"(code then: {stored.get('code')}, now: {config.get('code')})"
                        if same_settings(stored, config)
                        else "a different configuration")
                raise PrunelabError(
                    f"{self.root} holds unfinished results of {what} of study "
                    f"'{config['study']}' (config {found[:8]}, this file {digest[:8]}); finish that run, "
                    f"use another --out, or delete the folder to discard it")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "config.json", lambda p: p.write_text(json.dumps({"config_hash": digest, "config": config}, indent=2)))

    def check_links(self) -> None:
        """No symbolic link in the work folder, in it, or as the study folder above it (inside the
        artifacts root): a link planted there (a shared folder) would send a write elsewhere, so the
        run is refused in one line naming it. Checked when a run claims the folder, before any write."""
        refuse_links(self.root.parent.parent, self.root)
        for folder, subfolders, files in os.walk(self.root):  # never descends into a link
            for name in (*subfolders, *files):
                if os.path.islink(os.path.join(folder, name)):
                    raise FileProblem(Path(folder) / name, LINK_REFUSED)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process per work folder: a second one would evaluate the same chunks.

        The lock file is opened without following a link and never truncated.
        """
        try:
            import fcntl
        except ImportError:  # not on POSIX: no lock
            yield
            return
        with os.fdopen(open_no_follow(self.root / "lock", os.O_WRONLY | os.O_CREAT), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PrunelabError(f"another prunelab process is running this study ({self.root})") from None
            yield

    def variant_folder(self, variant: Variant) -> Path:
        slug = re.sub(r"[^\w.=,-]+", "_", variant.name)[:80]
        return self.root / f"{slug}-{hashlib.sha1(variant.name.encode()).hexdigest()[:8]}"

    def make_folder(self, folder: Path) -> None:
        """Create a folder inside the work folder; one that is a link (planted) is refused."""
        folder.mkdir(parents=True, exist_ok=True)
        refuse_links(self.root, folder)

    def chunk(self, chunk: Chunk) -> Path:
        """The file of a chunk's rows (its bounds are in the plan, not in the name)."""
        return self.variant_folder(chunk.variant) / f"{chunk.task}-{chunk.index:04d}.parquet"

    def bench(self, variant: Variant) -> Path:
        return self.variant_folder(variant) / "bench.json"

    def reference(self, task: str, index: int) -> Path:
        """The dense model's reference for one task chunk (``prunelab.evaluate.reference``), if its task keeps one."""
        return self.root / "reference" / f"{task}-{index:04d}.safetensors"

    def write_chunk(self, path: Path, frame: pl.DataFrame) -> None:
        """Write one chunk and its checksum; a failed write leaves every finished chunk as it was.

        The checksum is written first and the chunk renamed into place last, so a chunk file that
        exists either matches its checksum or is detected as damaged and computed again.
        """
        def write(staging: Path) -> None:  # the checksum lands before the chunk: a chunk never lacks one
            frame.write_parquet(staging)
            digest = file_digest(staging)
            atomic_write(checksum_path(path), lambda p: p.write_text(digest + "\n", encoding="utf-8"))

        self.make_folder(path.parent)
        try:
            atomic_write(path, write)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise FileProblem(path, f"cannot write this chunk: {describe(exc)}; the finished chunks are kept in "
                                    f"{self.root}: run the same command again to resume") from exc

    def chunk_problem(self, path: Path) -> str | None:
        """Why a chunk file cannot be trusted (None: it can): missing, checksum mismatch, unreadable, wrong columns."""
        if not path.is_file():
            return "missing"
        sidecar = checksum_path(path)
        try:
            if sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip() != file_digest(path):
                return "checksum mismatch"
            schema = read_parquet(path).schema  # every page decodes
        except (OSError, ValueError) as exc:  # the checksum file
            return f"unreadable checksum ({describe(exc)})"
        except FileProblem as exc:  # the parquet file
            return f"unreadable ({exc.problem})"
        wrong = [name for name, kind in ITEM_SCHEMA.items() if schema.get(name) not in (kind, pl.Null)]
        return f"wrong columns {', '.join(wrong)}" if wrong else None

    def finished_chunk(self, path: Path) -> bool:
        """True for a chunk that can be trusted; a damaged one is moved aside (``.damaged``) to be recomputed."""
        problem = self.chunk_problem(path)
        if problem in (None, "missing"):
            return problem is None
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".damaged"))
        self.damaged.append(path)
        self.log(event="damaged", chunk=str(path.relative_to(self.root)), problem=problem)
        return False

    def read_chunk(self, path: Path) -> pl.DataFrame:
        """A verified chunk's rows; a chunk damaged since it was checked is a one-line error naming it."""
        problem = self.chunk_problem(path)
        if problem:
            raise FileProblem(path, f"damaged chunk ({problem}): run the same command again to recompute it")
        return read_parquet(path)

    def load_plan(self) -> Plan | None:
        """The saved plan, or None when there is none or it is damaged (it is then made again)."""
        path = self.root / "plan.json"
        if not path.is_file():
            return None
        try:
            doc = read_json(path)
            plan = Plan([Variant(str(v["name"]), str(v["strategy"]), dict(v["params"])) for v in doc["variants"]],
                        {str(t): [(int(a), int(b)) for a, b in rs] for t, rs in doc["chunks"].items()})
        except (PrunelabError, LookupError, TypeError, ValueError, AttributeError):
            return None
        return plan if plan.variants else None

    def save_plan(self, plan: Plan) -> None:
        doc = {"variants": [dataclasses.asdict(v) for v in plan.variants], "chunks": plan.chunks}
        atomic_write(self.root / "plan.json", lambda p: p.write_text(json.dumps(doc, indent=1)))

    def log(self, **event: Any) -> None:
        """Append one event (a chunk evaluated, a variant pruned); a torn last line is skipped on reading."""
        fd = open_no_follow(self.root / "log.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with writing(self.root / "log.jsonl"), os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "session": self.session, **event}, default=str) + "\n")

    def events(self) -> list[dict[str, Any]]:
        """Every readable event; torn or damaged lines, and lines that are not events, are skipped."""
        path = self.root / "log.jsonl"
        found = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
            with contextlib.suppress(ValueError, RecursionError):
                event = json.loads(line)
                if _whole_event(event):
                    found.append(event)
        return found


EVENT_FIELDS = {"chunk": ("variant", "task", "items", "seconds"), "prune": ("variant", "seconds", "report"),
                "load": ("seconds",)}
EVENT_TYPES: dict[str, Any] = {"event": str, "session": str, "variant": str, "task": str, "items": int,
                               "seconds": int | float, "report": dict}


def _whole_event(event: Any) -> bool:
    """An event the summaries can use: a mapping with the fields its kind needs, of their types."""
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        return False
    if any(k not in event for k in EVENT_FIELDS.get(event["event"], ())):
        return False
    return all(isinstance(event[k], kind) and not isinstance(event[k], bool)
               for k, kind in EVENT_TYPES.items() if k in event)


@dataclass
class Plan:
    """Every variant, and each task's chunks as ``(start, stop)`` of its items or windows."""

    variants: list[Variant]
    chunks: dict[str, list[tuple[int, int]]]

    def every_chunk(self) -> Iterator[Chunk]:
        """Each variant's chunks of each task, in plan order (variant, then task, then index)."""
        for variant in self.variants:
            for task, ranges in self.chunks.items():
                for index, (start, stop) in enumerate(ranges):
                    yield Chunk(variant, task, index, start, stop)



def checksum_path(chunk: Path) -> Path:
    return chunk.with_name(chunk.name + ".sha256")


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

