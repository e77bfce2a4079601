"""Calibration data and the one sequential layer-wise driver behind Wanda, SparseGPT and OWL.

**Samples.** ``N`` windows of ``seqlen`` tokens (defaults 128 x 2048, as in the Wanda and SparseGPT
papers) drawn with a seeded ``random.Random`` from a text source: the Hub's C4 (``allenai/c4``, the
first English train shard, one random window of a random document longer than ``seqlen``) or
WikiText-2 train (one random window of the whole split joined with spaces), or a local file (a
plain text file is one long text; ``.jsonl``/``.json.gz`` files are documents with a ``text`` field,
sampled like C4). Tokens carry no special tokens, except BOS where the model starts a text with it (``prunelab.model.windows``).

**Driver.** ``run_layerwise`` feeds the samples through the decoder one layer at a time:

1. the decoder is called once per sample with every layer's ``forward`` replaced by a recorder,
   which keeps the first layer's input hidden states and -- for every layer, from the first sample
   -- *all* the other positional and keyword arguments the decoder passes (rotary ``cos``/``sin``,
   the attention mask, ``position_ids``, ``cache=None``, ...). Capturing them per layer matters:
   Gemma3 gives sliding and full-attention layers different masks and rotary tables, so replaying
   layer 0's arguments everywhere (what several reference implementations do) is silently wrong;
2. for each layer: forward hooks on its Linear modules accumulate a statistic of their inputs
   (Linears that read the same tensor -- q/k/v, gate/up -- share one), a callback prunes, and, if
   the callback changed the weights, the layer runs again so that the *pruned* layer's outputs
   become the next layer's inputs.

Peak memory is the model plus two buffers of calibration hidden states (inputs and outputs of the
current layer) plus one sample's activations inside one layer. ``calibrated_prune`` wraps the
driver with what every calibrated method shares (targets, per-layer sparsity, masks, report), and
``owl_layer_sparsities`` computes OWL's outlier-weighted per-layer sparsities with the same driver,
so magnitude, Wanda and SparseGPT all get OWL from here.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import FileProblem, PrunelabError
from prunelab.model.adapter import Adapter
from prunelab.model.windows import text_width, window_bos, windows_at
from prunelab.readers import read_utf8, reading

DEFAULT_SOURCE = "c4"
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 2048
HUB_SOURCES = ("c4", "wikitext2")
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


# --------------------------------------------------------------------------------------------
# Calibration samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from and how much of it: what ``PruneContext.calibration`` holds.

    ``source`` is ``"c4"`` or ``"wikitext2"`` (Hugging Face Hub) or a local file path. The seed is
    the prune's seed (``PruneContext.seed``), so one number reproduces the whole recipe.
    """

    source: str = DEFAULT_SOURCE
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise PrunelabError(f"calibration samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seqlen, int) or isinstance(self.seqlen, bool) or self.seqlen < 2:
            raise PrunelabError(f"calibration seqlen must be an integer >= 2, got {self.seqlen!r}")
        if not isinstance(self.source, str) or not self.source:
            raise PrunelabError(f"calibration source must be 'c4', 'wikitext2' or a file, got {self.source!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> CalibrationSpec:
        """Build from a ``calibration`` dict (keys source, samples, seqlen; missing = defaults)."""
        values = dict(values or {})
        unknown = sorted(set(values) - {"source", "samples", "seqlen"})
        if unknown:
            raise PrunelabError(f"unknown calibration key(s) {', '.join(unknown)} (known: source, samples, seqlen)")
        clean = {k: v for k, v in values.items() if v is not None}
        for key in ("samples", "seqlen"):
            if key in clean and isinstance(clean[key], str) and clean[key].strip().isdigit():
                clean[key] = int(clean[key])
        if "source" in clean:
            clean["source"] = str(clean["source"])
        return cls(**clean)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_source(self) -> CalibrationSpec:
        """Read a local calibration file now, so a damaged or empty one fails before any model loads.

        Hub sources are not fetched here (that needs the network and happens when pruning).
        """
        if self.source in HUB_SOURCES and not Path(self.source).expanduser().is_file():
            return self
        text, documents = load_source(self.source)
        if not (text or "").strip() and not documents:
            raise FileProblem(self.source, "calibration file has no text")
        return self


def calibration_samples(
    tokenizer, spec: CalibrationSpec, seed: int = 0, bos_token_id: int | None = None
) -> torch.Tensor:
    """``spec.samples`` windows of ``spec.seqlen`` token ids (a LongTensor), reproducible by ``seed``.

    With ``bos_token_id`` every window starts with BOS followed by ``seqlen - 1`` text tokens.
    """
    rng = random.Random(seed)
    text, documents = load_source(spec.source)
    if text is not None:
        return _windows_of_text(tokenizer, text, spec.seqlen, bos_token_id, spec.samples, rng, spec.source)
    return _windows_of_documents(tokenizer, documents, spec.seqlen, bos_token_id, spec.samples, rng, spec.source)


def model_samples(tokenizer, adapter: Adapter, spec: CalibrationSpec, seed: int = 0,
                  missing: str = "this strategy needs calibration data") -> torch.Tensor:
    """The seeded calibration windows for one model: BOS first where its tokenizer starts a text with one.

    ``missing``: what the one-line error says when there is no tokenizer (a bare model was passed).
    """
    if tokenizer is None:
        raise PrunelabError(f"{missing}, hence a tokenizer: pass a loaded model")
    return calibration_samples(tokenizer, spec, seed, window_bos(tokenizer, adapter))


def samples_for(context, adapter: Adapter) -> tuple[torch.Tensor, CalibrationSpec]:
    """Calibration tokens for a ``PruneContext`` (its tokenizer, seed and calibration dict)."""
    spec = CalibrationSpec.from_mapping(context.calibration)
    return model_samples(context.tokenizer, adapter, spec, context.seed), spec


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


_TEXT_TOKENS: dict[tuple, torch.Tensor] = {}  # one tokenized long text per (tokenizer, text), in process
_CHUNK_CHARS = 1 << 15


def encode_long_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole calibration text, tokenized once per process, in line-aligned chunks.

    Chunks of about 32k characters keep the tokenizer's memory small (a 1 MB text in one call
    takes ~150 MB of transient encodings); a token may differ only where a chunk ends at a newline.
    """
    key = (getattr(tokenizer, "name_or_path", None), type(tokenizer).__name__, len(tokenizer), hash(text))
    if key not in _TEXT_TOKENS:
        _TEXT_TOKENS.clear()  # keep one: the texts are large
        pieces: list[torch.Tensor] = []
        start = 0
        while start < len(text):
            end = text.find("\n", start + _CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            pieces.append(torch.tensor(encode_text(tokenizer, text[start:end]), dtype=torch.long))
            start = end
        _TEXT_TOKENS[key] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return _TEXT_TOKENS[key]


def _windows_of_text(tokenizer, text: str, seqlen: int, bos: int | None, count: int, rng: random.Random,
                     name: str) -> torch.Tensor:
    """SparseGPT/Wanda's WikiText-2 sampling: random windows of the one tokenized text."""
    ids = encode_long_text(tokenizer, text)
    width = text_width(seqlen, bos)
    if len(ids) <= width:
        raise PrunelabError(f"calibration source {name} has {len(ids)} tokens, too few for windows of {width}")
    starts = [rng.randint(0, len(ids) - width - 1) for _ in range(count)]
    return windows_at(ids, starts, seqlen, bos)


def _windows_of_documents(
    tokenizer, documents: Sequence[str], seqlen: int, bos: int | None, count: int, rng: random.Random, name: str
) -> torch.Tensor:
    """SparseGPT/Wanda's C4 sampling: a random document longer than the window, then a random window."""
    if not documents:
        raise PrunelabError(f"calibration source {name} has no documents")
    width = text_width(seqlen, bos)
    windows: list[torch.Tensor] = []
    for _ in range(count):
        for _attempt in range(10_000):
            ids = encode_text(tokenizer, documents[rng.randint(0, len(documents) - 1)])
            if len(ids) > width:
                break
        else:
            raise PrunelabError(f"calibration source {name}: no document is longer than {width} tokens")
        start = rng.randint(0, len(ids) - width - 1)
        windows.append(windows_at(ids, [start], seqlen, bos))
    return torch.cat(windows)


def load_source(source: str) -> tuple[str | None, list[str] | None]:
    """(one long text, None) or (None, documents) for a Hub name or a local file."""
    path = Path(source).expanduser()
    if path.is_file():
        return _load_local(path)
    if source in HUB_SOURCES:
        return _load_hub(source)
    raise PrunelabError(
        f"calibration source not found: {source} (use 'c4', 'wikitext2' or a local text/.jsonl file)"
    )


def _load_local(path: Path) -> tuple[str | None, list[str] | None]:
    name = path.name.lower()
    if not name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
        return read_utf8(path, "could not read calibration file"), None
    opener = gzip.open if name.endswith(".gz") else open
    documents = []
    with reading(path, "could not read calibration file"), opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                documents.append(_document(line, path, number))
    return None, documents


def _document(line: bytes, path: Path, number: int) -> str:
    with reading(f"{path}:{number}", "invalid JSON"):
        record = json.loads(line.decode("utf-8"))
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise FileProblem(f"{path}:{number}", "expected an object with a 'text' string")
    return record["text"]


def _load_hub(source: str) -> tuple[str | None, list[str] | None]:
    """The papers' calibration sets from the Hugging Face Hub (needs network access)."""
    try:
        from datasets import load_dataset

        if source == "c4":
            rows = load_dataset("allenai/c4", data_files={"train": C4_SHARD}, split="train")
            return None, rows["text"]
        rows = load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")
        return " ".join(rows["text"]), None
    except Exception as exc:  # datasets raises many types when offline
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunelabError(
            f"could not load calibration data '{source}' from the Hub: {first}; pass a local text file instead"
        ) from None
