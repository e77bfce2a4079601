"""Layer-removal plans: drop-least-important, drop-block, drop-greedy, on tiny models with known answers.

The known answer is built in: a layer whose o_proj and down_proj are zero adds nothing to the
residual stream, so it is an identity (BI = 0, angular distance 0, perplexity unchanged without
it). For perplexity-guided plans the text is sampled from the model itself: by Gibbs' inequality
any change to the model's distribution raises the expected NLL of its own samples, so every other
layer's removal costs perplexity and the identity layers are the unique least harmful choices.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.layer_scores import (
    calibration_perplexity,
    plan_greedy,
    removal_perplexities,
    score_layers,
)
from tests.conftest import DATA, make_identity

WIKITEXT = DATA / "calibration" / "wikitext-2-valid.tokens.txt"



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calibration(calibration_file) -> dict:
    return {"source": calibration_file, "samples": 2, "seqlen": 32}


@pytest.fixture(scope="module")
def tiny_loaded(tiny_qwen3):
    return load_model(str(tiny_qwen3), dtype="float32")


def fresh(loaded, identities=()):
    """A copy of the loaded tiny model with the given layers made identities."""
    model = copy.deepcopy(loaded.model)
    result = dataclasses.replace(loaded, model=model, adapter=adapt(model))
    for index in identities:
        make_identity(result.adapter.layers[index])
    return result


@torch.no_grad()
def own_samples(loaded, count: int = 4, length: int = 40, seed: int = 0) -> torch.Tensor:
    """Token sequences sampled (temperature 1) from the model itself, from a random first token."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, loaded.adapter.embedding.weight.shape[0], (count, 1), generator=generator)
    for _ in range(length - 1):
        hidden = loaded.adapter.decoder(input_ids=tokens, use_cache=False).last_hidden_state[:, -1]
        logits = loaded.adapter.head_logits(hidden).float()
        tokens = torch.cat([tokens, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)], dim=1)
    return tokens


def layer_params(loaded, indices) -> int:
    return sum(p.numel() for i in indices for p in loaded.adapter.layers[i].parameters())


@pytest.mark.parametrize("metric", ["bi", "angular"])
def test_drop_least_important_removes_the_identity_layer(tiny_loaded, calibration, metric):
    loaded = fresh(tiny_loaded, identities=[1])
    expected_removed = layer_params(loaded, [1])
    report = prune(loaded, "drop-least-important", k=1, metric=metric, calibration=calibration)
    assert report["dropped_layers"] == [1]
    assert report["layers_before"] == 4 and report["layers_after"] == 3 == loaded.adapter.num_layers
    assert report["parameters"]["before"] - report["parameters"]["after"] == expected_removed
    assert report["scores"][1] == pytest.approx(0, abs=1e-6) and min(report["scores"][i] for i in (0, 2, 3)) > 1e-3
    assert report["calibration"] == calibration
    assert loaded.model.config.num_hidden_layers == 3


def test_drop_least_important_by_perplexity_on_the_models_own_text(tiny_loaded):
    loaded = fresh(tiny_loaded, identities=[2])
    samples = own_samples(loaded)
    scores = score_layers(loaded.adapter, samples, "ppl")
    assert scores.scores[2] == pytest.approx(0, abs=1e-6 * scores.extra["baseline_perplexity"])
    assert min(scores.scores[i] for i in (0, 1, 3)) > 0  # every real layer's removal costs perplexity
    assert scores.least_important(1) == [2]


def test_drop_block_removes_the_contiguous_identity_block(tiny_loaded, calibration):
    loaded = fresh(tiny_loaded, identities=[2, 3])
    expected_removed = layer_params(loaded, [2, 3])
    report = prune(loaded, "drop-block", k=2, calibration=calibration)
    assert report["dropped_layers"] == [2, 3]
    assert report["angular_distance"] == pytest.approx(0, abs=1e-6)
    assert report["parameters"]["before"] - report["parameters"]["after"] == expected_removed


def test_greedy_removes_the_identity_layers_one_at_a_time(tiny_loaded):
    loaded = fresh(tiny_loaded, identities=[1, 3])
    samples = own_samples(loaded)
    baseline = calibration_perplexity(loaded.adapter, samples)
    first_round = removal_perplexities(loaded.adapter, samples)
    assert all(first_round[i] > baseline for i in (0, 2))  # the construction holds on this sample
    before = sum(p.numel() for p in loaded.model.parameters())
    expected_removed = layer_params(loaded, [1, 3])
    report = plan_greedy(loaded.adapter, samples, 2)
    assert report["dropped_layers"] == [1, 3]  # original indices, although layer 3 sat at position 2 in step 2
    assert [s["removed"] for s in report["steps"]] == [1, 3]
    assert all(s["perplexity"] == pytest.approx(baseline, rel=1e-5) for s in report["steps"])
    assert report["layers_after"] == 2 == loaded.model.config.num_hidden_layers
    assert before - sum(p.numel() for p in loaded.model.parameters()) == expected_removed
    # the pruned model is the dense one without those layers: same perplexity on the same text
    assert calibration_perplexity(loaded.adapter, samples) == pytest.approx(baseline, rel=1e-5)


def test_greedy_rescores_after_each_removal(tiny_loaded, calibration):
    """Through the strategy: each step's choice is the argmin of the perplexities on the model as it is then."""
    loaded = fresh(tiny_loaded)
    reference = fresh(tiny_loaded)
    report = prune(loaded, "drop-greedy", k=2, calibration=calibration)
    from prunelab.prune.layer_scores import importance_samples, importance_spec

    samples = importance_samples(reference.adapter, reference.tokenizer, importance_spec(calibration), seed=0)
    first = removal_perplexities(reference.adapter, samples)
    assert report["steps"][0]["removed"] == min(first, key=first.get)
    assert report["steps"][0]["perplexity"] == pytest.approx(first[report["steps"][0]["removed"]], rel=1e-6)
    remaining = [i for i in range(4) if i != report["steps"][0]["removed"]]
    second = removal_perplexities(reference.adapter, samples, candidates=remaining, skip=[report["steps"][0]["removed"]])
    assert report["steps"][1]["removed"] == min(second, key=second.get)
    assert report["layers_after"] == 2 and len(report["dropped_layers"]) == 2


