"""The hook specifications: the whole contract between prunelab and its plugins.

A plugin is any module registered under the ``prunelab`` entry-point group (built-ins use the
same group). It implements any of the hooks and returns descriptions of what it adds: a
``Strategy`` changes a model, an ``Evaluator`` scores one, a ``Recovery`` heals a pruned one.

What the core hands a plugin is described here as Protocols (``Scorer``, ``DataSource``,
``Subset``, ``DenseReference``, ``WindowScores``, ``ReferenceStore``, ``RecoveryContext``): the
contract names only what a plugin may use, and this module imports nothing of the stages that
implement it (``prunelab.evaluate``, ``prunelab.prune``), so the stages import the contract and
never the other way round (``tests/test_layout.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pluggy

from prunelab.errors import PrunelabError
from prunelab.options import Option, OptionSet

__all__ = [
    "DataSource", "DenseReference", "Evaluator", "GenerationRequest", "Item", "LoglikelihoodRequest", "MetricSpec",
    "Option", "OptionSet", "Progress", "Recovery", "RecoveryContext", "ReferenceStore", "Scorer", "Strategy",
    "Subset", "TaskResult", "WindowScores", "hookimpl", "hookspec", "mean_and_stderr",
]

if TYPE_CHECKING:  # a third-party package, for annotations only (nothing of prunelab's stages)
    import torch

Progress = Callable[[int], None]

hookspec = pluggy.HookspecMarker("prunelab")
hookimpl = pluggy.HookimplMarker("prunelab")


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy: declared options and a function that prunes a loaded model in place.

    ``prune(model, options, context)`` returns a JSON-able report (a weight-pruning strategy: at
    least the achieved sparsity, with its masks left in ``context.masks``); ``context`` carries the
    calibration source and the seed. A structural strategy may change shapes and the config in place
    and leave no masks: ``prunelab.model`` offers the surgery (``drop_layers``; ``width_targets`` +
    ``prune_width`` or ``apply_width`` for width) that keeps the model a standard checkpoint and
    returns the record to report (kept channels, config before/after, new shapes).
    """

    name: str
    description: str
    prune: Callable[..., dict[str, Any]]
    options: tuple[Option, ...] = field(default_factory=tuple)
    #: Whether it reads calibration text: a flag, or a function of the options (drop-greedy guided by
    #: a task needs none; magnitude needs it only for OWL's allocation).
    needs_calibration: bool | Callable[[Mapping[str, Any]], bool] = False
    #: The decoder layers a variant removes, from its options alone: a depth strategy whose layers
    #: follow from its options declares it, and the runner then scores its single-layer variants
    #: through one shared layer sweep and the report draws them on the layer chart. None (the
    #: default, or returned): not known without the model (a plan's layers depend on its scores).
    removes_layers: Callable[[Mapping[str, Any]], Sequence[int] | None] | None = None
    #: Options whose study-file value ``"each"`` expands to one grid point per decoder layer
    #: (``layers = "each"``), known once the model is loaded.
    each_layer: tuple[str, ...] = ()
    #: Checks the options against the loaded model before any work (a fraction a model's heads
    #: cannot realise, an unknown layout): ``check_model(adapter, options)`` raises a one-line
    #: ``PrunelabError``. ``prune()`` calls it before the strategy runs, and a study calls it for
    #: every variant as soon as the model is loaded, so a bad grid point fails before any variant is
    #: pruned or calibrated.
    check_model: Callable[[Any, Mapping[str, Any]], object] | None = None

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"strategy '{self.name}'", self.options)

    def check_for_model(self, adapter, options: Mapping[str, Any]) -> None:
        """Raise the strategy's one-line error when these options cannot apply to this model."""
        if self.check_model is not None:
            self.check_model(adapter, options)

    def uses_calibration(self, options: Mapping[str, Any]) -> bool:
        """Whether these options need calibration text (the strategy's own declaration)."""
        if callable(self.needs_calibration):
            return bool(self.needs_calibration(options))
        return bool(self.needs_calibration)

    def removed_layers(self, options: Mapping[str, Any]) -> list[int] | None:
        """The layers a variant with these options removes, or None when the strategy cannot tell."""
        if self.removes_layers is None:
            return None
        try:
            layers = self.removes_layers(options)
        except (KeyError, TypeError, ValueError, PrunelabError):  # not a layer list: not a depth variant
            return None
        return None if layers is None else [int(i) for i in layers]


