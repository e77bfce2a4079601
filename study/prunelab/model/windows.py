"""Cutting token windows: the one code path for perplexity windows, calibration and layer importance.

A window starts the way the model's tokenizer starts a text. Where the tokenizer puts BOS in front
of every text it encodes (Llama-2, Gemma), or lm-evaluation-harness asks for it (Gemma; see
``Adapter.adds_bos``), a window is BOS followed by ``seqlen - 1`` text tokens; otherwise (Qwen,
SmolLM2, GPT-2 style tokenizers) it is ``seqlen`` text tokens. Either way the model sees ``seqlen``
inputs and ``seqlen - 1`` tokens are scored, so the scored token count does not depend on the choice.

The papers' protocol (GPTQ, SparseGPT, Wanda) tokenizes the whole test text once -- with one BOS at
its very start where the tokenizer adds it -- and cuts it into windows of ``seqlen``: only their first
window starts with BOS, every other one starts mid-text without it. A model trained to always see BOS
first (Gemma) then scores 3-6x worse on windows 2..N, which measures the missing token, not the model.
prunelab gives every window the start the model expects; for tokenizers without BOS (the Qwen family)
the windows are exactly the papers' ones. See docs/perplexity.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def window_bos(tokenizer, adapter=None) -> int | None:
    """The BOS id a window starts with, or None: BOS where the tokenizer adds it to a text (or the model needs it)."""
    if tokenizer is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if adapter is not None and adapter.adds_bos:
        return bos
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def text_width(seqlen: int, bos: int | None) -> int:
    """Text tokens per window: one fewer where BOS takes the first position."""
    return seqlen - (1 if bos is not None else 0)


def window_count(num_tokens: int, seqlen: int, bos: int | None) -> int:
    """How many non-overlapping windows a text of ``num_tokens`` tokens holds."""
    return num_tokens // text_width(seqlen, bos)


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """Rows of text tokens, BOS prepended to each where the model starts texts with it."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def windows_at(ids: torch.Tensor, starts: Sequence[int], seqlen: int, bos: int | None) -> torch.Tensor:
    """The windows whose text begins at each of ``starts`` (a LongTensor of shape (len(starts), seqlen))."""
    width = text_width(seqlen, bos)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if any(s < 0 or s + width > ids.numel() for s in starts):
        raise ValueError(f"a window of {width} text tokens does not fit in {ids.numel()} tokens")
    rows = torch.stack([ids[s : s + width] for s in starts]) if starts else torch.zeros((0, width), dtype=torch.long)
    return with_bos(rows, bos)


def consecutive_windows(ids: torch.Tensor, indices: Sequence[int], seqlen: int, bos: int | None) -> torch.Tensor:
    """Windows number ``indices`` of the text cut into non-overlapping windows (WikiText perplexity)."""
    width = text_width(seqlen, bos)
    return windows_at(ids, [i * width for i in indices], seqlen, bos)
