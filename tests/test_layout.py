"""The package follows its data path: imports run one way, and plugins use only the public plugin API.

See docs/architecture.md: ``cli -> runner -> report -> prune -> evaluate -> model -> plugin``, with the
shared helpers (errors, readers, options) below everything. An import against that order (even one
inside a function) fails here, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

STUDY = ROOT / "study" / "prunelab"
# lower = closer to the bottom of the stack; a module may import its own layer or a lower one
LAYERS = {"errors": 0, "readers": 0, "options": 0, "versions": 0, "plugin": 1, "registry": 2, "model": 3, "evaluate": 4,
          "prune": 5, "report": 6, "runner": 7, "cli": 8, "testing": 3}
# the documented plugin API: package-level names of these modules (docs/plugins.md)
PLUGIN_API = {"prunelab.plugin", "prunelab.model", "prunelab.prune", "prunelab.evaluate", "prunelab.errors",
              "prunelab.readers", "prunelab.testing"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "prunelab" and len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``prunelab`` module the file imports, with its line, except imports only for type checkers."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunelab."):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.module == "prunelab":
            found += [(node.lineno, f"prunelab.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("prunelab.")]
    return found


def own_layer(path: Path) -> str:
    relative = path.relative_to(STUDY)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


@pytest.mark.parametrize("path", sorted(STUDY.rglob("*.py")), ids=lambda p: str(p.relative_to(STUDY)))
def test_imports_run_down_the_data_path(path):
    if path.name == "__init__.py" and path.parent == STUDY:
        return
    mine = own_layer(path)
    upward = [(line, module) for line, module in imports(path)
              if (layer := layer_of(module)) in LAYERS and LAYERS[layer] > LAYERS[mine]]
    assert not upward, f"{path.relative_to(ROOT)} ({mine}) imports upward: {upward}"


@pytest.mark.parametrize("path", sorted([*(ROOT / "plugins" / "prunelab_plugins").glob("*.py"), *(ROOT / "examples").rglob("*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_plugin_api(path):
    private = [(line, module) for line, module in imports(path) if module not in PLUGIN_API]
    assert not private, f"{path.relative_to(ROOT)} imports past the plugin API: {private}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    underscored = [(node.lineno, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("prunelab") for alias in node.names
                   if alias.name.startswith("_")]
    assert not underscored, f"{path.relative_to(ROOT)} imports private names: {underscored}"


def test_the_api_modules_export_what_plugins_import():
    """Every name a plugin imports is in its module's ``__all__`` (the documented surface)."""
    import importlib

    for path in [*(ROOT / "plugins" / "prunelab_plugins").glob("*.py"), *(ROOT / "examples").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in PLUGIN_API - {"prunelab.errors", "prunelab.readers"}:
                exported = set(importlib.import_module(node.module).__all__)
                missing = {alias.name for alias in node.names} - exported
                assert not missing, f"{path.relative_to(ROOT)}: {sorted(missing)} not in {node.module}.__all__"
