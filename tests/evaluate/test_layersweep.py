"""Layer-sweep reuse gives the same per-item results as evaluating each pruned model on its own."""

from __future__ import annotations

import copy

import pytest
import torch

from prunelab.evaluate.engine import Engine, GenerationRequest, LoglikelihoodRequest
from prunelab.evaluate.layersweep import LayerSweep
from prunelab.model.loading import load_model
from prunelab.model.surgery import drop_layers

from ..conftest import QUESTIONS


def naive_engine(lm, removed):
    if removed is None:
        return Engine(lm.model, lm.tokenizer, lm.adapter)
    model = copy.deepcopy(lm.model)
    drop_layers(model, [removed])
    from prunelab.model.adapter import adapt

    return Engine(model, lm.tokenizer, adapt(model))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "llama"])
def test_sweep_equals_naive_per_variant(tiny_models, arch):
    lm = load_model(str(tiny_models[arch]), dtype="float32")
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    sweep = LayerSweep(engine, range(lm.adapter.num_layers))
    requests = [LoglikelihoodRequest(q, [" A", " B", " C", " D", " no way"], "g") for q in QUESTIONS]
    windows = torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(1))
    for removed in sweep.variants():
        view, naive = sweep.view(removed), naive_engine(lm, removed)
        got, expected = torch.tensor(view.loglikelihoods(requests)), torch.tensor(naive.loglikelihoods(requests))
        assert got == pytest.approx(expected, abs=1e-5), removed
        assert (got.argmax(1) == expected.argmax(1)).all()
        assert view.window_nll(windows)[0] == pytest.approx(naive.window_nll(windows)[0], rel=1e-6)
    # the variants differ from each other (the test would pass trivially otherwise)
    firsts = {round(sweep.view(v).loglikelihoods(requests)[0][0], 4) for v in sweep.variants()}
    assert len(firsts) == len(sweep.variants())


def test_sweep_generation_uses_the_pruned_model(tiny_models):
    lm = load_model(str(tiny_models["qwen3"]), dtype="float32")
    sweep = LayerSweep(Engine(lm.model, lm.tokenizer, lm.adapter), [1])
    requests = [GenerationRequest(q, (), 6, "g") for q in QUESTIONS[:3]]
    assert sweep.view(1).generate(requests) == naive_engine(lm, 1).generate(requests)
    assert len(lm.adapter.layers) == 4  # the dense model is untouched
