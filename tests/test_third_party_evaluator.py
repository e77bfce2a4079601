"""The example evaluator (examples/jsonl-choice-plugin), installed as a package, passes its own tests.

Those tests are what a plugin author writes: ``prunelab eval --task-option`` on a tiny model from
``prunelab.testing`` (no Hub), checked against plain transformers, and a bad data file refused in
one line before any model loads. Here they run in a fresh interpreter that finds the plugin through
its entry point; ``prunelab plugins jsonl-choice`` lists its option and declarations.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ENV, ROOT, install_example

EXAMPLE = ROOT / "examples" / "jsonl-choice-plugin"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    path = install_example(EXAMPLE, tmp_path_factory.mktemp("jsonl-choice-plugin"))
    return {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))}


def test_the_example_evaluators_own_tests_pass(env, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(EXAMPLE / "tests")], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout


def test_plugins_lists_the_options_and_declarations(env):
    done = subprocess.run([sys.executable, "-m", "prunelab.cli", "plugins", "jsonl-choice"], capture_output=True,
                          text=True, env={**env, "COLUMNS": "250"}, timeout=300)
    assert done.returncode == 0, done.stderr
    for text in ("prunelab-jsonl-choice", "0.1.0", "path", "(required)", "the JSONL file of questions",
                 "acc_norm", "prediction='prediction_norm'", "target='target'", "category='category'"):
        assert text in done.stdout, text
    assert "mmlu" not in done.stdout  # one plugin
