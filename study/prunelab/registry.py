"""Build the plugin manager and load every plugin from the ``prunelab`` entry-point group.

Built-in strategies and evaluators are found exactly as a third-party package's are. A plugin
that fails to import is recorded with its error and the rest still load, so one broken package
never takes the tool down.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pluggy

from prunelab import plugin as hookspecs
from prunelab.errors import PrunelabError
from prunelab.plugin import Evaluator, Recovery, Strategy

ENTRY_POINT_GROUP = "prunelab"


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from, and whether it loaded."""

    name: str
    module: str
    package: str
    version: str
    error: str | None = None
    #: SHA-256 of the module's source (the file the entry point names, or its package's folder):
    #: an editable or source install changes it with every edit, whatever the version says.
    source_hash: str | None = None

    def identity(self) -> dict[str, str | None]:
        """What a run records of the plugin (``prunelab.json``, the manifest, the reuse key)."""
        return {"package": self.package, "version": self.version, "source_hash": self.source_hash}


@dataclass
class Registry:
    """Everything discovered: the plugin manager, its strategies and evaluators, and failures."""

    manager: pluggy.PluginManager
    plugins: list[PluginInfo]
    strategies: dict[str, tuple[Strategy, PluginInfo]]
    evaluators: dict[str, tuple[Evaluator, PluginInfo]]
    recoveries: dict[str, tuple[Recovery, PluginInfo]] = field(default_factory=dict)

    def strategy(self, name: str) -> Strategy:
        if name not in self.strategies:
            known = ", ".join(sorted(self.strategies)) or "none"
            raise PrunelabError(f"unknown strategy '{name}' (available: {known})")
        return self.strategies[name][0]

    def evaluator(self, name: str) -> Evaluator:
        if name not in self.evaluators:
            known = ", ".join(sorted(self.evaluators)) or "none"
            raise PrunelabError(f"unknown task '{name}' (available: {known})")
        return self.evaluators[name][0]

    def removed_layer(self, strategy: str, params: Mapping[str, Any], num_layers: int | None = None) -> int | None:
        """The one decoder layer a variant removes, as its strategy declares (``Strategy.removes_layers``)
        for a model of ``num_layers`` decoder layers (None: unknown; a model-dependent declaration then
        tells nothing).

        None for any other variant: dense, a healed twin, a strategy that declares nothing or is
        not installed, or a variant that removes several layers. The runner shares a layer sweep
        between these variants and the report draws them on the layer chart.
        """
        found = self.strategies.get(strategy)
        layers = found[0].removed_layers(params, num_layers) if found else None
        return layers[0] if layers is not None and len(layers) == 1 else None

    def calibrates(self, strategy: str, params: Mapping[str, Any]) -> bool:
        """Whether a variant reads calibration text before pruning (``Strategy.needs_calibration``);
        False for dense and for a strategy that is not installed."""
        found = self.strategies.get(strategy)
        return bool(found and found[0].uses_calibration(params))

    def identity(self, kind: str, name: str) -> dict[str, str | None] | None:
        """The identity of the plugin that provides strategy, task or recovery ``name`` (``kind``:
        ``"strategy"``, ``"task"``, ``"recovery"``); None for one that is not installed (dense)."""
        table = {"strategy": self.strategies, "task": self.evaluators, "recovery": self.recoveries}[kind]
        found = table.get(name)
        return found[1].identity() if found and found[1] is not None else None  # a hand-made registry has no info

    def recovery(self, name: str) -> Recovery:
        if name not in self.recoveries:
            known = ", ".join(sorted(self.recoveries)) or "none"
            raise PrunelabError(f"unknown recovery method '{name}' (available: {known})")
        return self.recoveries[name][0]


def build_registry(entry_points: list[md.EntryPoint] | None = None) -> Registry:
    """Load the plugins of the entry-point group (or the given entry points) into a new registry."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    if entry_points is None:
        entry_points = list(md.entry_points(group=ENTRY_POINT_GROUP))
    infos: list[PluginInfo] = []
    strategies: dict[str, tuple[Strategy, PluginInfo]] = {}
    evaluators: dict[str, tuple[Evaluator, PluginInfo]] = {}
    recoveries: dict[str, tuple[Recovery, PluginInfo]] = {}
    for ep in sorted(entry_points, key=lambda e: e.name):
        package, version = _distribution_of(ep)
        try:
            module = ep.load()
            manager.register(module, name=ep.name)
            found_s = _collect(manager, module, "prunelab_strategies")
            found_e = _collect(manager, module, "prunelab_evaluators")
            found_r = _collect(manager, module, "prunelab_recoveries")
        except Exception as exc:  # a broken plugin must not break the others
            infos.append(PluginInfo(ep.name, ep.value, package, version, f"{type(exc).__name__}: {exc}"))
            continue
        info = PluginInfo(ep.name, ep.value, package, version, source_hash=source_hash(module))
        infos.append(info)
        for strategy in found_s:
            strategies[strategy.name] = (strategy, info)
        for evaluator in found_e:
            evaluators[evaluator.name] = (evaluator, info)
        for recovery in found_r:
            recoveries[recovery.name] = (recovery, info)
    return Registry(manager, infos, strategies, evaluators, recoveries)


def _collect(manager: pluggy.PluginManager, module: object, hook_name: str) -> list:
    """Call one hook on one plugin only, so each result is attributed to its package."""
    impl = getattr(module, hook_name, None)
    if impl is None:
        return []
    caller = manager.subset_hook_caller(hook_name, remove_plugins=[
        p for p in manager.get_plugins() if p is not module
    ])
    found: list = []
    for result in caller():
        found.extend(result or [])
    return found


def source_hash(module: object) -> str | None:
    """SHA-256 over a plugin module's source files: the module's file, or every ``.py`` file of its
    package's folder when the entry point names a package (names and bytes, in sorted order)."""
    file = getattr(module, "__file__", None) or getattr(sys.modules.get(getattr(module, "__name__", "")), "__file__", None)
    if not file:
        return None
    path = Path(file)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for source in files:
        try:
            data = source.read_bytes()
        except OSError:
            continue
        digest.update(str(source.relative_to(path.parent)).encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def _distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


@cache
def default_registry() -> Registry:
    """The registry of the installed plugins, built once per process."""
    return build_registry()