@pytest.mark.parametrize(("strategy", "options", "message"), [
    ("drop-least-important", {"k": 0}, "must be at least 1"),
    ("drop-least-important", {"k": 4}, "between 1 and 3"),
    ("drop-least-important", {"k": 1, "metric": "cosine"}, "must be one of bi, angular, ppl"),
    ("drop-least-important", {}, "option 'k' is required"),
    ("drop-block", {"k": 4}, "between 1 and 3"),
    ("drop-greedy", {"k": "two"}, "expects int"),
    ("drop-greedy", {"k": 7}, "between 1 and 3"),
])
def test_bad_plan_options_are_clear_errors(tiny_loaded, calibration, strategy, options, message):
    loaded = fresh(tiny_loaded)
    with pytest.raises(PrunelabError, match=message):
        prune(loaded, strategy, calibration=calibration, **options)
    assert loaded.adapter.num_layers == 4  # nothing was removed


def study_text(model, k_values: str) -> str:
    return f"""
model = "{model}"
device = "cpu"
[evaluation]
tasks = ["wikitext"]
data_dir = "{DATA}"
[calibration]
source = "{WIKITEXT}"
samples = 4
seqlen = 64
[[strategies]]
name = "drop-least-important"
k = {k_values}
metric = ["bi", "ppl"]
[[strategies]]
name = "drop-block"
k = {k_values}
[[strategies]]
name = "drop-greedy"
k = {k_values}
"""


def test_a_study_sweeps_k_for_each_plan(tiny_qwen3, tmp_path):
    """K = 1..N/2 for every plan is one study file; a bad K fails when the file is read, before any model loads."""
    from prunelab.runner.studyfile import load_study
    from prunelab.runner.variants import expand_variants

    path = tmp_path / "plans.toml"
    path.write_text(study_text(tiny_qwen3, "[1, 2]"))
    study = load_study(path)
    names = [v.name for v in expand_variants(study, num_layers=4)]
    assert len(names) == 1 + 2 * 2 + 2 + 2 and "drop-greedy[k=2]" in names
    path.write_text(study_text(tiny_qwen3, "[0, 1]"))
    with pytest.raises(PrunelabError, match="option 'k': must be at least 1"):
        load_study(path)


def test_greedy_guided_by_an_evaluation_subset_follows_the_task_loss(tiny_loaded, tmp_path):
    """Each step removes the layer whose removal gives the lowest MMLU choice loss, computed here by
    evaluating every candidate as its own pruned model (no layer sweep) on the same guide items."""
    import shutil

    from prunelab.evaluate.engine import Engine
    from prunelab.evaluate.run import run_task
    from prunelab.model.surgery import drop_layers
    from prunelab.prune.layer_scores import task_loss
    from prunelab.registry import default_registry
    from prunelab_plugins.drop_greedy import guide_task

    for split in ("test", "dev"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for subject in ("anatomy", "astronomy"):
            shutil.copy(DATA / "mmlu" / split / f"{subject}_{split}.csv", tmp_path / "mmlu" / split)
    options = {"guide": "mmlu", "guide_limit": 2, "guide_seqlen": 512, "data_dir": str(tmp_path)}
    loaded = fresh(tiny_loaded)
    report = prune(loaded, "drop-greedy", k=2, **options)  # no calibration needed with a task guide
    task = guide_task(options, seed=0)
    assert report["guide"] == "mmlu" and report["guide_items"] == [i.id for i in task.items] and len(task.items) == 4

    reference = fresh(tiny_loaded)
    alive = list(range(4))
    for step in report["steps"]:
        losses = {}
        for position in range(len(alive)):
            model = copy.deepcopy(reference.model)
            drop_layers(model, [position])
            losses[alive[position]] = task_loss(run_task(Engine(model, reference.tokenizer, adapt(model)), task).records)
        assert step["removed"] == min(losses, key=lambda i: (losses[i], i)), losses
        assert step["task_loss"] == pytest.approx(losses[step["removed"]], rel=1e-5)
        position = alive.index(step["removed"])
        drop_layers(reference.model, [position])
        reference = dataclasses.replace(reference, adapter=adapt(reference.model))
        del alive[position]
    assert report["layers_after"] == 2 and sorted(s["removed"] for s in report["steps"]) == report["dropped_layers"]

    strategy = default_registry().strategy("drop-greedy")
    assert strategy.uses_calibration({"k": 2}) and not strategy.uses_calibration({"k": 2, "guide": "mmlu"})


def test_task_loss_by_hand():
    import math

    from prunelab.prune.layer_scores import task_loss
    lls = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]  # already normalised
    assert task_loss([{"loglikelihoods": lls, "target_index": 1}]) == pytest.approx(-math.log(0.25))
    shifted = [x - 3 for x in lls]  # a softmax over the choices ignores a common shift
    assert task_loss([{"loglikelihoods": shifted, "target_index": 0}, {"loglikelihoods": lls, "target_index": 1}]) \
        == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2)
    assert task_loss([{"nll_sum": 6.0, "tokens": 3}, {"nll_sum": 2.0, "tokens": 1}]) == pytest.approx(2.0)
    with pytest.raises(PrunelabError, match="generate"):
        task_loss([{"generated": "42", "correct": True}])
