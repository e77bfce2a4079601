"""Wanda against direct computations: one layer by hand, a whole tiny model by plain full forwards."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab_plugins.wanda import wanda_keep_mask
from tests.conftest import DATA

CALIBRATION = {"source": str(DATA / "calibration" / "wikitext-2-valid.tokens.txt"), "samples": 4, "seqlen": 32}


def loaded_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(str(path), dtype="float32")


def test_wanda_mask_of_one_layer_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 8, generator=gen)
    X = torch.randn(30, 8, generator=gen) * torch.tensor([0.1, 1, 3, 1, 0.5, 2, 1, 10])
    norms = X.norm(dim=0)
    keep = wanda_keep_mask(W, norms, 0.5)
    for i in range(5):  # per output row: the 4 lowest |W_ij| * ||X_j|| go
        scores = [abs(W[i, j].item()) * float((X[:, j] ** 2).sum()) ** 0.5 for j in range(8)]
        lowest = sorted(range(8), key=lambda j: scores[j])[:4]
        assert [not keep[i, j].item() for j in range(8)] == [j in lowest for j in range(8)]


def test_wanda_ties_never_over_or_under_prune():
    W = torch.ones(3, 10)
    keep = wanda_keep_mask(W, torch.ones(10), 0.3)
    assert (keep.sum(dim=1) == 7).all()


def _accumulate_squares(total: torch.Tensor):
    def hook(module, args, output) -> None:
        total.add_((args[0][0] ** 2).sum(0))
    return hook


def _expected_wanda_weights(model, samples: torch.Tensor, sparsity: float):
    """Wanda done the slow, obvious way: per layer, full forwards of the partly pruned model."""
    from prunelab.model.adapter import adapt

    reference = copy.deepcopy(model)
    adapter = adapt(reference)
    for layer in adapter.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        squares = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        handles = [m.register_forward_hook(_accumulate_squares(squares[n])) for n, m in linears.items()]
        with torch.no_grad():
            for row in range(samples.shape[0]):
                reference.model(input_ids=samples[row : row + 1], use_cache=False)
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, module in linears.items():
                scores = module.weight.abs() * squares[name].sqrt()[None, :]
                k = round(sparsity * module.in_features)
                order = scores.argsort(dim=1)  # plain sort per row
                module.weight.scatter_(1, order[:, :k], 0.0)
    return reference


def test_wanda_on_a_tiny_model_matches_sequential_full_forwards(tiny_qwen3):
    from prunelab.prune.calibration import CalibrationSpec, calibration_samples

    lm = loaded_model(tiny_qwen3)
    samples = calibration_samples(lm.tokenizer, CalibrationSpec.from_mapping(CALIBRATION), seed=5)
    expected = _expected_wanda_weights(lm.model, samples, 0.5)
    report = prune(lm, "wanda", sparsity=50, seed=5, calibration=CALIBRATION)
    expected_params = dict(expected.named_parameters())
    checked = 0
    for name, param in lm.model.named_parameters():  # pruned Linears equal; norms, embedding untouched
        torch.testing.assert_close(param, expected_params[name], rtol=0, atol=0)
        checked += name.endswith("proj.weight") and bool((param == 0).any())
    assert checked == 4 * 7
    assert report["sparsity"]["total"]["sparsity_pct"] == 50.0
    assert report["calibration"] == {**CALIBRATION}
    assert len(report.masks) == 28
    for name, keep in report.masks.items():  # the kept masks are exactly the zeros
        layer = int(name.split(".")[1])
        weight = lm.adapter.layers[layer].get_parameter(name.split(".", 2)[2])
        assert torch.equal(keep, weight != 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_pattern_group_by_group(tiny_qwen3, pattern):
    n, m = map(int, pattern.split(":"))
    lm = loaded_model(tiny_qwen3)
    report = prune(lm, "wanda", pattern=pattern, calibration=CALIBRATION)
    assert report["sparsity"]["total"]["sparsity_pct"] == pytest.approx(100 * (1 - n / m))
    for index in range(lm.adapter.num_layers):
        for name, module in lm.adapter.linear_modules(index).items():
            groups = module.weight.reshape(-1, m)
            assert ((groups != 0).sum(dim=1) == n).all(), f"layer {index} {name}"


def test_wanda_with_owl_gives_non_uniform_layers_with_the_target_total(tiny_qwen3):
    lm = loaded_model(tiny_qwen3)
    report = prune(lm, "wanda", sparsity=50, allocation="owl", owl_lambda=0.1, calibration=CALIBRATION)
    per_layer = [report["sparsity"]["per_layer"][str(i)]["sparsity_pct"] for i in range(4)]
    assert report["allocation"] == "owl"
    assert max(per_layer) - min(per_layer) > 5  # spread over +-lambda
    for achieved, planned in zip(per_layer, report["layer_sparsity_pct"], strict=True):
        assert abs(achieved - planned) < 0.5  # within rounding of one weight per row
    assert report["sparsity"]["total"]["sparsity_pct"] == pytest.approx(50, abs=0.2)
    ratios = report["outlier_ratio_pct"]  # more outliers -> lower sparsity
    assert ratios.index(max(ratios)) == per_layer.index(min(per_layer))


def test_wanda_bad_options(tiny_qwen3):
    lm = loaded_model(tiny_qwen3)
    with pytest.raises(PrunelabError, match="N:M"):
        prune(lm, "wanda", pattern="2:4", allocation="owl", calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="percentage"):
        prune(lm, "wanda", sparsity=150, calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="contradicts"):
        prune(lm, "wanda", sparsity=30, pattern="2:4", calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="allocation"):
        prune(lm, "wanda", allocation="bogus", calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="unknown calibration key"):
        prune(lm, "wanda", calibration={"nsamples": 4})
    assert all(float(p.count_nonzero()) == p.numel() for n, p in lm.model.named_parameters() if "proj" in n)
