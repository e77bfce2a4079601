"""Plugin discovery through entry points, including a plugin that fails to import."""

from __future__ import annotations

import importlib.metadata as md
import sys
import types

from prunelab.cli import main
from prunelab.registry import ENTRY_POINT_GROUP, build_registry


def test_builtin_evaluators_are_discovered_through_entry_points():
    registry = build_registry()
    assert {"mmlu", "gsm8k", "wikitext"} <= set(registry.evaluators)
    info = registry.evaluators["mmlu"][1]
    assert info.package == "prunelab" and info.module == "prunelab_plugins.mmlu"


def test_broken_plugin_is_reported_and_the_rest_still_load(monkeypatch):
    good = types.ModuleType("fake_good_plugin")
    from prunelab.plugin import Evaluator, hookimpl

    @hookimpl
    def prunelab_evaluators():
        return [Evaluator("fake-task", "a fake task", lambda s, sub: [], lambda e, i, o: None)]

    good.prunelab_evaluators = prunelab_evaluators
    monkeypatch.setitem(sys.modules, "fake_good_plugin", good)
    entry_points = [
        *md.entry_points(group=ENTRY_POINT_GROUP),
        md.EntryPoint("broken", "no_such_module_for_prunelab", ENTRY_POINT_GROUP),
        md.EntryPoint("fake", "fake_good_plugin", ENTRY_POINT_GROUP),
    ]
    registry = build_registry(entry_points)
    broken = [p for p in registry.plugins if p.name == "broken"]
    assert broken and "ModuleNotFoundError" in broken[0].error
    assert "fake-task" in registry.evaluators
    assert "mmlu" in registry.evaluators


def test_plugins_command_lists_evaluators(capsys):
    assert main(["plugins"]) == 0
    listed = capsys.readouterr().out
    for name in ("mmlu", "gsm8k", "wikitext"):
        assert name in listed