@dataclass(frozen=True)
class MetricSpec:
    """A metric an evaluator reports per item, and how a report compares it with the dense model."""

    name: str  # the value in items.metric, e.g. "acc", "perplexity", "kl_mean"
    kind: Literal["accuracy", "perplexity", "mean"]  # accuracy: bool per item; perplexity: nll_sum/tokens per window; mean: a float per item
    field: str | None = None  # the record key holding the per-item value (None for perplexity)
    higher_is_better: bool = True
    label: str = ""  # human-readable name for reports
    #: A change vs dense this small is practically none (in the metric's units, harmful direction):
    #: the report then tests each variant against it -- within / beyond / undecided -- instead of
    #: against "identical to dense", which a fidelity metric (dense's own KL is 0) fails by
    #: construction. None: test against no change. A study file can set it per metric (``[tolerance]``).
    tolerance: float | None = None


# ---------------------------------------------------------------------------- what an evaluator is handed
class DataSource(Protocol):
    """Where an evaluator loads its items from: a local data folder or the Hub (``prunelab.evaluate.DataSource``)."""

    def local(self, *parts: str) -> Path | None:
        """The local path of a task's data (``source.local("mmlu")``), or None when data comes from the Hub."""

    def describe(self) -> str:
        """The folder, or ``huggingface-hub``: for messages and records."""


class Subset(Protocol):
    """Which items of each group to evaluate (``prunelab.evaluate.Subset``, or one chunk's slice of it)."""

    def select(self, group: str, n: int) -> list[int]:
        """Sorted row indices of one group of ``n`` items."""


@dataclass(frozen=True)
class Evaluator:
    """An evaluation task: loads its items, then scores them through the ``Scorer`` it is given.

    Like lm-evaluation-harness, the task only builds requests (log-likelihoods, generations,
    rolling windows); the engine (``prunelab.evaluate.Engine``) or a layer sweep answers them for any model.
    """

    name: str
    description: str
    load_items: Callable[[DataSource, Subset], list[Item]]
    evaluate: Callable[[Scorer, list[Item], dict[str, Any]], TaskResult]
    options: tuple[Option, ...] = field(default_factory=tuple)
    #: What the task asks of the model, as lm-evaluation-harness's ``output_type``:
    #: ``"loglikelihood"`` (scored continuations), ``"loglikelihood_rolling"`` (window NLLs) or
    #: ``"generate_until"`` (greedy text). A layer sweep shares work between variants only for
    #: scoring; generation diverges after the prompt, so the runner evaluates generating tasks one
    #: pruned model at a time.
    output_type: Literal["loglikelihood", "loglikelihood_rolling", "generate_until"] = "loglikelihood"
    #: What each record reports and how to compare it with dense (``MetricSpec``); a study needs it.
    metrics: tuple[MetricSpec, ...] = ()
    #: For a task whose units are known only once the model is (WikiText's windows depend on the
    #: tokenizer): ``count_units(scorer, items, options)`` returns how many units the items make,
    #: so the runner can split them into chunks without scoring any. Such a task selects its units
    #: with ``item.data["subset"]``, which the runner replaces by each chunk's slice.
    count_units: Callable[[Scorer, list[Item], dict[str, Any]], int] | None = None
    #: Whether a variant is compared with the dense model on the same inputs (KL divergence, same
    #: top token): only such a task is handed ``options["reference"]``, a ``ReferenceStore`` where
    #: the dense model's evaluation of a chunk saves what a variant's evaluation of that chunk reads.
    #: The runner evaluates dense's chunk first; a Ray run holds back only these tasks' chunks for it.
    compares_with_dense: bool = False

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"task '{self.name}'", self.options)

    @property
    def generates(self) -> bool:
        """Whether the task generates text (and so cannot share a layer sweep)."""
        return self.output_type == "generate_until"


@dataclass(frozen=True)
class Recovery:
    """A recovery ("healing") method: fine-tunes a pruned model in place, keeping its masks.

    ``recover(model, options, context)`` trains, leaves a plain model (adapters merged) and returns
    a JSON-able report (at least the loss curve). The core re-applies the pruning masks afterwards,
    so a pruned weight stays zero whatever the method did (see ``prunelab.prune.recovery.heal``).
    """

    name: str
    description: str
    recover: Callable[[Any, dict[str, Any], RecoveryContext], dict[str, Any]]
    options: tuple[Option, ...] = field(default_factory=tuple)

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"recovery '{self.name}'", self.options)


# ---------------------------------------------------------------------------- what an evaluator asks
@dataclass
class LoglikelihoodRequest:
    """Score ``continuations`` after ``context``; requests of one ``group`` share a prefix."""

    context: str
    continuations: Sequence[str]
    group: str = ""


