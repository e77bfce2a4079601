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


def fake_task_plugin(monkeypatch) -> md.EntryPoint:
    """The entry point of an importable third-party plugin that adds the task ``fake-task``."""
    good = types.ModuleType("fake_good_plugin")
    from prunelab.plugin import Evaluator, MetricSpec, hookimpl

    @hookimpl
    def prunelab_evaluators():
        return [Evaluator("fake-task", "a fake task", lambda s, sub: [], lambda e, i, o: None,
                          metrics=(MetricSpec("acc", "accuracy", "correct"),))]

    good.prunelab_evaluators = prunelab_evaluators
    monkeypatch.setitem(sys.modules, "fake_good_plugin", good)
    return md.EntryPoint("fake", "fake_good_plugin", ENTRY_POINT_GROUP)


def test_broken_plugin_is_reported_and_the_rest_still_load(monkeypatch):
    entry_points = [
        *md.entry_points(group=ENTRY_POINT_GROUP),
        md.EntryPoint("broken", "no_such_module_for_prunelab", ENTRY_POINT_GROUP),
        fake_task_plugin(monkeypatch),
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


def test_a_study_without_a_task_list_runs_every_installed_task_third_party_ones_too(
        monkeypatch, tiny_qwen3, small_data, tmp_path):
    """The default task list is the registry's, so the core names no built-in task."""
    from prunelab.runner.studyfile import load_study

    from .conftest import study_text

    registry = build_registry([*md.entry_points(group=ENTRY_POINT_GROUP), fake_task_plugin(monkeypatch)])
    path = tmp_path / "tiny.toml"
    path.write_text(study_text(tiny_qwen3, small_data).replace('tasks = ["mmlu", "gsm8k", "wikitext"]\n', ""))
    assert sorted(load_study(path, registry=registry).tasks) == ["fake-task", "gsm8k", "mmlu", "wikitext"]
    assert sorted(load_study(path).tasks) == ["gsm8k", "mmlu", "wikitext"]  # only the built-ins installed
