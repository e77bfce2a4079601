"""A sparsity prunes what it names (issue #26): below 1 % too, in the CLI, the Python API and study files.

``"0.5%"`` is half a percent and ``0.002`` a fraction (0.2 %); the value used to be normalised to
percent once and then read as a fraction again, so both pruned 100 times too much. Each request is
checked against the masks a tiny model actually gets (count of pruned weights), and every prune
now checks that itself: a strategy that prunes another share than asked stops with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.plugin import Strategy
from prunelab.prune.api import prune
from prunelab.prune.masks import (
    MaskSet,
    Percentage,
    apply_mask,
    check_achieved_sparsity,
    mask_from_scores,
    select_targets,
    weight_pruning_options,
)
from prunelab.runner.studyfile import load_study
from prunelab.runner.variants import expand_variants

# what users write -> the percentage it means (README: "a number below 1 is read as a fraction")
REQUESTS = [("0.5%", 0.5), (0.002, 0.2), ("0.002", 0.2), (0.9, 90.0), (2, 2.0), ("2", 2.0), (50, 50.0), ("50%", 50.0)]


@pytest.fixture(scope="module")
def loaded_once(tiny_models):
    return load_model(str(tiny_models["qwen3"]), dtype="float32")


def fresh(loaded):
    model = copy.deepcopy(loaded.model)
    return dataclasses.replace(loaded, model=model, adapter=adapt(model))


def pruned_percent(report) -> float:
    """Share of the masked weights that the masks remove, in percent (counted, not echoed)."""
    masks = report.masks
    return 100 * sum(int((~k).sum()) for k in masks.values()) / sum(k.numel() for k in masks.values())


def tolerance_percent(loaded) -> float:
    """One weight per row of each target tensor, as a percentage of the targets."""
    targets = select_targets(loaded.adapter)
    return 100 * sum(t.shape[0] for t in targets.values()) / sum(t.numel() for t in targets.values())


@pytest.mark.parametrize(("written", "percent"), REQUESTS)
def test_percentage_reads_each_request_once(written, percent):
    value = Percentage(written)
    assert value == pytest.approx(percent)
    assert Percentage(value) == pytest.approx(percent)  # reading it again changes nothing
    assert pickle.loads(pickle.dumps(value)) == pytest.approx(percent)  # nor does a trip to a worker


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize(("written", "percent"), REQUESTS)
def test_python_api_prunes_what_it_names(loaded_once, written, percent, scope):
    loaded = fresh(loaded_once)
    report = prune(loaded, "magnitude", sparsity=written, scope=scope)
    assert abs(pruned_percent(report) - percent) <= tolerance_percent(loaded)
    assert report["sparsity"]["total"]["sparsity_pct"] == pytest.approx(percent, abs=tolerance_percent(loaded))


@pytest.mark.parametrize(("written", "percent"), [("0.5%", 0.5), ("0.002", 0.2), ("0.9", 90.0), ("2", 2.0),
                                                  ("50", 50.0)])
def test_cli_prunes_what_it_names(tiny_models, tmp_path, written, percent, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_models["qwen3"]), "--method", "magnitude", "--sparsity", written,
                 "--dtype", "float32", "--no-masks", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    achieved = json.loads((out / "prunelab.json").read_text())["sparsity"]["total"]["sparsity_pct"]
    loaded = load_model(str(tiny_models["qwen3"]), dtype="float32")
    assert achieved == pytest.approx(percent, abs=tolerance_percent(loaded))


def test_study_file_variants_prune_what_they_are_named(loaded_once, tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('model = "m"\n[[strategies]]\nname = "magnitude"\nsparsity = ["0.5%", 0.002, 0.9, 2, 50]\n')
    variants = [v for v in expand_variants(load_study(path), num_layers=2) if v.strategy != "dense"]
    assert [v.name for v in variants] == ["magnitude[sparsity=0.5%]", "magnitude[sparsity=0.002]",
                                          "magnitude[sparsity=0.9]", "magnitude[sparsity=2]", "magnitude[sparsity=50]"]
    for variant, percent in zip(variants, [0.5, 0.2, 90, 2, 50], strict=True):
        loaded = fresh(loaded_once)  # as the runner's variant_model does
        report = prune(loaded, variant.pruned_by, **variant.params)
        assert abs(pruned_percent(report) - percent) <= tolerance_percent(loaded), variant.name


def _overpruning(model, options, context):
    """A broken strategy: reads the normalised percentage as a fraction again (issue #26's bug)."""
    fraction = Percentage(float(options["sparsity"])).fraction
    targets = select_targets(context.adapter)
    masks = {name: mask_from_scores(p.detach().abs(), fraction, "layer") for name, p in targets.items()}
    for name, keep in masks.items():
        apply_mask(targets[name], keep)
    context.masks = MaskSet(masks)
    return {}


def test_a_strategy_that_prunes_another_share_stops_with_one_line(loaded_once):
    broken = Strategy("overprune", "prunes 100x its request", _overpruning, options=weight_pruning_options())
    registry = SimpleNamespace(strategy=lambda name: broken)  # the one lookup prune() makes
    with pytest.raises(PrunelabError, match=r"asked for 0\.5% sparsity but pruned 50%") as caught:
        prune(fresh(loaded_once), "overprune", registry=registry, sparsity="0.5%")
    assert "\n" not in str(caught.value)


def test_the_check_counts_the_masks_not_zeros_already_there():
    strategy = Strategy("s", "", lambda *a: {}, options=weight_pruning_options())
    keep = torch.ones(4, 100, dtype=torch.bool)
    keep[:, :10] = False  # 10 % pruned, exactly
    check_achieved_sparsity(strategy, strategy.option_set.validate({"sparsity": 10}), {"w": keep})
    keep[:, :4 + 10] = False  # 14 %: 16 weights over the request, 4 rows allowed
    with pytest.raises(PrunelabError, match="asked for 10% sparsity but pruned 14%"):
        check_achieved_sparsity(strategy, strategy.option_set.validate({"sparsity": 10}), {"w": keep})
    no_sparsity = Strategy("d", "", lambda *a: {})  # a depth strategy: nothing to check
    check_achieved_sparsity(no_sparsity, {}, {"w": keep})
