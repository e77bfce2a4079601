"""WikiText-2 test perplexity the way the pruning papers measure it.

The test split's lines are joined with ``"\\n\\n"`` and tokenized once; the token stream is cut into
non-overlapping windows of ``seqlen`` tokens (default 2048, never the model's 40960-token maximum)
and perplexity is exp of the mean NLL over every predicted token. Windows are the items, so
``--fraction``/``--limit`` choose windows and each window's NLL is kept for paired comparisons.
A window starts as the model's tokenizer starts a text: BOS first where it adds one
(``prunelab.model.windows``, shared with calibration), with ``seqlen - 1`` scored tokens either way.

Fidelity to the dense model (llama.cpp's ``perplexity --kl-divergence``): in a study the dense
model's evaluation stores its final hidden states per chunk (``DenseReference``) and its output head
once per run; each variant's evaluation of the same windows recomputes the exact dense next-token
distribution from them (with the dense head, also where the variant's own head differs) and
records, per window, the mean KL(dense || variant) over its scored tokens (``kl_mean``), the share of
tokens whose top-1 token agrees with dense (``top1_agree``) and every token's KL (``kl_tokens``, 4
significant digits) for the 99th percentile over all tokens of a variant.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.evaluate import (
    DataSource,
    DenseReference,
    Subset,
    WindowScores,
    head_fingerprint,
    load_hub_split,
)
from prunelab.model import consecutive_windows, window_bos, window_count
from prunelab.plugin import Evaluator, Item, MetricSpec, Option, Scorer, TaskResult, hookimpl
from prunelab.readers import read_utf8

# Fidelity tolerances (settable per study, ``[tolerance]``). KL: 0.01 nats per token, the upper end
# of the mean KLD that llama.cpp users read as a practically lossless quantization (about 0.001-0.01,
# ``llama-perplexity --kl-divergence``). Same top token: 1 percentage point of changed top tokens,
# our choice of the same order (a model within 0.01 nats rarely changes more).
KL_TOLERANCE = 0.01
TOP1_TOLERANCE = 0.01

METRICS = (
    MetricSpec("perplexity", "perplexity", None, higher_is_better=False, label="perplexity"),
    MetricSpec("kl_mean", "mean", "kl_mean", higher_is_better=False,
               label="KL(dense || variant), mean per token (nats)", tolerance=KL_TOLERANCE,
               fidelity="divergence", per_token="kl_tokens"),
    MetricSpec("top1_agree", "mean", "top1_agree", higher_is_better=True, label="same top token as dense",
               tolerance=TOP1_TOLERANCE, fidelity="agreement"),
)


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


def all_windows(scorer: Scorer, items: list[Item], options: dict[str, Any]) -> tuple[torch.Tensor, int | None, int]:
    """(token ids, BOS id or None, how many whole windows of ``seqlen`` the document makes)."""
    seqlen = options["seqlen"]
    ids = tokenized(scorer.tokenizer, items[0].data["text"])
    bos = window_bos(scorer.tokenizer, scorer.adapter)
    count = window_count(ids.numel(), seqlen, bos)
    if count == 0:
        raise PrunelabError(f"WikiText-2 has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids, bos, count


def count_units(scorer: Scorer, items: list[Item], options: dict[str, Any]) -> int:
    """How many windows the subset selects: known once the tokenizer is, without scoring any."""
    _, _, count = all_windows(scorer, items, options)
    return len(items[0].data["subset"].select("wikitext", count))


def evaluate(engine: Scorer, items: list[Item], options: dict[str, Any]) -> TaskResult:
    seqlen = options["seqlen"]
    data = items[0].data
    ids, bos, count = all_windows(engine, items, options)
    chosen = data["subset"].select("wikitext", count)
    windows = consecutive_windows(ids, chosen, seqlen, bos)
    scores, fidelity = _scores(engine, windows, options)
    records = [
        {"item_id": f"window/{i}", "nll_sum": s, "tokens": c, "correct": None, "starts_with_bos": bos is not None}
        for i, s, c in zip(chosen, scores.nll_sums, scores.counts, strict=True)
    ]
    if fidelity == "dense":
        for record in records:
            record.update(kl_mean=0.0, top1_agree=1.0, kl_tokens=[0.0] * record["tokens"])
    elif fidelity == "compared":
        for record, kl, agree in zip(records, scores.kl, scores.agree, strict=True):
            record.update(kl_mean=float(kl.double().mean()), top1_agree=float(agree.double().mean()),
                          kl_tokens=[float(f"{v:.4g}") for v in kl.tolist()])
    nll = sum(scores.nll_sums) / sum(scores.counts)
    metrics = {"n": len(records), "perplexity": math.exp(nll), "nll": nll, "seqlen": seqlen,
               "tokens": sum(scores.counts), "bos": bos is not None, "fidelity": fidelity}
    return TaskResult("wikitext", metrics, records)


def _scores(engine: Scorer, windows: torch.Tensor, options: dict[str, Any]) -> tuple[WindowScores, str]:
    """Score the windows; as the dense model, save the reference; as a variant, compare with it.

    Returns the scores and what fidelity they carry: "dense" (this is the reference), "compared",
    or why there is none ("no reference": outside a study; "no reference (no dense head)": the
    variant's head differs and the dense head was not kept).
    """
    progress = options.get("progress")
    store = options.get("reference")
    if store is None:
        return engine.window_scores(windows, progress=progress), "no reference"
    if store.is_dense:
        scores = engine.window_scores(windows, keep_hidden=True, progress=progress)
        store.save_head(engine.adapter)  # before the chunk's reference: a reference always has its head
        store.save({"hidden": torch.stack(scores.hidden), "windows": windows},
                   {"head": head_fingerprint(engine.adapter)})
        return scores, "dense"
    found = store.load()
    if found is None:
        return engine.window_scores(windows, progress=progress), "no reference"
    tensors, metadata = found
    reference = DenseReference(tensors["hidden"], tensors["windows"], metadata.get("head", ""))
    if reference.head != head_fingerprint(engine.adapter):  # width's hidden axis, include_head: the dense head's logits
        reference.dense_head = store.load_head(reference.head)
        if reference.dense_head is None:
            return engine.window_scores(windows, progress=progress), "no reference (no dense head)"
    return engine.window_scores(windows, reference=reference, progress=progress), "compared"


@hookimpl
def prunelab_evaluators() -> list[Evaluator]:
    return [Evaluator(
        name="wikitext",
        description="WikiText-2 test perplexity over non-overlapping windows",
        load_items=load_items,
        output_type="loglikelihood_rolling",
        count_units=count_units,
        compares_with_dense=True,
        evaluate=evaluate,
        options=(Option("seqlen", int, 2048, "window length in tokens",
                        check=lambda v: None if v >= 2 else "must be at least 2"),),
        metrics=METRICS,
    )]
