"""Evaluate "the model without layer i" for many i at once, reusing layers 0..i-1.

With layer i removed, layers 0..i-1 compute exactly what they computed in the dense model. So for
every micro-batch the dense pass records the input of each layer, and each variant then runs only
layers i+1..N-1 starting from the recorded input of layer i. A single-layer sweep of N layers costs
N + N(N-1)/2 layer evaluations instead of N + N(N-1) (about half), with bitwise the same inputs
per layer as evaluating each pruned model on its own: the micro-batches are the same.

The few-shot prefix gets the same treatment: one dense prefix pass, then one tail pass per
variant; layers below the removed one reuse the dense prefix cache.

``LayerSweep.view(i)`` is an ``Engine`` for the variant without layer ``i`` (``None``: dense). The
first log-likelihood or perplexity request on any view computes all variants at once and memoizes
them, so evaluator plugins run unchanged. Generation cannot share work past the prompt, so a view
generates with its own pruned copy of the model.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import DynamicCache

from prunelab.errors import PrunelabError
from prunelab.evaluate.engine import (
    DenseReference,
    Engine,
    GenerationRequest,
    LoglikelihoodRequest,
    WindowScores,
    expanded_cache,
    request_groups,
    right_padded,
    window_token_scores,
)
from prunelab.model.adapter import adapt, layer_input
from prunelab.model.surgery import drop_layers

Variant = int | None  # removed layer index; None is the dense model


class LayerSweep:
    """Shared computation for the dense model and each single-layer removal in ``removed``."""

    def __init__(self, engine: Engine, removed: Sequence[int]) -> None:
        self.engine = engine
        self.removed = list(removed)
        adapter = engine.adapter
        if any(not 0 <= i < adapter.num_layers for i in self.removed):
            raise PrunelabError(f"layer sweep: indices must be in 0..{adapter.num_layers - 1}")
        self.final_norm = getattr(adapter.decoder, "norm", None)
        if self.final_norm is None:
            raise PrunelabError(f"layer sweep: {type(adapter.model).__name__} has no final norm to hook")
        self._memo: dict[str, dict[Variant, object]] = {}
        self._pruned_models: dict[int, nn.Module] = {}

    @staticmethod
    def supports(adapter) -> bool:
        """Whether the decoder has the final norm the sweep hooks (every HF decoder-only LM here does)."""
        return getattr(adapter.decoder, "norm", None) is not None

    def variants(self) -> list[Variant]:
        return [None, *self.removed]

    def view(self, removed: Variant) -> SweepView:
        """The ``Scorer`` of one variant (None: the dense model)."""
        return SweepView(self, removed)

    # ------------------------------------------------------------------ log-likelihoods
    def loglikelihoods(self, requests, variant: Variant, progress=None) -> list[list[float]]:
        key = "ll:" + _fingerprint((r.context, tuple(r.continuations), r.group) for r in requests)
        if key not in self._memo:
            self._memo[key] = self._sweep_loglikelihoods(requests, progress)
        elif progress:
            progress(len(requests))
        return self._memo[key][variant]

    @torch.inference_mode()
    def _sweep_loglikelihoods(self, requests, progress) -> dict[Variant, list[list[float]]]:
        engine = self.engine
        results = {v: [[0.0] * len(r.continuations) for r in requests] for v in self.variants()}
        for indices in request_groups(requests):
            sequences = engine._scoring_sequences(requests, indices)
            prefix_len = engine._shared_prefix_length([s.tokens for s in sequences])
            caches = self._prefix_caches(sequences[0].tokens[:prefix_len])
            order = sorted(range(len(sequences)), key=lambda j: -len(sequences[j].tokens))
            lengths = [len(s.tokens) - prefix_len for s in sequences]
            for batch in engine._micro_batches(order, lengths, prefix_len):
                suffixes = [sequences[j].tokens[prefix_len:] for j in batch]
                ids = right_padded(suffixes).to(engine.device)
                positions = torch.arange(prefix_len, prefix_len + ids.shape[1], device=engine.device).expand(len(batch), -1)
                for variant, hidden in self._all_variants(ids, positions, caches, len(batch)):
                    for row, j in enumerate(batch):
                        for (i, k), value in engine._target_logprobs(hidden[row], len(suffixes[row]), sequences[j]):
                            results[variant][i][k] = value
            if progress:
                progress(len(indices))
        return results

    def _prefix_caches(self, tokens: list[int]) -> dict[Variant, DynamicCache | None]:
        """The prefix's KV cache for every variant: one dense pass plus one tail pass per variant."""
        if not tokens:
            return dict.fromkeys(self.variants())
        config = self.engine.model.config
        ids = torch.tensor([tokens], device=self.engine.device)
        dense = DynamicCache(config=config)
        inputs, _ = self._dense_pass(ids, None, dense)
        caches: dict[Variant, DynamicCache | None] = {None: dense}
        for i in self.removed:
            cache = DynamicCache(config=config)
            self._tail_pass(ids, None, cache, inputs[i], i)
            for layer in range(i + 1):  # layers before the removed one are the dense ones (layer i is unused)
                cache.layers[layer] = dense.layers[layer]
            caches[i] = cache
        return caches

    def _all_variants(self, ids, positions, caches, batch: int):
        """Hidden states of the dense model and of each variant for one micro-batch."""
        config = self.engine.model.config
        inputs, dense_hidden = self._dense_pass(ids, positions, expanded_cache(caches[None], batch, config))
        yield None, dense_hidden
        for i in self.removed:
            yield i, self._tail_pass(ids, positions, expanded_cache(caches[i], batch, config), inputs[i], i)

    # ------------------------------------------------------------------ perplexity
    def window_scores(self, windows: torch.Tensor, variant: Variant, *, fidelity: bool = False, progress=None,
                      head_chunk: int = 512) -> WindowScores:
        """A variant's window scores; ``fidelity``: with KL/top-1 against the dense pass and dense hidden states.

        The sweep's dense pass *is* the dense reference (the same windows, bitwise the same
        computation as the dense model alone), so every variant is compared with it in the pass
        that computes it; no stored reference is read.
        """
        key = f"nll:{fidelity}:" + _fingerprint([windows.numpy().tobytes(), head_chunk])
        if key not in self._memo:
            self._memo[key] = self._sweep_window_scores(windows, progress, head_chunk, fidelity)
        elif progress:
            progress(len(windows))
        return self._memo[key][variant]

    def window_nll(self, windows: torch.Tensor, variant: Variant, progress=None, head_chunk: int = 512):
        scores = self.window_scores(windows, variant, progress=progress, head_chunk=head_chunk)
        return scores.nll_sums, scores.counts

    @torch.inference_mode()
    def _sweep_window_scores(self, windows, progress, head_chunk, fidelity: bool) -> dict[Variant, WindowScores]:
        results = {v: WindowScores() for v in self.variants()}
        adapter = self.engine.adapter
        for window in windows:
            ids = window[None].to(self.engine.device)
            dense_hidden = None
            for variant, hidden in self._all_variants(ids, None, dict.fromkeys(self.variants()), 1):
                if variant is None:
                    dense_hidden = hidden[0]
                    scored = window_token_scores(adapter, hidden[0], ids[0], head_chunk)
                    results[None].add(*scored, hidden[0] if fidelity else None)
                else:
                    reference = dense_hidden if fidelity else None
                    results[variant].add(*window_token_scores(adapter, hidden[0], ids[0], head_chunk, reference), None)
            if progress:
                progress(1)
        return results

    # ------------------------------------------------------------------ generation
    def pruned_model(self, removed: int) -> nn.Module:
        """A copy of the model without layer ``removed`` (generation shares nothing past the prompt)."""
        if removed not in self._pruned_models:
            self._pruned_models.clear()  # keep at most one copy in memory
            model = copy.deepcopy(self.engine.model)
            drop_layers(model, [removed])
            self._pruned_models[removed] = model
        return self._pruned_models[removed]

    # ------------------------------------------------------------------ the two passes
    def _dense_pass(self, ids, positions, cache) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Full forward recording each layer's input hidden states."""
        inputs: list[torch.Tensor] = []

        def record(module, args, kwargs):
            inputs.append(layer_input(args, kwargs))

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.engine.adapter.layers]
        try:
            out = self.engine.adapter.decoder(input_ids=ids, position_ids=positions, cache=cache, use_cache=cache is not None)
        finally:
            for handle in handles:
                handle.remove()
        return inputs, out.last_hidden_state

    def _tail_pass(self, ids, positions, cache, hidden_in: torch.Tensor, removed: int) -> torch.Tensor:
        """Run only layers after ``removed``, starting from the recorded input of layer ``removed``."""
        adapter = self.engine.adapter
        tail = list(range(removed + 1, adapter.num_layers))
        entry = adapter.layers[tail[0]] if tail else self.final_norm
        with _only_layers(adapter, tail), _replace_input(entry, hidden_in):
            out = adapter.decoder(input_ids=ids, position_ids=positions, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state


class SweepView:
    """One variant of a sweep behind the ``Scorer`` interface: scoring is served from the shared sweep.

    It holds the sweep's engine (for the tokenizer and settings), never a copy of its state, so a
    change to the engine's settings is seen by every view.
    """

    def __init__(self, sweep: LayerSweep, removed: Variant) -> None:
        self.sweep = sweep
        self.removed = removed

    @property
    def tokenizer(self):
        return self.sweep.engine.tokenizer

    @property
    def adapter(self):
        """The dense model's adapter: a removed layer only skips a layer, the head is the dense one."""
        return self.sweep.engine.adapter

    @property
    def chat_template(self) -> bool:
        return self.sweep.engine.chat_template

    def loglikelihoods(self, requests: Sequence[LoglikelihoodRequest], progress=None) -> list[list[float]]:
        return self.sweep.loglikelihoods(requests, self.removed, progress)

    def window_nll(self, windows: torch.Tensor, progress=None, head_chunk: int = 512) -> tuple[list[float], list[int]]:
        return self.sweep.window_nll(windows, self.removed, progress, head_chunk)

    def window_scores(self, windows: torch.Tensor, *, reference: DenseReference | None = None,
                      keep_hidden: bool = False, progress=None, head_chunk: int = 512) -> WindowScores:
        fidelity = reference is not None or keep_hidden
        return self.sweep.window_scores(windows, self.removed, fidelity=fidelity, progress=progress,
                                        head_chunk=head_chunk)

    def generate(self, requests: Sequence[GenerationRequest], progress=None) -> list[str]:
        """Generation diverges after the prompt: the variant's own pruned model generates."""
        engine = self.sweep.engine
        if self.removed is None:
            return engine.generate(requests, progress)
        model = self.sweep.pruned_model(self.removed)
        pruned = Engine(model, engine.tokenizer, adapt(model), batch_tokens=engine.batch_tokens,
                        max_batch=engine.max_batch, prefix_cache=engine.prefix_cache,
                        chat_template=engine.chat_template, enable_thinking=engine.enable_thinking,
                        max_length=engine.max_length)
        return pruned.generate(requests, progress)


@contextmanager
def _only_layers(adapter, keep: list[int]):
    """Temporarily make the decoder iterate over a subset of its layers (their cache slots unchanged)."""
    original = adapter.layers
    setattr(adapter.layers_owner, adapter.layers_attr, nn.ModuleList([original[k] for k in keep]))
    try:
        yield
    finally:
        setattr(adapter.layers_owner, adapter.layers_attr, original)


@contextmanager
def _replace_input(module: nn.Module, hidden: torch.Tensor):
    """Feed ``hidden`` to ``module`` in place of the hidden states it would receive."""
    def substitute(mod, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = module.register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _fingerprint(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()

