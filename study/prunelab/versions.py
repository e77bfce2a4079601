"""The versions recorded next to every result (a pruned model's recipe, an evaluation, a run): the
packages', and the code's own (prunelab's version and git commit).

One helper each, so every record lists them the same way: ``python`` first, then each package in
the order asked, ``"not installed"`` for a missing one; the commit as ``git_commit`` answers.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

# Set in the image at build time (Dockerfile), read when there is no git checkout to ask.
GIT_COMMIT_ENV = "PRUNELAB_GIT_COMMIT"

#: What decides a pruned model's numbers (its ``prunelab.json``).
PRUNING_PACKAGES = ("prunelab", "torch", "transformers", "safetensors")
#: What decides an evaluation's numbers (``results.json``).
EVALUATION_PACKAGES = ("prunelab", "torch", "transformers", "datasets", "pluggy", "polars", "altair")
#: What draws a run's artifacts, besides the evaluation's packages (the manifest).
REPORT_PACKAGES = ("numpy", "scipy", "pyarrow", "gguf", "vl-convert-python")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """``{"python": ..., name: version, ...}`` for the given distribution names."""
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit(repo: str | os.PathLike | None = None) -> str | None:
    """The short commit of the prunelab checkout, with ``+dirty`` for local edits.

    An installed copy without a checkout (the container image: no git, no .git) answers with the
    commit baked in at build time, ``$PRUNELAB_GIT_COMMIT``; None when neither is known.
    """
    repo = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"],
                              capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        baked = os.environ.get(GIT_COMMIT_ENV, "").strip()
        return baked if baked and baked != "unknown" else None
    return f"{head}+dirty" if dirty else head


def code_version(commit: str | None = None) -> dict[str, str | None]:
    """Which code this is: prunelab's version and git commit (a run's identity records it, a rebuilt
    report notes it)."""
    from prunelab import __version__

    return {"prunelab": __version__, "commit": commit if commit is not None else git_commit()}
