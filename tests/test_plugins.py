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


# ------------------------------------------------------------------ the registry refuses what it cannot serve
def module_plugin(monkeypatch, name: str, **attributes) -> md.EntryPoint:
    """The entry point of an importable module ``name`` with these attributes (its hooks)."""
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return md.EntryPoint(name.removesuffix("_plugin"), name, ENTRY_POINT_GROUP)


def a_strategy(name: str):
    from prunelab.plugin import Strategy, hookimpl

    @hookimpl
    def prunelab_strategies():
        return [Strategy(name, "a strategy that does nothing", lambda model, options, context: {})]

    return prunelab_strategies


def test_a_name_two_plugins_add_is_refused_naming_both(monkeypatch):
    """Which of two ``magnitude`` strategies would serve must not depend on how entry points sort."""
    import pytest

    from prunelab.errors import PrunelabError

    clash = module_plugin(monkeypatch, "zz_magnitude_plugin", prunelab_strategies=a_strategy("magnitude"))
    with pytest.raises(PrunelabError) as error:
        build_registry([*md.entry_points(group=ENTRY_POINT_GROUP), clash])
    message = str(error.value)
    assert message.startswith("strategy 'magnitude' is added by two plugins") and "\n" not in message
    assert "prunelab 0.1.0 (entry point magnitude = prunelab_plugins.magnitude)" in message
    assert "(entry point zz_magnitude = zz_magnitude_plugin)" in message
    # a name only one plugin adds is served, whatever else is installed
    other = module_plugin(monkeypatch, "zz_other_plugin", prunelab_strategies=a_strategy("zz-nothing"))
    registry = build_registry([*md.entry_points(group=ENTRY_POINT_GROUP), other])
    assert registry.strategies["zz-nothing"][1].module == "zz_other_plugin"
    assert registry.strategies["magnitude"][1].module == "prunelab_plugins.magnitude"


def test_an_unknown_or_unmarked_hook_is_refused_naming_the_plugin(monkeypatch):
    """A misspelt hook would load and add nothing: each way of getting a hook wrong is an error."""
    import pytest

    from prunelab.errors import PrunelabError
    from prunelab.plugin import hookimpl

    def strategies():  # a new function each call: marking one marks it for good
        return lambda: []

    cases = {
        "prunelab_strategy is not a prunelab hook": {"prunelab_strategy": hookimpl(strategies())},  # misspelt
        "prunelab_strategies is not marked @hookimpl": {"prunelab_strategies": strategies()},  # unmarked
        "unknown hook 'strategies'": {"strategies": hookimpl(strategies())},  # pluggy's check_pending
    }
    for index, (fragment, hooks) in enumerate(cases.items()):
        entry_point = module_plugin(monkeypatch, f"typo{index}_plugin", **hooks)
        with pytest.raises(PrunelabError) as error:
            build_registry([entry_point])
        message = str(error.value)
        assert fragment in message and f"entry point typo{index} = typo{index}_plugin" in message, message


def test_plugins_command_lists_each_plugin_package_and_what_it_adds(monkeypatch, capsys):
    empty = module_plugin(monkeypatch, "adds_nothing_plugin")
    monkeypatch.setattr("prunelab.registry.default_registry",
                        lambda: build_registry([*md.entry_points(group=ENTRY_POINT_GROUP), empty]))
    assert main(["plugins"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ ")]
    magnitude = next(row for row in rows if row.startswith("│ magnitude ") and "strategy ×" in row)
    assert "prunelab" in magnitude and "0.1.0" in magnitude and "strategy × 1" in magnitude
    assert any(row.startswith("│ adds_nothing ") and "nothing" in row for row in rows)
