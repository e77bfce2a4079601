"""The engine against plain Hugging Face computations on tiny models of four architectures."""

from __future__ import annotations

import pytest
import torch

from prunelab.evaluate.engine import Engine, GenerationRequest, LoglikelihoodRequest
from prunelab.model.loading import load_model

from ..conftest import PREFIX, QUESTIONS

ARCHS = ["qwen3", "qwen2", "llama", "gemma3"]


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return {arch: load_model(str(tiny_models[arch]), dtype="float32") for arch in ARCHS}


def reference_loglikelihood(lm, engine: Engine, context: str, continuation: str) -> float:
    """Plain full-sequence scoring: one forward over context+continuation, sum of target log-probs."""
    ctx, cont = engine.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_prefix_scoring_equals_full_sequence_scoring(loaded, arch):
    lm = loaded[arch]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    continuations = [" A", " B", " C", " D", " Paris is nice"]
    requests = [LoglikelihoodRequest(q, continuations, "algebra") for q in QUESTIONS]
    got = engine.loglikelihoods(requests)
    for q, row in zip(QUESTIONS, got, strict=True):
        expected = [reference_loglikelihood(lm, engine, q, c) for c in continuations]
        assert row == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_batched_equals_unbatched(loaded, arch):
    lm = loaded[arch]
    requests = [LoglikelihoodRequest(q, [" A", " B", " C", " D"], "g") for q in QUESTIONS]
    batched = Engine(lm.model, lm.tokenizer, lm.adapter).loglikelihoods(requests)
    single = Engine(lm.model, lm.tokenizer, lm.adapter, max_batch=1, prefix_cache=False).loglikelihoods(requests)
    assert torch.tensor(batched) == pytest.approx(torch.tensor(single), abs=1e-4)


def test_prefix_is_actually_shared(loaded):
    lm = loaded["qwen3"]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    tokens = [engine.encode(q) for q in QUESTIONS]
    shared = engine._shared_prefix_length(tokens)
    assert shared > len(engine.encode(PREFIX)) - 3  # the few-shot block (up to the BPE-split boundary)
    assert all(t[:shared] == tokens[0][:shared] for t in tokens)


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma3"])
def test_generation_matches_hf_greedy_generate(loaded, arch):
    lm = loaded[arch]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    requests = [GenerationRequest(q, stop=(), max_new_tokens=10, group="g") for q in QUESTIONS]
    got = engine.generate(requests)
    for q, text in zip(QUESTIONS, got, strict=True):
        ids = torch.tensor([engine.encode(q)])
        out = lm.model.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
        assert text == lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generation_stops_at_stop_string(loaded):
    lm = loaded["qwen3"]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    free = engine.generate([GenerationRequest(QUESTIONS[0], (), 12)])[0]
    stop = free[3:6]
    assert stop and stop in free
    cut = engine.generate([GenerationRequest(QUESTIONS[0], (stop,), 12)])[0]
    assert cut == free.split(stop)[0]


def test_window_nll_equals_hf_loss(loaded):
    lm = loaded["llama"]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    windows = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    sums, counts = engine.window_nll(windows, head_chunk=16)
    for window, total, count in zip(windows, sums, counts, strict=True):
        with torch.no_grad():
            loss = lm.model(window[None], labels=window[None]).loss.item()
        assert count == 39
        assert total / count == pytest.approx(loss, rel=1e-4)


def test_encode_pair_moves_trailing_space_like_lm_eval(loaded):
    lm = loaded["qwen3"]
    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    ctx, cont = engine.encode_pair("Answer: ", "B")
    assert ctx == engine.encode("Answer:")
    assert lm.tokenizer.decode(cont) == " B"
