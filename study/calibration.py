"""Calibration data and the one sequential layer-wise driver behind Wanda, SparseGPT and OWL.

**Samples.** ``N`` windows of ``seqlen`` tokens (defaults 128 x 2048, as in the Wanda and SparseGPT
papers) drawn with a seeded ``random.Random`` from a text source: the Hub's C4 (``allenai/c4``, the
first English train shard, one random window of a random document longer than ``seqlen``) or
WikiText-2 train (one random window of the whole split joined with spaces), or a local file (a
plain text file is one long text; ``.jsonl``/``.json.gz`` files are documents with a ``text`` field,
sampled like C4). Tokens carry no special tokens, except BOS where the model starts a text with it (``prunelab.windows``).

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

import contextlib
import gzip
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .adapter import Adapter
from .errors import FileProblem, PrunelabError
from .options import Option
from .pruning import MaskSet, apply_mask, as_adapter, layer_index_of, resolve_sparsity, sparsity_report
from .readers import read_utf8, reading
from .windows import text_width, window_bos, windows_at

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
        text, documents = _load_source(self.source)
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
    text, documents = _load_source(spec.source)
    if text is not None:
        return _windows_of_text(tokenizer, text, spec.seqlen, bos_token_id, spec.samples, rng, spec.source)
    return _windows_of_documents(tokenizer, documents, spec.seqlen, bos_token_id, spec.samples, rng, spec.source)


def samples_for(context, adapter: Adapter) -> tuple[torch.Tensor, CalibrationSpec]:
    """Calibration tokens for a ``PruneContext`` (its tokenizer, seed and calibration dict)."""
    spec = CalibrationSpec.from_mapping(context.calibration)
    if context.tokenizer is None:
        raise PrunelabError("this strategy needs calibration data, hence a tokenizer: pass a loaded model")
    return calibration_samples(context.tokenizer, spec, context.seed, window_bos(context.tokenizer, adapter)), spec


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


_TEXT_TOKENS: dict[tuple, torch.Tensor] = {}  # one tokenized long text per (tokenizer, text), in process
_CHUNK_CHARS = 1 << 15


def _encode_long_text(tokenizer, text: str) -> torch.Tensor:
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
            pieces.append(torch.tensor(_encode(tokenizer, text[start:end]), dtype=torch.long))
            start = end
        _TEXT_TOKENS[key] = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return _TEXT_TOKENS[key]


def _windows_of_text(tokenizer, text: str, seqlen: int, bos: int | None, count: int, rng: random.Random,
                     name: str) -> torch.Tensor:
    """SparseGPT/Wanda's WikiText-2 sampling: random windows of the one tokenized text."""
    ids = _encode_long_text(tokenizer, text)
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
            ids = _encode(tokenizer, documents[rng.randint(0, len(documents) - 1)])
            if len(ids) > width:
                break
        else:
            raise PrunelabError(f"calibration source {name}: no document is longer than {width} tokens")
        start = rng.randint(0, len(ids) - width - 1)
        windows.append(windows_at(ids, [start], seqlen, bos))
    return torch.cat(windows)


def _load_source(source: str) -> tuple[str | None, list[str] | None]:
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


# --------------------------------------------------------------------------------------------
# Statistics of a Linear's inputs
# --------------------------------------------------------------------------------------------


class Statistic(Protocol):
    """Accumulates something about a Linear's inputs, one (tokens, in_features) batch at a time."""

    def update(self, inputs: torch.Tensor) -> None: ...


class InputNorms:
    """Sum of squares of every input feature over all calibration tokens: ||X_j||_2^2 (Wanda, OWL)."""

    def __init__(self, module: nn.Linear) -> None:
        self.squares = torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device)
        self.tokens = 0

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.float()
        self.squares += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


