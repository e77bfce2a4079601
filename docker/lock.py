"""The inputs of requirements.lock, as a digest written on its last line by `make lock`.

`make preflight` compares the digest with the current pyproject.toml and Makefile in a fraction of a
second and without a network, so a lock that no longer matches its inputs stops `make image` before
a multi-GB build; `make lock-check` (run by the tests) goes further and re-resolves against PyPI.

    python docker/lock.py stamp  LOCK TORCH_PIN LOCK_FLAGS   # append the digest (make lock)
    python docker/lock.py check  LOCK TORCH_PIN LOCK_FLAGS   # one-line reason and exit 2 when stale
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

MARK = "# inputs-sha256: "


def inputs_digest(pyproject: Path, torch_pin: str, flags: str) -> str:
    """SHA-256 over what the resolution depends on: dependencies, the ray extra, Python range, pins, flags."""
    project = tomllib.loads(pyproject.read_text())["project"]
    inputs = {
        "dependencies": sorted(project.get("dependencies", [])),
        "ray": sorted(project.get("optional-dependencies", {}).get("ray", [])),
        "requires-python": project.get("requires-python"),
        "torch": torch_pin.strip(),
        "flags": " ".join(flags.split()),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    lines = [line for line in lock.read_text().splitlines() if line.startswith(MARK)]
    return lines[-1].removeprefix(MARK).strip() if lines else None


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in {"stamp", "check"}:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    command, lock, torch_pin, flags = argv
    lock_path = Path(lock)
    if not lock_path.is_file():
        print(f"{lock}: not found; run 'make lock'", file=sys.stderr)
        return 2
    digest = inputs_digest(Path("pyproject.toml"), torch_pin, flags)
    if command == "stamp":
        text = "".join(line + "\n" for line in lock_path.read_text().splitlines() if not line.startswith(MARK))
        lock_path.write_text(text + MARK + digest + "\n")
        return 0
    if recorded_digest(lock_path) != digest:
        print(f"{lock}: stale, pyproject.toml's dependencies or the lock settings changed since it was made; "
              "run 'make lock' and commit it", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
