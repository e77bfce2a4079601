"""A third-party strategy package (examples/random-pruning-plugin) installed the normal way is
listed by `prunelab plugins` and usable by `prunelab prune`, like the built-in strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from prunelab.model.export import MASKS_FILE, RECIPE_FILE
from prunelab.prune.masks import MaskSet, count_to_prune

from .conftest import ROOT, install_example

EXAMPLE = ROOT / "examples" / "random-pruning-plugin"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    return install_example(EXAMPLE, tmp_path_factory.mktemp("random-plugin"))


def prunelab(plugin_path: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [plugin_path, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "prunelab.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_listed_by_prunelab_plugins(plugin_path):
    result = prunelab(plugin_path, "plugins")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if " random " in line)
    assert "strategy" in row and "prunelab-random" in row and "0.1.0" in row
    assert "failed to load" not in result.stderr


def test_usable_by_prunelab_prune(plugin_path, tiny_qwen3, tmp_path):
    out = tmp_path / "random30"
    result = prunelab(plugin_path, "prune", "--model", str(tiny_qwen3), "--method", "random", "--sparsity", "30",
                      "--seed", "5", "--dtype", "float32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["strategy"] == "random" and recipe["seed"] == 5
    per_tensor = recipe["sparsity"]["per_tensor"]
    assert len(per_tensor) == 28  # the default targets: 7 Linears x 4 layers
    assert all(t["zeros"] == count_to_prune(t["params"], 0.3) for t in per_tensor.values())
    masks = MaskSet.load(out / MASKS_FILE)
    assert all(int((~masks[name]).sum()) == t["zeros"] for name, t in per_tensor.items())

    # seeded: the same seed prunes the same weights, through the Python API in this process too
    import prunelab_random  # importable only because the fixture installed it

    from prunelab.model.loading import load_model
    from prunelab.plugin import Strategy
    from prunelab.prune.api import prune
    from prunelab.registry import Registry

    strategy: Strategy = prunelab_random.prunelab_strategies()[0]
    registry = Registry(None, [], {"random": (strategy, None)}, {})
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    report = prune(loaded, "random", sparsity=30, seed=5, registry=registry)
    assert all(torch.equal(report.masks[name], masks[name]) for name in masks)
    other = prune(load_model(str(tiny_qwen3), dtype="float32"), "random", sparsity=30, seed=6, registry=registry)
    assert not torch.equal(other.masks["layers.0.mlp.up_proj.weight"], masks["layers.0.mlp.up_proj.weight"])


@pytest.fixture(autouse=True)
def _importable(plugin_path, monkeypatch):
    monkeypatch.syspath_prepend(plugin_path)
