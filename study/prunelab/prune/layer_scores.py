"""Cheap layer importance, and the plans that turn it into "remove these K layers".

Scores come from one pass over a few calibration samples (default 8 x 512 tokens); for every
metric, higher means more important (removing the layer hurts more):

* ``bi`` -- Block Influence (Men et al., "ShortGPT", 2024): 1 - cos(input, output) of each decoder
  layer, averaged over every calibration token. A layer that barely turns the residual stream
  changes little when it is removed.
* ``angular`` -- angular distance arccos(cos(x^l, x^(l+n))) / pi between the representations n layers
  apart, averaged over tokens (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper
  Layers", 2024, who use the last token only: ``last_token=True``). The block l..l+n-1 with the
  smallest distance is the best contiguous block of n layers to drop; a layer's own score is its
  n = 1 distance.
* ``ppl`` -- perplexity on the calibration samples with the layer skipped: a cheap proxy of the full
  single-layer sweep. A skipped layer returns its input (an identity through the residual stream),
  which is exactly what removing it does: with ``use_cache=False`` no KV cache is indexed by
  ``layer_idx``, and every other layer keeps its own mask type (sliding/full).

Representations come from forward hooks on the layers: x^l is the input of layer l and x^L the
output of the last layer *before* the final norm. (``output_hidden_states=True`` returns the last
entry after the final norm in Hugging Face models; comparing a normed vector with an un-normed one
would make the last layer look important.)

Plans (used by the ``drop-least-important``, ``drop-block`` and ``drop-greedy`` strategies):
the K lowest scores, the best contiguous block of K by angular distance, or greedy removal guided by
calibration perplexity (remove the layer whose removal hurts least, re-score the rest, repeat).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter, layer_input, layer_output
from prunelab.options import Option
from prunelab.plugin import SizeAxis
from prunelab.prune.calibration import CalibrationSpec, model_samples

METRICS = ("bi", "angular", "ppl")
DEFAULT_SAMPLES = 8
DEFAULT_SEQLEN = 512


# --------------------------------------------------------------------------------------------
# Calibration samples (fewer and shorter than weight pruning needs: one pass ranks layers well)
# --------------------------------------------------------------------------------------------


def importance_spec(calibration: Mapping[str, Any] | None = None) -> CalibrationSpec:
    """The calibration spec for layer scores: the given keys over defaults of 8 samples x 512 tokens."""
    given = {k: v for k, v in dict(calibration or {}).items() if v is not None}
    return CalibrationSpec.from_mapping({"samples": DEFAULT_SAMPLES, "seqlen": DEFAULT_SEQLEN, **given})


def importance_samples(adapter: Adapter, tokenizer, spec: CalibrationSpec, seed: int = 0) -> torch.Tensor:
    """The seeded calibration windows (BOS first where the model needs it, as in weight pruning)."""
    return model_samples(tokenizer, adapter, spec, seed, missing="layer importance needs calibration text")


def samples_for_context(context, adapter: Adapter) -> torch.Tensor:
    """Calibration windows for a strategy's ``PruneContext``; records the spec used in the context."""
    spec = importance_spec(context.calibration)
    samples = importance_samples(adapter, context.tokenizer, spec, context.seed)
    context.calibration = spec.as_dict()
    return samples


def _device(adapter: Adapter) -> torch.device:
    return next(adapter.model.parameters()).device


