"""Build the plugin manager and load every plugin from the ``prunelab`` entry-point group.

Built-in strategies and evaluators are found exactly as a third-party package's are. What each
plugin adds goes into one registry per kind (``KindRegistry``: strategies, evaluators, recovery
methods; as lm-evaluation-harness's ``Registry[T]``), which serves a name from one plugin only.

* A plugin that fails to import is recorded with its error and the rest still load, so one broken
  package never takes the tool down (``prunelab plugins`` shows it).
* A plugin that breaks the contract is refused, with one line naming it: a name another plugin
  already adds (both distributions are named: which one would win must not depend on how
  entry-point names sort), or a hook that prunelab does not define (a misspelt
  ``prunelab_strategy`` would otherwise load and add nothing; pluggy's ``check_pending``), or a
  ``prunelab_*`` function not marked ``@hookimpl``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Generic, TypeVar

import pluggy

from prunelab import plugin as hookspecs
from prunelab.errors import PrunelabError
from prunelab.plugin import Evaluator, Recovery, Strategy

ENTRY_POINT_GROUP = "prunelab"
HOOK_PREFIX = "prunelab_"
T = TypeVar("T", Strategy, Evaluator, Recovery)


@dataclass(frozen=True)
class PluginInfo:
    """Where a plugin came from, and whether it loaded."""

    name: str
    module: str
    package: str
    version: str
    error: str | None = None

    def describe(self) -> str:
        """``<distribution> <version> (entry point <name> = <module>)``: who to uninstall or ask."""
        return f"{self.package} {self.version} (entry point {self.name} = {self.module})"


class KindRegistry(Mapping[str, tuple[T, PluginInfo]], Generic[T]):
    """The strategies, evaluators or recovery methods by name, each with the plugin that added it.

    A read-only mapping ``name -> (item, plugin)``; ``add`` refuses a name another plugin already
    added, naming both distributions, and ``find`` a name nobody added, listing the known ones.
    """

    def __init__(self, kind: str, items: Mapping[str, tuple[T, PluginInfo]] | None = None) -> None:
        self.kind = kind  # as messages name it: "strategy", "task", "recovery method"
        self._items: dict[str, tuple[T, PluginInfo]] = dict(items or {})

    def add(self, item: T, info: PluginInfo) -> None:
        found = self._items.get(item.name)
        if found is not None:
            raise PrunelabError(f"{self.kind} '{item.name}' is added by two plugins, {found[1].describe()} and "
                                f"{info.describe()}: uninstall one of them")
        self._items[item.name] = (item, info)

    def find(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise PrunelabError(f"unknown {self.kind} '{name}' (available: {known})")
        return self._items[name][0]

    def __getitem__(self, name: str) -> tuple[T, PluginInfo]:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


KINDS = {"strategies": ("strategy", "prunelab_strategies"), "evaluators": ("task", "prunelab_evaluators"),
         "recoveries": ("recovery method", "prunelab_recoveries")}  # field: (its name in messages, its hook)


@dataclass
class Registry:
    """Everything discovered: the plugin manager, one ``KindRegistry`` per kind, and failures.

    Mappings given for a kind (a test's ``{"random": (strategy, None)}``) become its ``KindRegistry``.
    """

    manager: pluggy.PluginManager
    plugins: list[PluginInfo]
    strategies: KindRegistry[Strategy]
    evaluators: KindRegistry[Evaluator]
    recoveries: KindRegistry[Recovery] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attribute, (kind, _) in KINDS.items():
            if not isinstance(getattr(self, attribute), KindRegistry):
                setattr(self, attribute, KindRegistry(kind, getattr(self, attribute)))

    def strategy(self, name: str) -> Strategy:
        return self.strategies.find(name)

    def evaluator(self, name: str) -> Evaluator:
        return self.evaluators.find(name)

    def removed_layer(self, strategy: str, params: Mapping[str, Any]) -> int | None:
        """The one decoder layer a variant removes, as its strategy declares (``Strategy.removes_layers``).

        None for any other variant: dense, a healed twin, a strategy that declares nothing or is
        not installed, or a variant that removes several layers. The runner shares a layer sweep
        between these variants and the report draws them on the layer chart.
        """
        found = self.strategies.get(strategy)
        layers = found[0].removed_layers(params) if found else None
        return layers[0] if layers is not None and len(layers) == 1 else None

    def calibrates(self, strategy: str, params: Mapping[str, Any]) -> bool:
        """Whether a variant reads calibration text before pruning (``Strategy.needs_calibration``);
        False for dense and for a strategy that is not installed."""
        found = self.strategies.get(strategy)
        return bool(found and found[0].uses_calibration(params))

    def recovery(self, name: str) -> Recovery:
        return self.recoveries.find(name)


def build_registry(entry_points: list[md.EntryPoint] | None = None) -> Registry:
    """Load the plugins of the entry-point group (or the given entry points) into a new registry."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    if entry_points is None:
        entry_points = list(md.entry_points(group=ENTRY_POINT_GROUP))
    infos: list[PluginInfo] = []
    kinds: dict[str, KindRegistry] = {attribute: KindRegistry(kind) for attribute, (kind, _) in KINDS.items()}
    for ep in sorted(entry_points, key=lambda e: e.name):
        package, version = _distribution_of(ep)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            infos.append(PluginInfo(ep.name, ep.value, package, version, f"{type(exc).__name__}: {exc}"))
            continue
        info = PluginInfo(ep.name, ep.value, package, version)
        _check_hooks(manager, module, info)
        try:
            manager.register(module, name=ep.name)
            manager.check_pending()  # a marked hook prunelab does not define (caught above; pluggy's own word)
            found = {attribute: _collect(manager, module, hook) for attribute, (_, hook) in KINDS.items()}
        except pluggy.PluginValidationError as exc:
            raise PrunelabError(f"plugin {info.describe()}: {exc}") from None
        except Exception as exc:  # a hook that raises: reported like a broken import
            infos.append(dataclasses.replace(info, error=f"{type(exc).__name__}: {exc}"))
            continue
        infos.append(info)
        for attribute, items in found.items():
            for item in items:
                kinds[attribute].add(item, info)
    return Registry(manager, infos, **kinds)


def _check_hooks(manager: pluggy.PluginManager, module: object, info: PluginInfo) -> None:
    """Refuse a ``prunelab_*`` function that is no hook prunelab defines, or one not marked ``@hookimpl``:
    either would load and add nothing, silently."""
    hooks = sorted(name for name in vars(hookspecs) if name.startswith(HOOK_PREFIX))
    for name in sorted(vars(module) if hasattr(module, "__dict__") else ()):
        if not name.startswith(HOOK_PREFIX) or not callable(getattr(module, name)):
            continue
        if name not in hooks:
            raise PrunelabError(f"plugin {info.describe()}: {name} is not a prunelab hook (the hooks: "
                                f"{', '.join(hooks)})")
        if manager.parse_hookimpl_opts(module, name) is None:
            raise PrunelabError(f"plugin {info.describe()}: {name} is not marked @hookimpl "
                                "(from prunelab.plugin import hookimpl), so prunelab would never call it")


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


def _distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"], dist.version


@cache
def default_registry() -> Registry:
    """The registry of the installed plugins, built once per process."""
    return build_registry()
