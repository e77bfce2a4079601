"""What a (pruned) model costs to run: parameters, file size, peak memory, prefill and decode speed.

Throughput is measured the way the engine runs a model: the decoder with a ``DynamicCache`` and the
output head on the last position only. Prefill: one prompt of each length (batch 1), tokens/s =
prompt tokens / seconds until the first next-token logits. Decode: after an untimed prefill of the
shortest prompt length, ``new_tokens`` greedy steps at each batch size, tokens/s = batch x steps /
seconds. Every configuration runs once untimed (warm-up: allocator, kernels, thread pools), then
``repeats`` times; the median is reported with every measurement kept. Prompts are seeded random
token ids: speed does not depend on what the text says.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after a reset (weights + activations +
cache); on CPU the peak resident set size of the process during the measurements (Linux: VmHWM,
reset first via ``/proc/self/clear_refs``; elsewhere the lifetime ``ru_maxrss``), which includes the
weights and the Python/PyTorch runtime.

What to expect. Removing K of N layers speeds up the decoder by N/(N-K) at most; the embedding and
output head are a fixed cost, so the whole model gains less (``expected_speedup`` gives both). A
dense checkpoint full of zeros (unstructured or 2:4 magnitude pruning) does the same dense matmuls
and is not faster. Real 2:4 speed needs sparse kernels: ``semi_structured=True`` converts every 2:4
decoder Linear weight with ``torch.sparse.to_sparse_semi_structured``, which exists on CUDA only.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter
from prunelab.records import (
    DECODE_RATE,
    DECODE_SPEEDUP,
    DENSE,
    PARAMS,
    PREFILL_RATE,
    PREFILL_SPEEDUP,
    STRATEGY,
    VARIANT,
)

DEFAULT_PROMPT_LENGTHS = (128, 512)
DEFAULT_BATCHES = (1, 8)
DEFAULT_NEW_TOKENS = 32
DEFAULT_REPEATS = 3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SEMI_STRUCTURED_NEEDS_CUDA = (
    "--semi-structured needs a CUDA GPU: PyTorch's 2:4 sparse kernels (to_sparse_semi_structured) do not run on CPU"
)


# --------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied head is the embedding, counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ParameterCounts:
    """A model's size as a study compares it: every distinct parameter, those outside the token
    embedding and an untied output head (the "non-embedding" count of the scaling-law papers), and
    how many of them are exactly zero (unstructured pruning stores its zeros: the count stays)."""

    total: int
    non_embedding: int
    zeros: int

    def without(self, other: ParameterCounts) -> ParameterCounts:
        """These counts less a part of the model (one decoder layer's, for a layer-sweep variant)."""
        return ParameterCounts(self.total - other.total, self.non_embedding - other.non_embedding,
                               self.zeros - other.zeros)


def parameter_counts(adapter: Adapter) -> ParameterCounts:
    """Count the parameters of a (pruned) model; a tied head is the embedding, counted once."""
    params = list(adapter.model.parameters())  # distinct tensors: a tied weight appears once
    embedding = {id(p) for module in (adapter.embedding, adapter.head) for p in module.parameters()}
    return ParameterCounts(
        total=sum(p.numel() for p in params),
        non_embedding=sum(p.numel() for p in params if id(p) not in embedding),
        zeros=sum(int((p == 0).sum()) for p in params))


def module_parameter_counts(module: nn.Module) -> ParameterCounts:
    """The counts of one part of a model (a decoder layer holds no embedding)."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    return ParameterCounts(total, total, sum(int((p == 0).sum()) for p in params))


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_file_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files of a model folder (or of one weight file); None when not local."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def expected_speedup(num_layers: int, removed: int, layer_params: int, head_params: int) -> dict[str, float]:
    """Speedup bounds for removing ``removed`` of ``num_layers`` equal layers.

    ``decoder_only``: N/(N-K), the decoder layers alone. ``with_head``: per-token matmul work of
    layers plus the output head (the embedding is a lookup), i.e. the whole model's bound when
    attention over the context is small next to the weights.
    """
    if not 0 <= removed < num_layers:
        raise ValueError(f"need 0 <= removed < num_layers, got {removed} of {num_layers}")
    dense = num_layers * layer_params + head_params
    pruned = (num_layers - removed) * layer_params + head_params
    return {"decoder_only": num_layers / (num_layers - removed), "with_head": dense / pruned}


# --------------------------------------------------------------------------------------------
# Time and memory
# --------------------------------------------------------------------------------------------


def _device(adapter: Adapter) -> torch.device:
    return next(adapter.model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(adapter: Adapter, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids from the embedding's rows, on the model's device."""
    generator = torch.Generator().manual_seed(seed)
    vocab = adapter.embedding.weight.shape[0]
    return torch.randint(0, vocab, (batch, length), generator=generator).to(_device(adapter))


def _new_cache(adapter: Adapter):
    from transformers import DynamicCache

    return DynamicCache(config=adapter.model.config)


@torch.inference_mode()
def prefill(adapter: Adapter, tokens: torch.Tensor):
    """Run a prompt into a fresh KV cache; returns (cache, next token ids) like the engine's generation."""
    out = adapter.decoder(input_ids=tokens, cache=_new_cache(adapter), use_cache=True)
    next_ids = adapter.head_logits(out.last_hidden_state[:, -1]).argmax(-1)
    return out.cache, next_ids


@torch.inference_mode()
def time_prefill(adapter: Adapter, tokens: torch.Tensor) -> float:
    """Seconds from a prompt to its next-token logits."""
    device = _device(adapter)
    _sync(device)
    start = time.perf_counter()
    prefill(adapter, tokens)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode(adapter: Adapter, cache, next_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy steps from a prefilled cache; returns the (batch, steps + 1) generated ids."""
    generated = [next_ids]
    for _ in range(steps):
        out = adapter.decoder(input_ids=next_ids[:, None], cache=cache, use_cache=True)
        cache = out.cache
        next_ids = adapter.head_logits(out.last_hidden_state[:, -1]).argmax(-1)
        generated.append(next_ids)
    return torch.stack(generated, dim=1)


@torch.inference_mode()
def time_decode(adapter: Adapter, tokens: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy decoding steps after an (untimed) prefill of ``tokens``."""
    device = _device(adapter)
    cache, next_ids = prefill(adapter, tokens)
    _sync(device)
    start = time.perf_counter()
    decode(adapter, cache, next_ids, new_tokens)
    _sync(device)
    return time.perf_counter() - start


def timed(measure: Callable[[], float], repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Median seconds of ``repeats`` runs after ``warmup`` untimed ones, with every run kept."""
    for _ in range(warmup):
        measure()
    runs = [measure() for _ in range(repeats)]
    return {"seconds": statistics.median(runs), "runs": runs}


class PeakMemory:
    """Peak memory while the block runs: CUDA max allocated, or the process's peak resident set on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return self
        try:  # Linux: "5" resets VmHWM (the peak RSS) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "cpu peak RSS (VmHWM, reset at start)"
        except OSError:
            self.kind = "cpu peak RSS of the whole process (ru_maxrss)"
        return self

    def __exit__(self, *exc) -> None:
        return None

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind.startswith("cpu peak RSS (VmHWM"):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


# --------------------------------------------------------------------------------------------
# 2:4 semi-structured sparse kernels (CUDA)
# --------------------------------------------------------------------------------------------


def follows_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input weights of every row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(-1) <= 2).all())


def convert_semi_structured(adapter: Adapter) -> dict[str, Any]:
    """Replace every 2:4 decoder Linear weight by a ``SparseSemiStructuredTensor`` (CUDA only).

    Weights that are not 2:4, or whose shape/dtype the kernels reject, stay dense and are listed.
    """
    if _device(adapter).type != "cuda":
        raise PrunelabError(SEMI_STRUCTURED_NEEDS_CUDA)
    from torch.sparse import to_sparse_semi_structured

    converted, skipped = 0, {}
    for index in range(adapter.num_layers):
        for name, module in adapter.linear_modules(index).items():
            key = f"layers.{index}.{name}"
            if not follows_2_4(module.weight):
                skipped[key] = "not 2:4 sparse"
                continue
            try:
                sparse = to_sparse_semi_structured(module.weight.detach())
            except (RuntimeError, ValueError, TypeError) as exc:
                skipped[key] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                continue
            module.weight = nn.Parameter(sparse, requires_grad=False)
            converted += 1
    if not converted:
        raise PrunelabError("no decoder Linear weight could use the 2:4 kernels: prune with --pattern 2:4 first "
                            f"(e.g. {next(iter(skipped.items()), ('', ''))[1]})")
    return {"converted": converted, "skipped": skipped}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    values = [int(v) for v in values]
    if not values or any(v < 1 for v in values):
        raise PrunelabError(f"{what} must be positive integers, got {values}")
    return values


def parse_int_list(text: str, what: str) -> list[int]:
    """``"128,512"`` -> [128, 512], with a one-line error for anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PrunelabError(f"{what}: expected comma-separated integers such as 1,8, got {text!r}") from None
    return _positive_ints(values, what)


def measure(adapter: Adapter, *, prompt_lengths: Sequence[int] = DEFAULT_PROMPT_LENGTHS,
            batches: Sequence[int] = DEFAULT_BATCHES, new_tokens: int = DEFAULT_NEW_TOKENS,
            repeats: int = DEFAULT_REPEATS, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """Prefill and decode throughput and peak memory of an adapted model (see the module docstring)."""
    prompt_lengths = _positive_ints(prompt_lengths, "prompt lengths")
    batches = _positive_ints(batches, "batch sizes")
    new_tokens, repeats = _positive_ints([new_tokens], "new tokens")[0], _positive_ints([repeats], "repeats")[0]
    window = getattr(adapter.text_config, "max_position_embeddings", None)
    if window and max(prompt_lengths) + new_tokens > window:
        raise PrunelabError(f"prompt length {max(prompt_lengths)} + {new_tokens} new tokens exceeds the model's "
                            f"context of {window} tokens")
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with PeakMemory(_device(adapter)) as memory:
            prefill_rows = []
            for length in prompt_lengths:
                tokens = random_prompts(adapter, 1, length, seed)
                result = timed(lambda tokens=tokens: time_prefill(adapter, tokens), repeats, warmup)
                prefill_rows.append({"batch": 1, "prompt_length": length, **result,
                                     "tokens_per_s": length / result["seconds"]})
            decode_rows = []
            context = min(prompt_lengths)
            for batch in batches:
                tokens = random_prompts(adapter, batch, context, seed)
                result = timed(lambda tokens=tokens: time_decode(adapter, tokens, new_tokens), repeats, warmup)
                decode_rows.append({"batch": batch, "prompt_length": context, "new_tokens": new_tokens, **result,
                                    "tokens_per_s": batch * new_tokens / result["seconds"]})
    finally:
        adapter.model.train(was_training)
    return {"prefill": prefill_rows, "decode": decode_rows, "peak_memory_bytes": memory.peak_bytes(),
            "peak_memory_kind": memory.kind, "repeats": repeats, "warmup": warmup}


def bench_model(model, *, device: str = "auto", dtype: str = "auto",
                prompt_lengths: Sequence[int] = DEFAULT_PROMPT_LENGTHS, batches: Sequence[int] = DEFAULT_BATCHES,
                new_tokens: int = DEFAULT_NEW_TOKENS, repeats: int = DEFAULT_REPEATS, warmup: int = 1,
                semi_structured: bool = False, seed: int = 0, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> dict[str, Any]:
    """Measure what a model costs on this machine; ``model`` is a path/Hub id or a ``LoadedModel``.

    Returns a JSON-able dict: model, device, dtype, threads, decoder layers, parameters, weight
    bytes (in memory and on disk), peak memory, and the prefill and decode rows with tokens/s.
    """
    from prunelab.model.loading import choose_device, load_model

    if isinstance(model, (str, os.PathLike)):
        if semi_structured and choose_device(device).type != "cuda":
            raise PrunelabError(SEMI_STRUCTURED_NEEDS_CUDA)  # before a long model load
        loaded = load_model(str(model), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    else:
        loaded = model
    adapter = loaded.adapter
    sparse = convert_semi_structured(adapter) if semi_structured else None
    facts = {
        "model": str(loaded.source), "device": str(loaded.device), "dtype": loaded.dtype_name,
        "threads": torch.get_num_threads() if loaded.device.type == "cpu" else None,
        "decoder_layers": adapter.num_layers, "parameters": parameter_count(adapter.model),
        "parameter_bytes": parameter_bytes(adapter.model),
        "weights_file_bytes": weight_file_bytes(loaded.local_dir),
        "source_file_bytes": weight_file_bytes(loaded.source) if loaded.kind != "hub" else None,
        "semi_structured": sparse,
    }
    results = measure(adapter, prompt_lengths=prompt_lengths, batches=batches, new_tokens=new_tokens,
                      repeats=repeats, warmup=warmup, seed=seed)
    return {**facts, **results}


# --------------------------------------------------------------------------------------------
# One table for a study's variants
# --------------------------------------------------------------------------------------------


def bench_rows(measured: Sequence[tuple[str, str, str, dict[str, Any]]]):
    """A Polars table, one row per ``(variant, strategy, params_json, measure() result)``.

    Columns: parameters, decoder layers, peak memory (MiB), prefill tokens/s per prompt length,
    decode tokens/s per batch size, and the speedup of each against the dense variant's (when the
    study measured it): ``prefill_speedup`` at the longest prompt, ``decode_speedup`` at the first
    batch size -- the numbers to read against each variant's accuracy.
    """
    import polars as pl

    rows = []
    for variant, strategy, params, result in measured:
        row = {VARIANT: variant, STRATEGY: strategy, PARAMS: params, "parameters": result["parameters"],
               "decoder_layers": result["decoder_layers"],
               "peak_memory_mib": result["peak_memory_bytes"] / 2**20 if result.get("peak_memory_bytes") else None}
        row |= {f"{PREFILL_RATE}{r['prompt_length']}": r["tokens_per_s"] for r in result["prefill"]}
        row |= {f"{DECODE_RATE}{r['batch']}": r["tokens_per_s"] for r in result["decode"]}
        rows.append(row)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    prefill = max((c for c in frame.columns if c.startswith(PREFILL_RATE)),
                  key=lambda c: int(c.removeprefix(PREFILL_RATE)))
    decode = next(c for c in frame.columns if c.startswith(DECODE_RATE))
    dense = frame.filter(pl.col(STRATEGY) == DENSE)
    for name, column in ((PREFILL_SPEEDUP, prefill), (DECODE_SPEEDUP, decode)):
        base = dense[column][0] if len(dense) else None
        # Divided in Python, not as a Polars expression: Polars multiplies by 1/base, which leaves
        # the dense row at 0.9999999999999999 instead of exactly 1.
        ratios = [value / base if base and value is not None else None for value in frame[column].to_list()]
        frame = frame.with_columns(pl.Series(name, ratios, dtype=pl.Float64))
    return frame
