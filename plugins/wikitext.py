"""WikiText-2 test perplexity the way the pruning papers measure it.

The test split's lines are joined with ``"\\n\\n"`` and tokenized once; the token stream is cut into
non-overlapping windows of ``seqlen`` tokens (default 2048, never the model's 40960-token maximum)
and perplexity is exp of the mean NLL over every predicted token. Windows are the items, so
``--fraction``/``--limit`` choose windows and each window's NLL is kept for paired comparisons.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunelab.data import DataSource, Subset, load_hub_split
from prunelab.engine import Engine
from prunelab.errors import PrunelabError
from prunelab.hookspecs import Evaluator, hookimpl
from prunelab.options import Option
from prunelab.readers import read_utf8
from prunelab.tasks import Item, TaskResult


def lines_from_raw(raw: str) -> list[str]:
    """The Hub dataset's rows from the raw file: each line with its newline, blank lines as ""."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def load_items(source: DataSource, subset: Subset) -> list[Item]:
    root = source.local("wikitext-2")
    if root is not None:
        path = root / "wiki.test.raw"
        if not path.is_file():
            raise PrunelabError(f"data file not found: {path}")
        lines = lines_from_raw(read_utf8(path))
    else:
        lines = [r["text"] for r in load_hub_split("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    text = "\n\n".join(lines)
    if not text.strip():
        raise PrunelabError(f"{path if root is not None else 'WikiText-2'}: the test split is empty")
    # Windows depend on the tokenizer, so the subset is applied when the model is known.
    return [Item("document", "wikitext", {"text": text, "subset": subset})]


_TOKENIZED: dict[tuple[int, int], tuple[Any, str, torch.Tensor]] = {}


def tokenized(tokenizer, text: str) -> torch.Tensor:
    """The text's token ids, computed once per tokenizer and text.

    A study evaluates the same document for every variant and chunk; tokenizing 1.3 MB again each
    time costs seconds per call. Entries keep the tokenizer and text alive, so an id is never reused.
    """
    key = (id(tokenizer), hash(text))
    hit = _TOKENIZED.get(key)
    if hit is None or hit[0] is not tokenizer or hit[1] != text:
        if len(_TOKENIZED) >= 4:
            _TOKENIZED.clear()
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        hit = _TOKENIZED[key] = (tokenizer, text, ids)
    return hit[2]


def evaluate(engine: Engine, items: list[Item], options: dict[str, Any]) -> TaskResult:
    seqlen = options["seqlen"]
    data = items[0].data
    ids = tokenized(engine.tokenizer, data["text"])
    count = ids.numel() // seqlen
    if count == 0:
        raise PrunelabError(f"WikiText-2 has {ids.numel()} tokens, fewer than one window of {seqlen}")
    chosen = data["subset"].select("wikitext", count)
    windows = torch.stack([ids[i * seqlen : (i + 1) * seqlen] for i in chosen])
    sums, counts = engine.window_nll(windows, progress=options.get("progress"))
    records = [
        {"item_id": f"window/{i}", "nll_sum": s, "tokens": c, "correct": None}
        for i, s, c in zip(chosen, sums, counts, strict=True)
    ]
    nll = sum(sums) / sum(counts)
    metrics = {"n": len(records), "perplexity": math.exp(nll), "nll": nll, "seqlen": seqlen, "tokens": sum(counts)}
    return TaskResult("wikitext", metrics, records)


@hookimpl
def prunelab_evaluators() -> list[Evaluator]:
    return [Evaluator(
        name="wikitext",
        description="WikiText-2 test perplexity over non-overlapping windows",
        load_items=load_items,
        evaluate=evaluate,
        options=(Option("seqlen", int, 2048, "window length in tokens",
                        check=lambda v: None if v >= 2 else "must be at least 2"),),
    )]
