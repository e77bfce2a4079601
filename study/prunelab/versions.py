"""The package versions recorded next to every result (a pruned model's recipe, an evaluation, a run).

One helper, so every record lists its packages the same way: ``python`` first, then each package
in the order asked, ``"not installed"`` for a missing one.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib import metadata

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
