"""Installed third-party packages that break the plugin contract are refused by the command line with
one line and exit 2: a strategy name the built-ins already serve, and a misspelt hook."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import install_example

PACKAGES = {
    # distribution name: (module source, what must be refused)
    "prunelab-clash": ('''
        from prunelab.plugin import Strategy, hookimpl

        @hookimpl
        def prunelab_strategies():
            return [Strategy("magnitude", "not the built-in magnitude", lambda model, options, context: {})]
        ''', "strategy 'magnitude' is added by two plugins"),
    "prunelab-typo": ('''
        from prunelab.plugin import Strategy, hookimpl

        @hookimpl
        def prunelab_strategy():
            return [Strategy("typo", "a strategy behind a misspelt hook", lambda model, options, context: {})]
        ''', "prunelab_strategy is not a prunelab hook"),
}


def write_package(folder: Path, distribution: str, source: str) -> Path:
    module = distribution.replace("-", "_")
    (folder / module).mkdir(parents=True)
    (folder / module / "__init__.py").write_text(textwrap.dedent(source))
    (folder / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{distribution}"
        version = "2.3.4"

        [project.entry-points.prunelab]
        {module} = "{module}"

        [tool.setuptools]
        packages = ["{module}"]
        """))
    return folder


@pytest.mark.parametrize("distribution", sorted(PACKAGES))
def test_the_cli_refuses_a_plugin_that_breaks_the_contract(distribution, tmp_path):
    source, fragment = PACKAGES[distribution]
    site = install_example(write_package(tmp_path / "pkg", distribution, source), tmp_path / "install")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "prunelab.cli", "plugins"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip()
    assert fragment in error and len(error.splitlines()) == 1, error
    assert f"{distribution} 2.3.4" in error  # the offending distribution, by name and version
    if distribution == "prunelab-clash":
        assert "prunelab 0.1.0 (entry point magnitude = prunelab_plugins.magnitude)" in error  # and the other one