# --------------------------------------------------------------------------------------------
# Representations: BI and angular distances from one pass
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_representations(adapter: Adapter, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(inputs, outputs) of every decoder layer for one batch of token ids, by forward hooks.

    ``inputs[l]`` is x^l and ``outputs[l]`` is what layer l returned (x^(l+1) in a plain decoder);
    ``outputs[-1]`` is the last layer's output before the final norm.
    """
    count = len(adapter.layers)
    inputs: list[torch.Tensor | None] = [None] * count
    outputs: list[torch.Tensor | None] = [None] * count

    def recorder(index: int):
        def hook(module, args, kwargs, output) -> None:
            inputs[index] = layer_input(args, kwargs).detach()
            outputs[index] = layer_output(output).detach()
        return hook

    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(adapter.layers)]
    try:
        adapter.decoder(input_ids=tokens.to(_device(adapter)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(count) if inputs[i] is None]
    if missing:
        raise PrunelabError(f"the decoder never called layer(s) {missing}; layer importance needs every layer")
    return inputs, outputs  # type: ignore[return-value]


@dataclass
class RepresentationStats:
    """Token-averaged similarities of one pass: what ``bi`` and ``angular`` are made of."""

    block_influence: list[float]  # per layer: 1 - mean cos(input, output)
    angular: torch.Tensor  # (L+1, L+1) float64: mean angular distance between x^l and x^m (upper triangle)
    tokens: int  # how many token positions were averaged

    def block_distance(self, start: int, n: int) -> float:
        """Angular distance between the input of layer ``start`` and the input of layer ``start + n``."""
        return float(self.angular[start, start + n])


@torch.no_grad()
def representation_stats(adapter: Adapter, samples: torch.Tensor, last_token: bool = False) -> RepresentationStats:
    """BI of every layer and the angular distance of every pair of representations, one sample at a time.

    Cosines are taken in float64 on unit vectors; ``last_token`` averages over each sample's final
    position only (Gromov et al.'s choice), otherwise over every position.
    """
    count = len(adapter.layers)
    cos_sums = torch.zeros(count, dtype=torch.float64)
    angle_sums = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    tokens = 0
    for row in range(samples.shape[0]):
        inputs, outputs = layer_representations(adapter, samples[row : row + 1])
        positions = slice(-1, None) if last_token else slice(None)
        unit_in = [F.normalize(h[0, positions].double(), dim=-1) for h in inputs]
        unit_out = [F.normalize(h[0, positions].double(), dim=-1) for h in outputs]
        for index in range(count):
            cos_sums[index] += (unit_in[index] * unit_out[index]).sum(-1).sum().cpu()
        stack = torch.stack([*unit_in, unit_out[-1]], dim=1)  # (tokens, L+1, hidden)
        cosines = torch.bmm(stack, stack.transpose(1, 2)).clamp(-1.0, 1.0)  # (tokens, L+1, L+1)
        angle_sums += (torch.arccos(cosines) / math.pi).sum(0).cpu()
        tokens += stack.shape[0]
    return RepresentationStats([float(1 - s / tokens) for s in cos_sums], angle_sums / tokens, tokens)


def best_block(stats: RepresentationStats, n: int) -> tuple[int, float]:
    """(first layer, distance) of the contiguous block of ``n`` layers whose removal changes x least."""
    count = stats.angular.shape[0] - 1
    check_removal_count(n, count, "block size")
    distances = [(stats.block_distance(start, n), start) for start in range(count - n + 1)]
    distance, start = min(distances)
    return start, distance


# --------------------------------------------------------------------------------------------
# Perplexity with layers skipped
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def skipping(adapter: Adapter, indices: Iterable[int]) -> Iterator[None]:
    """Make the given layers return their input (as if removed) for passes without a KV cache."""

    def identity(module, args, kwargs, output):
        hidden = layer_input(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [adapter.layers[i].register_forward_hook(identity, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def calibration_perplexity(adapter: Adapter, samples: torch.Tensor, skip: Iterable[int] = ()) -> float:
    """exp(mean token NLL) of the samples, through the shared engine, with ``skip`` layers skipped."""
    from prunelab.evaluate.engine import Engine

    engine = Engine(adapter.model, None, adapter)
    with skipping(adapter, list(skip)):
        sums, counts = engine.window_nll(samples)
    return _perplexity(sums, counts)


def removal_perplexities(adapter: Adapter, samples: torch.Tensor, candidates: Iterable[int] | None = None,
                         skip: Sequence[int] = ()) -> dict[int, float]:
    """Calibration perplexity with each candidate layer removed (on top of ``skip``), by layer index.

    Without ``skip`` this runs one ``LayerSweep`` (layers below each candidate are computed once for
    all candidates: about half the cost of a full pass per candidate); with ``skip``, a full pass per
    candidate with the skipped layers made identities.
    """
    chosen = [i for i in (range(len(adapter.layers)) if candidates is None else candidates) if i not in skip]
    if skip:
        return {i: calibration_perplexity(adapter, samples, [*skip, i]) for i in chosen}
    return swept_perplexities(adapter, samples, chosen)[1]


def swept_perplexities(adapter: Adapter, samples: torch.Tensor, candidates: Iterable[int] | None = None,
                       ) -> tuple[float, dict[int, float]]:
    """Calibration perplexity of the model as it is, and with each candidate (default: all) removed.

    One ``LayerSweep``: its dense pass gives the first number, so no separate full pass is needed.
    """
    from prunelab.evaluate.engine import Engine
    from prunelab.evaluate.layersweep import LayerSweep

    chosen = list(range(len(adapter.layers)) if candidates is None else candidates)
    sweep = LayerSweep(Engine(adapter.model, None, adapter), chosen)
    return (_perplexity(*sweep.view(None).window_nll(samples)),
            {i: _perplexity(*sweep.view(i).window_nll(samples)) for i in chosen})


def _perplexity(sums: Sequence[float], counts: Sequence[int]) -> float:
    mean = sum(sums) / sum(counts)
    return math.exp(mean) if mean < 700 else math.inf


# --------------------------------------------------------------------------------------------
# Scores and plans
# --------------------------------------------------------------------------------------------


@dataclass
class LayerScores:
    """Per-layer importance by one metric (higher = more important) and what else was measured."""

    metric: str
    scores: list[float]
    extra: dict[str, Any] = field(default_factory=dict)  # ppl: baseline and per-layer perplexities

    def least_important(self, k: int) -> list[int]:
        """The ``k`` layers with the lowest scores (ties: the lower index first), sorted."""
        check_removal_count(k, len(self.scores))
        order = sorted(range(len(self.scores)), key=lambda i: (self.scores[i], i))
        return sorted(order[:k])


def check_metric(metric: str) -> str | None:
    """Option check: a message for an unknown metric, else None."""
    return None if metric in METRICS else f"must be one of {', '.join(METRICS)}"


def layer_count_option() -> Option:
    """The plans' ``k``: how many layers to remove (checked against the model's depth when pruning)."""
    return Option("k", int, None, "number of decoder layers to remove (at least 1, fewer than the model has)",
                  check=lambda k: None if k >= 1 else "must be at least 1", required=True)


def layer_count_axis() -> SizeAxis:
    """The plans' size axis: how many decoder layers went (read from the pruned model, not from ``k``)."""
    return SizeAxis("layers", option="k", label="layers removed")


def check_removal_count(k: int, num_layers: int, what: str = "layers to remove") -> None:
    """K must leave at least one layer: 1 <= K < number of layers."""
    if not 1 <= k < num_layers:
        raise PrunelabError(f"{what} must be between 1 and {num_layers - 1} (the model has {num_layers} layers), got {k}")


def score_layers(adapter: Adapter, samples: torch.Tensor, metric: str,
                 stats: RepresentationStats | None = None) -> LayerScores:
    """Per-layer scores by ``metric``; pass ``stats`` to reuse one representation pass for bi and angular."""
    if problem := check_metric(metric):
        raise PrunelabError(f"importance metric {metric!r}: {problem}")
    if metric == "ppl":
        baseline, removed = swept_perplexities(adapter, samples)
        ppl = [removed[i] for i in range(len(adapter.layers))]
        return LayerScores("ppl", [p - baseline for p in ppl], {"baseline_perplexity": baseline, "perplexity": ppl})
    stats = stats or representation_stats(adapter, samples)
    if metric == "bi":
        return LayerScores("bi", list(stats.block_influence))
    return LayerScores("angular", [stats.block_distance(i, 1) for i in range(len(adapter.layers))])


def plan_greedy(adapter: Adapter, samples: torch.Tensor, k: int) -> dict[str, Any]:
    """Remove ``k`` layers one at a time, each time the one whose removal raises calibration perplexity least."""
    return greedy_removal(adapter, k, lambda a: swept_perplexities(a, samples), "perplexity")


def greedy_removal(adapter: Adapter, k: int, score_model: Callable[[Adapter], tuple[float, dict[int, float]]],
                   score_name: str) -> dict[str, Any]:
    """Remove ``k`` layers one at a time, each time the one with the lowest removal score.

    Every step re-scores the remaining layers on the model as it is now (``score_model`` returns the
    model's own score and a map from each current layer position to the score without it; lower is
    better; the first step's own score is the report's baseline), and removes the chosen layer for
    real (``surgery.drop_layers``), so later steps never pay for it again. Returns the surgery's
    numbers with the original indices of the removed layers and every step's choice.
    """
    from prunelab.model.surgery import drop_layers

    before = len(adapter.layers)
    check_removal_count(k, before)
    alive = list(range(before))  # original index of each current layer
    steps = []
    baseline = None
    for _ in range(k):
        current, scores = score_model(adapter)
        baseline = current if baseline is None else baseline
        position = min(scores, key=lambda i: (scores[i], i))
        steps.append({"removed": alive[position], score_name: scores[position]})
        drop_layers(adapter, [position])
        del alive[position]
    dropped = sorted(step["removed"] for step in steps)
    return {"dropped_layers": dropped, "layers_before": before, "layers_after": len(adapter.layers),
            f"baseline_{score_name}": baseline, "steps": steps}


def task_loss(records: Sequence[Mapping[str, Any]]) -> float:
    """A smooth lower-is-better number from a scoring task's per-item records, to rank removals.

    On the handful of items a greedy step can afford, accuracy ties all the time; a loss does not.
    Perplexity windows (``nll_sum``/``tokens``): the mean token NLL. Multiple choice
    (``loglikelihoods`` and ``target_index``): the mean negative log-probability of the correct
    choice among the choices (a softmax over their log-likelihoods).
    """
    if not records:
        raise PrunelabError("the guide task selected no items")
    first = records[0]
    if first.get("nll_sum") is not None:
        return sum(r["nll_sum"] for r in records) / sum(r["tokens"] for r in records)
    if "loglikelihoods" in first and "target_index" in first:
        losses = [-torch.log_softmax(torch.tensor(r["loglikelihoods"], dtype=torch.float64), 0)[r["target_index"]]
                  for r in records]
        return float(sum(losses) / len(losses))
    raise PrunelabError("the guide task must score items (log-likelihoods or perplexity), not generate text")


def task_removal_losses(adapter: Adapter, tokenizer, task) -> tuple[float, dict[int, float]]:
    """The guide task's loss on the model as it is, and with each layer removed.

    One ``LayerSweep`` over every layer: layers below the removed one are computed once for all
    candidates, so a greedy step costs about half of evaluating each candidate on its own.
    """
    from prunelab.evaluate.engine import Engine
    from prunelab.evaluate.layersweep import LayerSweep
    from prunelab.evaluate.run import run_task

    sweep = LayerSweep(Engine(adapter.model, tokenizer, adapter), range(len(adapter.layers)))
    losses = {i: task_loss(run_task(sweep.view(i), task).records) for i in sweep.removed}
    return task_loss(run_task(sweep.view(None), task).records), losses


def plan_greedy_by_task(adapter: Adapter, tokenizer, task, k: int) -> dict[str, Any]:
    """Greedy removal guided by a small evaluation subset (``task``: a ``PreparedTask``) instead of calibration text."""
    report = greedy_removal(adapter, k, lambda a: task_removal_losses(a, tokenizer, task), "task_loss")
    return {**report, "guide": task.evaluator.name, "guide_items": [item.id for item in task.items]}


# --------------------------------------------------------------------------------------------
# The importance report: tables, Spearman against a layer sweep
# --------------------------------------------------------------------------------------------

TABLE_SCHEMA = {"metric": pl.String, "layer": pl.Int64, "n": pl.Int64, "score": pl.Float64, "rank": pl.Int64,
                "perplexity": pl.Float64, "baseline_perplexity": pl.Float64}


@dataclass
class Importance:
    """Every requested metric for one model, and the angular block table."""

    scores: dict[str, LayerScores]
    stats: RepresentationStats | None
    calibration: dict[str, Any]
    n: int | None = None  # the block size asked for (angular)
    last_token: bool = False

    def best_block(self) -> dict[str, Any] | None:
        if self.stats is None or self.n is None:
            return None
        start, distance = best_block(self.stats, self.n)
        return {"n": self.n, "layers": list(range(start, start + self.n)), "angular_distance": distance}

    def table(self) -> pl.DataFrame:
        """Long table: one row per metric and layer (n = 1); angular adds every block size n >= 2.

        ``rank`` 1 is the first to drop (lowest score) among the rows of the same metric and n.
        """
        rows = []
        for metric, scores in self.scores.items():
            ppl = scores.extra.get("perplexity")
            rows += _ranked(metric, 1, scores.scores, ppl, scores.extra.get("baseline_perplexity"))
        if "angular" in self.scores and self.stats is not None:
            count = self.stats.angular.shape[0] - 1
            for n in range(2, count + 1):
                distances = [self.stats.block_distance(start, n) for start in range(count - n + 1)]
                rows += _ranked("angular", n, distances)
        return pl.DataFrame(rows, schema=TABLE_SCHEMA, orient="row")

    def summary(self) -> dict[str, Any]:
        """The JSON-able headline: least-important order per metric, the best block, the calibration."""
        return {
            "calibration": self.calibration, "last_token": self.last_token,
            "order": {m: sorted(range(len(s.scores)), key=lambda i: (s.scores[i], i)) for m, s in self.scores.items()},
            "scores": {m: s.scores for m, s in self.scores.items()},
            "best_block": self.best_block(),
            **({"baseline_perplexity": self.scores["ppl"].extra["baseline_perplexity"]} if "ppl" in self.scores else {}),
        }


def _ranked(metric: str, n: int, scores: Sequence[float], ppl: Sequence[float] | None = None,
            baseline: float | None = None) -> list[tuple]:
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    rank = {layer: position + 1 for position, layer in enumerate(order)}
    return [(metric, i, n, float(s), rank[i], None if ppl is None else float(ppl[i]), baseline)
            for i, s in enumerate(scores)]


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """``"bi,angular"`` -> ["bi", "angular"]; unknown or repeated names are one-line errors."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise PrunelabError(f"unknown importance metric(s) {unknown or text!r} (choose from {', '.join(METRICS)})")
    if len(set(names)) != len(names):
        raise PrunelabError(f"importance metric given twice in {text!r}")
    return names


def layer_importance(loaded, metrics: Sequence[str] = METRICS, *, n: int | None = None,
                     calibration: Mapping[str, Any] | None = None, seed: int = 0,
                     last_token: bool = False) -> Importance:
    """Score every decoder layer of a loaded model by each metric from one set of calibration samples."""
    metrics = parse_metrics(metrics)
    if n is not None and "angular" not in metrics:
        raise PrunelabError("--n (block size) applies to the angular metric: add angular to the metrics")
    adapter = loaded.adapter
    if n is not None:
        check_removal_count(n, len(adapter.layers), "block size --n")
    spec = importance_spec(calibration)
    samples = importance_samples(adapter, loaded.tokenizer, spec, seed)
    stats = representation_stats(adapter, samples, last_token) if {"bi", "angular"} & set(metrics) else None
    scores = {m: score_layers(adapter, samples, m, stats) for m in metrics}
    return Importance(scores, stats, {**spec.as_dict(), "seed": seed}, n if "angular" in metrics else None, last_token)