class Hessian:
    """SparseGPT's H = 2/n * sum over samples of X X^T, kept as a running mean in float32.

    ``n`` counts calibration samples (sequences), as in the reference code; the scale does not
    matter to the result (damping is relative to the mean diagonal).
    """

    def __init__(self, module: nn.Linear) -> None:
        self.H = torch.zeros(module.in_features, module.in_features, dtype=torch.float32, device=module.weight.device)
        self.samples = 0
        self._inverse: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, inputs: torch.Tensor) -> None:
        self.H *= self.samples / (self.samples + 1)
        self.samples += 1
        x = inputs.float() * (2 / self.samples) ** 0.5
        self.H.addmm_(x.T, x)

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 up to a common factor (the diagonal), so OWL/Wanda scores work from a Hessian too."""
        return self.H.diagonal().clamp(min=0).sqrt()

    def inverse_cholesky(self, damp_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper Cholesky factor of the damped H^-1, dead-column mask), cached: q/k/v share one H."""
        if damp_fraction not in self._inverse:
            H = self.H.clone()
            dead = H.diagonal() == 0
            H[dead, dead] = 1
            damp = damp_fraction * H.diagonal().mean()
            for _ in range(6):  # grow the damping if H is numerically not positive definite
                try:
                    L = torch.linalg.cholesky(H + damp * torch.eye(len(H), device=H.device))
                    break
                except torch.linalg.LinAlgError:
                    damp = damp * 10 if damp > 0 else 1e-6 * H.diagonal().abs().mean().clamp(min=1e-12)
            else:
                raise PrunelabError("SparseGPT: the Hessian is not positive definite even with strong damping")
            inverse = torch.cholesky_inverse(L)
            self._inverse[damp_fraction] = (torch.linalg.cholesky(inverse, upper=True), dead)
        return self._inverse[damp_fraction]


StatisticFactory = Callable[[nn.Linear], Statistic]


# --------------------------------------------------------------------------------------------
# The layer-wise driver
# --------------------------------------------------------------------------------------------


class _InputsCaptured(Exception):
    """Raised by the recorders to stop the decoder once the inputs are captured."""


@dataclass
class LayerCall:
    """Everything the decoder passes to one layer besides its hidden states."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_as_kwarg: bool = False

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = layer(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = layer(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerStep:
    """What the driver hands the per-layer callback."""

    index: int
    layer: nn.Module
    linears: dict[str, nn.Linear]  # the hooked Linears, by name within the layer
    stats: dict[str, Statistic]  # their statistics (q/k/v and gate/up share one object)
    inputs: torch.Tensor  # (samples, seqlen, hidden): this layer's inputs


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))
    rest = dict(kwargs)
    return rest.pop("hidden_states"), LayerCall((), rest, hidden_as_kwarg=True)


def _same_call(a: LayerCall, b: LayerCall) -> bool:
    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y, strict=True))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and (x is y or x == y)

    return a.hidden_as_kwarg == b.hidden_as_kwarg and same(a.args, b.args) and same(a.kwargs, b.kwargs)


@torch.no_grad()
def capture_layer_inputs(adapter: Adapter, samples: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """The first layer's input hidden states for every sample, and every layer's other arguments.

    Each layer's ``forward`` is replaced by a recorder that returns its input unchanged, so the
    decoder computes embeddings, masks and rotary tables but no layer math; the last recorder
    raises to stop before the final norm. All samples have the same length and no padding, so the
    per-layer arguments are the same for every sample (checked on layer 0).
    """
    layers = adapter.layers
    device = next(adapter.model.parameters()).device
    hidden: list[torch.Tensor] = []
    calls: list[LayerCall | None] = [None] * len(layers)
    state = {"sample": 0}

    def recorder(index: int):
        def forward(*args, **kwargs):
            h, call = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h.detach())
                if calls[0] is not None and not _same_call(calls[0], call):
                    raise PrunelabError(
                        "this model passes per-sample arguments to its decoder layers; "
                        "layer-wise calibration does not support it"
                    )
            if calls[index] is None:
                calls[index] = call
            if state["sample"] > 0 or index == len(layers) - 1:
                raise _InputsCaptured
            return h
        return forward

    # An instance-level forward (e.g. an accelerate offload hook) is put back afterwards.
    previous = [layer.__dict__.get("forward") for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        for row in range(samples.shape[0]):
            state["sample"] = row
            with contextlib.suppress(_InputsCaptured):
                adapter.decoder(input_ids=samples[row : row + 1].to(device), use_cache=False)
            if len(hidden) != row + 1:
                raise PrunelabError(f"{type(adapter.model).__name__}: its decoder did not call the first layer")
    finally:
        for layer, forward in zip(layers, previous, strict=True):
            del layer.forward  # back to the class's forward ...
            if forward is not None:
                layer.forward = forward  # ... or to the instance's own
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise PrunelabError(f"the decoder never called layer(s) {missing}; layer-wise calibration needs every layer")
    return torch.cat(hidden, dim=0), calls  # type: ignore[return-value]


class _Hooks:
    """Forward hooks that feed each Linear's inputs to its statistic; Linears fed the same tensor share it."""

    def __init__(self, linears: Mapping[str, nn.Linear], factory: StatisticFactory) -> None:
        self.factory = factory
        self.stats: dict[str, Statistic] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs already counted in this forward
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Linear, args: tuple, output) -> None:
            if not args:
                return
            x = args[0]
            for tensor, other in self._seen:
                if tensor is x:  # q/k/v (or gate/up) read the very same tensor: one statistic
                    self.stats.setdefault(name, self.stats[other])
                    return
            if name not in self.stats:
                self.stats[name] = self.factory(module)
            self._seen.append((x, name))
            self.stats[name].update(x.detach().reshape(-1, x.shape[-1]))
        return hook

    def new_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def run_layerwise(
    adapter: Adapter,
    samples: torch.Tensor,
    on_layer: Callable[[LayerStep], bool],
    statistic: StatisticFactory | None = None,
    linear_filter: Callable[[int, str], bool] | None = None,
) -> torch.Tensor:
    """Run the calibration samples through the decoder layer by layer (see the module docstring).

    ``on_layer(step)`` is called once per layer after the statistics of its Linears (those kept by
    ``linear_filter(layer_index, name)``) are collected; it returns True when it changed the
    layer's weights, which makes the driver recompute the layer's outputs. Returns the last layer's
    outputs (before the final norm).
    """
    was_training = adapter.model.training
    adapter.model.eval()
    try:
        with torch.no_grad():
            inputs, calls = capture_layer_inputs(adapter, samples)
            outputs = torch.empty_like(inputs)
            for index, layer in enumerate(adapter.layers):
                linears = {
                    name: module for name, module in adapter.linear_modules(index).items()
                    if linear_filter is None or linear_filter(index, name)
                }
                hooks = _Hooks(linears if statistic is not None else {}, statistic or InputNorms)
                try:
                    for row in range(inputs.shape[0]):
                        hooks.new_forward()
                        outputs[row : row + 1] = calls[index].run(layer, inputs[row : row + 1])
                finally:
                    hooks.remove()
                changed = on_layer(LayerStep(index, layer, linears, hooks.stats, inputs))
                del hooks
                if changed:
                    for row in range(inputs.shape[0]):
                        outputs[row : row + 1] = calls[index].run(layer, inputs[row : row + 1])
                inputs, outputs = outputs, inputs
    finally:
        adapter.model.train(was_training)
    return inputs


