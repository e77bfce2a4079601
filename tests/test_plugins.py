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


def test_a_plugins_source_hash_follows_its_files(monkeypatch, tmp_path):
    """An edited source (an editable install) is another identity whatever its version says; the hash
    covers every .py file of a package the entry point names, and is the SHA-256 of names and bytes."""
    import hashlib

    package = tmp_path / "edited_plugin_for_prunelab"
    package.mkdir()
    (package / "__init__.py").write_text("from prunelab.plugin import hookimpl\n")
    (package / "helper.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = md.EntryPoint("edited", "edited_plugin_for_prunelab", ENTRY_POINT_GROUP)
    before = next(p for p in build_registry([entry]).plugins if p.name == "edited")
    expected = hashlib.sha256()
    for name in ("__init__.py", "helper.py"):
        expected.update(name.encode() + b"\0" + (package / name).read_bytes() + b"\0")
    assert before.error is None and before.source_hash == expected.hexdigest()
    (package / "helper.py").write_text("X = 2\n")
    after = next(p for p in build_registry([entry]).plugins if p.name == "edited")
    assert after.source_hash != before.source_hash
    assert after.identity() == {"package": "unknown", "version": "unknown", "source_hash": after.source_hash}


def test_plugins_name_shows_options_and_declarations(capsys):
    assert main(["plugins", "drop-layers"]) == 0
    shown = capsys.readouterr().out
    assert "layers" in shown and "(required)" in shown and "removes_layers" in shown and "each_layer" in shown
    assert "magnitude" not in shown
    assert main(["plugins", "no-such-plugin"]) == 2
    assert "no plugin named 'no-such-plugin'" in capsys.readouterr().err


def test_eval_help_lists_the_installed_tasks(capsys, monkeypatch):
    """--tasks' help is the registry's list (a third-party task too), looked up when help is shown."""
    import pytest

    from prunelab import registry as registry_module

    registry = build_registry([*md.entry_points(group=ENTRY_POINT_GROUP), fake_task_plugin(monkeypatch)])
    monkeypatch.setattr(registry_module, "default_registry", lambda: registry)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "fake-task, gsm8k, mmlu, wikitext" in shown


def test_task_options_from_the_command_line_reach_load_items(monkeypatch, tmp_path):
    """--task-option TASK.KEY=VALUE is validated against the task's options and handed to load_items."""
    import pytest

    from prunelab.errors import PrunelabError
    from prunelab.evaluate.data import DataSource, Subset
    from prunelab.evaluate.run import parse_task_options, prepare_tasks
    from prunelab.plugin import Evaluator, Item, MetricSpec, Option

    seen = {}

    def load_items(source, subset, options):
        seen.update(options)
        return [Item(line, "all", {}) for line in open(options["path"], encoding="utf-8").read().split()]

    task = Evaluator("file-task", "items from a file", load_items, lambda s, i, o: None,
                     options=(Option("path", str, None, "items file", required=True), Option("n", int, 1)),
                     metrics=(MetricSpec("acc", "accuracy", "correct"),))
    from prunelab.registry import Registry

    registry = Registry(None, [], {}, {"file-task": (task, None)})
    items = tmp_path / "items.txt"
    items.write_text("a b c")
    options = parse_task_options([f"file-task.path={items}", "file-task.n=3"], ["file-task"])
    (prepared,) = prepare_tasks(["file-task"], DataSource(), Subset(), {"num_fewshot": 5}, registry, options)
    assert [i.id for i in prepared.items] == ["a", "b", "c"] and seen == {"path": str(items), "n": 3}
    for bad, message in ((["file-task.path"], "expected TASK.KEY=VALUE"), (["other.path=x"], "not in --tasks"),
                         (["file-task.n=1", "file-task.n=2"], "given twice")):
        with pytest.raises(PrunelabError, match=message):
            parse_task_options(bad, ["file-task"])
    with pytest.raises(PrunelabError, match="unknown option"):
        prepare_tasks(["file-task"], DataSource(), Subset(), {}, registry, {"file-task": {"paht": "x"}})


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
