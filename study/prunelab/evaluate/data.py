"""Where evaluation data comes from, and which subset of it is used.

Local data (``--data-dir`` or ``PRUNELAB_DATA``) takes precedence; otherwise tasks load from the
Hugging Face Hub through ``datasets``. Subsets are chosen per group (an MMLU subject) so that every
group is represented, either as a seeded sample or as the first items (lm-eval's ``--limit``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab.errors import FileProblem, PrunelabError
from prunelab.readers import describe, read_utf8, reading

DATA_ENV = "PRUNELAB_DATA"


@dataclass(frozen=True)
class DataSource:
    """A local data folder (one sub-folder per task: mmlu/, gsm8k/, wikitext-2/) or the Hub."""

    root: Path | None = None

    @classmethod
    def resolve(cls, data_dir: str | os.PathLike | None = None) -> DataSource:
        chosen = data_dir or os.environ.get(DATA_ENV)
        if not chosen:
            return cls(None)
        root = Path(chosen).expanduser()
        if not root.is_dir():
            raise PrunelabError(f"data folder not found: {root}")
        return cls(root.resolve())

    def local(self, *parts: str) -> Path | None:
        """The local path of a task's data, or None when data comes from the Hub."""
        return None if self.root is None else self.root.joinpath(*parts)

    def describe(self) -> str:
        return str(self.root) if self.root else "huggingface-hub"


@dataclass(frozen=True)
class Subset:
    """Which items to evaluate: a fraction per group, sampled by seed or taken first, capped by limit."""

    fraction: float = 1.0
    sample: str = "random"  # "random" (seeded, stratified by group) or "first" (as lm-eval --limit)
    limit: int | None = None  # at most this many items per group
    seed: int = 1234

    def __post_init__(self) -> None:
        if not (0 < self.fraction <= 1) or math.isnan(self.fraction):
            raise PrunelabError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.sample not in {"random", "first"}:
            raise PrunelabError(f"--sample must be 'random' or 'first', got {self.sample!r}")
        if self.limit is not None and self.limit < 1:
            raise PrunelabError(f"--limit must be a positive integer, got {self.limit}")

    def select(self, group: str, n: int) -> list[int]:
        """Row indices of one group: ceil(fraction * n) of them, then at most ``limit``; sorted."""
        k = min(n, math.ceil(self.fraction * n - 1e-9))
        if self.limit is not None:
            k = min(k, self.limit)
        if self.sample == "first" or k == n:
            return list(range(k))
        rng = random.Random(f"{self.seed}:{group}")  # string seeds are stable across processes
        return sorted(rng.sample(range(n), k))

    def as_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "sample": self.sample, "limit": self.limit, "seed": self.seed}


def read_csv_rows(path: Path, columns: int) -> list[tuple[int, list[str]]]:
    """(line, row) of a header-less CSV with exactly ``columns`` fields; errors name the file and line."""
    if not path.is_file():
        raise PrunelabError(f"data file not found: {path}")
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
    try:
        for row in reader:
            line = reader.line_num
            if len(row) != columns:
                raise FileProblem(f"{path}:{line}", f"expected {columns} columns, found {len(row)}")
            rows.append((line, row))
    except csv.Error as exc:
        raise FileProblem(f"{path}:{max(reader.line_num, 1)}", f"malformed CSV ({describe(exc)})") from exc
    if not rows:
        raise FileProblem(path, "no rows (empty split)")
    return rows


def read_jsonl(path: Path, required: tuple[str, ...],
               check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Records of a JSON-lines file that each have the ``required`` string fields.

    ``check`` returns what is wrong with a record for its task (None: nothing), so a row that
    parses but cannot be scored is reported as ``file:line`` before any model is loaded.
    """
    if not path.is_file():
        raise PrunelabError(f"data file not found: {path}")
    records: list[dict[str, Any]] = []
    for number, line in _numbered_lines(path):
        with reading(f"{path}:{number}", "invalid JSON"):
            record = json.loads(line)
        missing = [k for k in required if not isinstance(record, dict) or not isinstance(record.get(k), str)]
        if missing:
            raise FileProblem(f"{path}:{number}", f"missing field(s) {', '.join(missing)}")
        problem = check(record) if check else None
        if problem:
            raise FileProblem(f"{path}:{number}", problem)
        records.append(record)
    if not records:
        raise FileProblem(path, "no records (empty split)")
    return records


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    with reading(path, "cannot read"):
        data = path.read_bytes()
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileProblem(f"{path}:{number}", describe(exc)) from exc
        if line.strip():
            yield number, line


def load_hub_split(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a Hub dataset split (needs network access to the Hugging Face Hub)."""
    try:
        from datasets import load_dataset

        return list(load_dataset(dataset, config, split=split))
    except Exception as exc:  # datasets raises many types for offline/missing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunelabError(
            f"could not load {dataset} ({config or 'default'}, {split}) from the Hub: {first}; "
            f"pass --data-dir or set {DATA_ENV} to use local files"
        ) from None