# --------------------------------------------------------------------------------------------
# OWL: outlier-weighted layer-wise sparsity
# --------------------------------------------------------------------------------------------

OWL_M = 5.0
OWL_LAMBDA = 0.08


def allocation_options() -> tuple[Option, ...]:
    """``allocation`` (uniform | owl) with OWL's M and lambda: shared by magnitude, Wanda and SparseGPT."""
    return (
        Option("allocation", str, "uniform", "per-layer sparsity: uniform, or owl (outlier-weighted, "
               "needs calibration data; unstructured only)", choices=("uniform", "owl")),
        Option("owl_m", float, OWL_M, "OWL: a weight is an outlier when |W|*||X|| > M x the layer mean",
               check=lambda v: None if v > 0 else "must be positive"),
        Option("owl_lambda", float, OWL_LAMBDA, "OWL: per-layer sparsities span target +- lambda",
               check=lambda v: None if 0 <= v <= 0.5 else "must be in [0, 0.5]"),
    )


def outlier_ratio(scores: Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """Share of a layer's scores (all its Linears together) above ``m`` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's allocation (fractions): outlier ratios min-max scaled to [0, 2*lam], centred on the target.

    Layers with more outliers keep more weights. The mean of the result is ``sparsity`` (before
    clipping to [0, 1]); equal ratios give the uniform allocation.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(r) == 0 or r.max() <= r.min():
        return [float(sparsity)] * len(r)
    spread = r.max() - r.min()
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [float(min(1.0, max(0.0, 1 - d))) for d in density]


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score |W_ij| * ||X_j||_2 (float32), the metric OWL counts outliers of."""
    return weight.detach().abs().float() * norms.to(weight.device, torch.float32)[None, :]


def owl_layer_ratios(adapter: Adapter, samples: torch.Tensor, m: float = OWL_M,
                     linear_filter: Callable[[int, str], bool] | None = None) -> list[float]:
    """Per-layer outlier ratios of the dense model, propagated layer by layer (nothing is pruned)."""
    ratios: list[float] = []

    def measure(step: LayerStep) -> bool:
        scores = [wanda_scores(mod.weight, step.stats[name].norms) for name, mod in step.linears.items()]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        return False

    run_layerwise(adapter, samples, measure, InputNorms, linear_filter)
    return ratios


def owl_layer_sparsities(
    adapter: Adapter, samples: torch.Tensor, sparsity: float, m: float = OWL_M, lam: float = OWL_LAMBDA,
    linear_filter: Callable[[int, str], bool] | None = None,
) -> tuple[list[float], list[float]]:
    """(per-layer sparsity fractions, per-layer outlier ratios) by OWL for a target ``sparsity`` fraction."""
    ratios = owl_layer_ratios(adapter, samples, m, linear_filter)
    return owl_sparsities(ratios, sparsity, lam), ratios


def layer_sparsities(adapter: Adapter, options: Mapping[str, Any], sparsity: float, nm, context=None,
                     samples: torch.Tensor | None = None,
                     linear_filter: Callable[[int, str], bool] | None = None) -> tuple[list[float], dict[str, Any]]:
    """Per-layer sparsity fractions from the ``allocation`` options, and what to report about them.

    ``uniform``: the target everywhere. ``owl``: needs calibration (``samples``, or drawn from
    ``context``) and an unstructured pattern (N:M fixes every layer's sparsity).
    """
    allocation = options.get("allocation", "uniform") or "uniform"
    if allocation == "uniform":
        return [sparsity] * adapter.num_layers, {"allocation": "uniform"}
    if nm is not None:
        raise PrunelabError("allocation 'owl' varies the sparsity per layer; it cannot be combined with an N:M pattern")
    if samples is None:
        if context is None:
            raise PrunelabError("allocation 'owl' needs calibration data")
        samples, _ = samples_for(context, adapter)
    m = float(options.get("owl_m", OWL_M))
    lam = float(options.get("owl_lambda", OWL_LAMBDA))
    per_layer, ratios = owl_layer_sparsities(adapter, samples, sparsity, m, lam, linear_filter)
    info = {"allocation": "owl", "owl_m": m, "owl_lambda": lam,
            "outlier_ratio_pct": [round(100 * r, 4) for r in ratios],
            "layer_sparsity_pct": [round(100 * s, 4) for s in per_layer]}
    return per_layer, info


def target_fractions(names, per_layer: Sequence[float], default: float) -> dict[str, float]:
    """The sparsity fraction of each target name: its layer's (OWL) fraction, ``default`` outside layers.

    For strategies that prune a dict of targets at once (magnitude): ``layer_sparsities`` gives the
    per-layer list, this maps it onto the adapter-relative target names.
    """
    fractions = {}
    for name in names:
        index = layer_index_of(name)
        fractions[name] = per_layer[index] if index is not None else default
    return fractions


# --------------------------------------------------------------------------------------------
# What every calibrated method shares
# --------------------------------------------------------------------------------------------

# prune_linear(module, statistic, sparsity_fraction, nm) -> keep-mask (True = keep); it may also
# update the module's weights (SparseGPT), the zeros are applied by the caller.
LinearPruner = Callable[[nn.Linear, Statistic, float, "tuple[int, int] | None"], torch.Tensor]


def calibrated_prune(
    model: nn.Module,
    options: Mapping[str, Any],
    context,
    statistic: StatisticFactory,
    prune_linear: LinearPruner,
) -> dict[str, Any]:
    """Prune every decoder Linear weight layer by layer with ``prune_linear``; return the report.

    Shared by Wanda and SparseGPT: draws the calibration samples, resolves sparsity/pattern and
    the per-layer allocation (OWL), runs the driver, keeps the masks in ``context.masks`` and
    reports the achieved sparsity, the calibration used and the time taken.
    """
    adapter = context.adapter if getattr(context, "adapter", None) is not None else as_adapter(model)
    sparsity, nm = resolve_sparsity(options)
    start = time.perf_counter()
    samples, spec = samples_for(context, adapter)
    context.calibration = spec.as_dict()
    per_layer, allocation = layer_sparsities(adapter, options, sparsity, nm, samples=samples)
    masks = MaskSet()
    targets: dict[str, torch.Tensor] = {}

    def prune_layer(step: LayerStep) -> bool:
        for name, module in step.linears.items():
            keep = prune_linear(module, step.stats[name], per_layer[step.index], nm)
            apply_mask(module.weight, keep)
            key = f"layers.{step.index}.{name}.weight"
            masks[key] = keep.to("cpu")
            targets[key] = module.weight
        return True

    run_layerwise(adapter, samples, prune_layer, statistic)
    context.masks = masks
    return {
        "sparsity": sparsity_report(targets),
        "requested_sparsity_pct": round(100 * sparsity, 6),
        "pattern": f"{nm[0]}:{nm[1]}" if nm else "unstructured",
        **allocation,
        "seconds": round(time.perf_counter() - start, 3),
    }
