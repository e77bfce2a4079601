"""The package follows its data path: imports run one way, with no cycle, and plugins use only the
public plugin API.

See docs/architecture.md: ``cli -> runner -> report -> prune -> evaluate -> model -> plugin``, with the
shared helpers (errors, readers, options, versions, records) below everything. Every import counts,
also one inside a function or under ``if TYPE_CHECKING:`` (a cycle a type checker or a reader must
follow is still a cycle): one against that order fails here, naming the file and line, and so does
any cycle between modules, named module by module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

STUDY = ROOT / "study" / "prunelab"
# lower = closer to the bottom of the stack; a module may import its own layer or a lower one
LAYERS = {"errors": 0, "readers": 0, "options": 0, "versions": 0, "records": 0, "plugin": 1, "registry": 2,
          "model": 3, "evaluate": 4, "prune": 5, "report": 6, "runner": 7, "cli": 8}
# the documented plugin API: package-level names of these modules (docs/plugins.md)
PLUGIN_API = {"prunelab.plugin", "prunelab.model", "prunelab.prune", "prunelab.evaluate", "prunelab.errors",
              "prunelab.readers"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "prunelab" and len(parts) > 1 else None


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``prunelab`` module the file imports, with its line: at the top, in a function, or for
    type checkers only. ``from prunelab.x import y`` names ``prunelab.x.y`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunelab."):
            found += [(node.lineno, submodule if is_module(submodule := f"{node.module}.{alias.name}")
                       else node.module) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "prunelab":
            found += [(node.lineno, f"prunelab.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("prunelab.")]
    return sorted(set(found))


def own_layer(path: Path) -> str:
    relative = path.relative_to(STUDY)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def module_name(path: Path) -> str:
    """``study/prunelab/runner/run.py`` -> ``prunelab.runner.run``; a package is its ``__init__``."""
    parts = path.relative_to(STUDY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in STUDY.rglob("*.py")}


def is_module(name: str) -> bool:
    return name in MODULES


def import_graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the package modules it imports (a name of a module's, e.g. ``prunelab.__version__``,
    counts as that module)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imports(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as one cycle through it,
    ``a -> b -> ... -> a``; a module that imports itself is one too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_through(graph, group) for group in groups]


def cycle_through(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle inside a strongly connected group: from its first module, the shortest way back."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    return [start, start]


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (function-level and TYPE_CHECKING imports count): " + "; ".join(
        " -> ".join(cycle) for cycle in found)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function_or_type_checking_block(tmp_path):
    """The check is not vacuous: two modules that import each other only lazily are a named cycle."""
    (tmp_path / "a.py").write_text("def f():\n    from prunelab.b import g\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from prunelab.c import h\n")
    (tmp_path / "c.py").write_text("import prunelab.a\n")
    (tmp_path / "d.py").write_text("from prunelab import a\n")  # into the cycle, not part of it
    graph = import_graph({f"prunelab.{n}": tmp_path / f"{n}.py" for n in "abcd"})
    assert graph["prunelab.d"] == {"prunelab.a"}
    assert cycles(graph) == [["prunelab.a", "prunelab.b", "prunelab.c", "prunelab.a"]]


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


def _protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol of ``prunelab.plugin`` names (its own, not object's)."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return names


def test_what_the_stages_hand_a_plugin_is_what_plugin_py_describes(tmp_path):
    """Each Protocol of the plugin contract is met by the stage's class that a plugin is handed:
    every attribute it names is set on an instance, every method takes the same parameters."""
    import inspect

    import torch

    from prunelab import plugin
    from prunelab.evaluate import DataSource, DenseReference, Subset, WindowScores
    from prunelab.evaluate.reference import ReferenceStore
    from prunelab.model import adapt
    from prunelab.prune import RecoveryContext

    from .conftest import random_model, tiny_config

    model = random_model(tiny_config("llama", vocab_size=64))
    handed = {
        plugin.DataSource: DataSource(tmp_path), plugin.Subset: Subset(),
        plugin.DenseReference: DenseReference(torch.zeros(1, 2, 3), torch.zeros(1, 2), "head"),
        plugin.WindowScores: WindowScores(), plugin.ReferenceStore: ReferenceStore(tmp_path / "r", True),
        plugin.RecoveryContext: RecoveryContext(adapt(model), tokenizer=None),
    }
    for protocol, instance in handed.items():
        for name in _protocol_members(protocol):
            assert hasattr(instance, name), f"{type(instance).__name__} lacks {name} ({protocol.__name__})"
            wanted = vars(protocol).get(name)
            if callable(wanted):
                mine = list(inspect.signature(getattr(instance, name)).parameters)
                assert mine == list(inspect.signature(wanted).parameters)[1:], (protocol.__name__, name)