@dataclass
class GenerationRequest:
    """Greedy-generate after ``context`` until a stop string, an end token or ``max_new_tokens``."""

    context: str
    stop: Sequence[str] = ()
    max_new_tokens: int = 256
    group: str = ""


class DenseReference(Protocol):
    """The dense model's final hidden states on the same windows (``prunelab.evaluate.DenseReference``):
    ``Scorer.window_scores`` recomputes the dense logits from them to compare a variant with dense."""

    hidden: torch.Tensor  # (windows, seqlen, hidden_size)
    windows: torch.Tensor  # (windows, seqlen) token ids
    head: str  # fingerprint of the output head the hidden states were made with


class WindowScores(Protocol):
    """Per window: summed NLL and scored token count; with a reference, per-token KL and top-1 agreement;
    with ``keep_hidden``, the final hidden states (``prunelab.evaluate.WindowScores``)."""

    nll_sums: list[float]
    counts: list[int]
    kl: list[torch.Tensor]  # float32 per scored token, nats
    agree: list[torch.Tensor]  # bool per scored token
    hidden: list[torch.Tensor]


class ReferenceStore(Protocol):
    """``options["reference"]`` of a task that ``compares_with_dense``: one task chunk's reference file,
    written by the dense model's evaluation and read by every variant's (``prunelab.evaluate.reference``)."""

    is_dense: bool  # whether this evaluation is the dense model's (it saves; the others load)

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None: ...

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None: ...


class Scorer(Protocol):
    """The one scoring interface an evaluator is given: log-likelihoods, generation, window NLLs.

    ``prunelab.evaluate.Engine`` implements it for one model, and a layer sweep's view implements
    it for one variant of the sweep, so an evaluator never knows which it is scoring through.
    """

    tokenizer: Any
    adapter: Any  # where the decoder layers and the output head are (``prunelab.model.Adapter``)
    chat_template: bool

    def loglikelihoods(self, requests: Sequence[LoglikelihoodRequest],
                       progress: Progress | None = None) -> list[list[float]]: ...

    def generate(self, requests: Sequence[GenerationRequest], progress: Progress | None = None) -> list[str]: ...

    def window_nll(self, windows: torch.Tensor, progress: Progress | None = None,
                   head_chunk: int = 512) -> tuple[list[float], list[int]]: ...

    def window_scores(self, windows: torch.Tensor, *, reference: DenseReference | None = None,
                      keep_hidden: bool = False, progress: Progress | None = None,
                      head_chunk: int = 512) -> WindowScores: ...


# ---------------------------------------------------------------------------- what a recovery is handed
class RecoveryContext(Protocol):
    """What a recovery method may use besides the model and its options (``prunelab.prune.RecoveryContext``).

    ``adapter_dir`` is where a method that trains an adapter saves it (None: do not save).
    """

    adapter: Any  # where the decoder layers are (``prunelab.model.Adapter``)
    tokenizer: Any
    seed: int
    masks: Any  # the pruning masks the core re-applies afterwards (``prunelab.prune.MaskSet``)
    adapter_dir: Path | None

    def batches(self, source: str, seqlen: int, batch: int, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` batches of ``batch`` token windows of ``seqlen`` from the training text ``source``."""

    def report_step(self, step: int, loss: float) -> None:
        """Call after every optimizer step (the CLI draws a progress bar from it)."""


# ---------------------------------------------------------------------------- what an evaluator produces
@dataclass(frozen=True)
class Item:
    """One evaluation item: a stable id, the group it belongs to, and its payload."""

    id: str
    group: str
    data: dict[str, Any]


@dataclass
class TaskResult:
    """Metrics for one task plus one record per item (for ``items.parquet`` and paired tests).

    ``records`` rows share the keys ``item_id`` and ``correct`` (bool or None) plus task-specific
    fields (prediction, log-likelihoods, generated text, NLL sums).
    """

    task: str
    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    breakdown: dict[str, dict[str, Any]] = field(default_factory=dict)


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports them."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


# ---------------------------------------------------------------------------- the hooks
@hookspec
def prunelab_strategies() -> list[Strategy]:
    """Return the pruning strategies this plugin adds."""


@hookspec
def prunelab_evaluators() -> list[Evaluator]:
    """Return the evaluation tasks this plugin adds."""


@hookspec
def prunelab_recoveries() -> list[Recovery]:
    """Return the recovery (healing) methods this plugin adds."""
