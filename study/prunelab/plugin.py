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

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pluggy

from prunelab.errors import PrunelabError
from prunelab.options import Option, OptionSet, at_least

__all__ = [
    "AnswerFields", "DataSource", "DenseReference", "Evaluator", "GenerationRequest", "Item", "LoglikelihoodRequest",
    "MetricSpec", "Option", "OptionSet", "Progress", "Recovery", "RecoveryContext", "ReferenceStore", "Scorer",
    "SizeAxis", "Strategy", "Subset", "TaskResult", "WindowScores", "at_least", "hookimpl", "hookspec", "mean_and_stderr",
]

if TYPE_CHECKING:  # a third-party package, for annotations only (nothing of prunelab's stages)
    import torch

Progress = Callable[[int], None]

hookspec = pluggy.HookspecMarker("prunelab")
hookimpl = pluggy.HookimplMarker("prunelab")


SizeKind = Literal["layers", "weights", "width", "parameters"]
SIZE_KINDS: tuple[str, ...] = ("layers", "weights", "width", "parameters")


@dataclass(frozen=True)
class SizeAxis:
    """What a strategy's variants differ by in size, so the report draws the chart that fits them.

    ``kind`` says what is removed, and where the amount comes from:

    * ``"layers"`` -- whole decoder layers; the amount is the number of layers the variant actually
      removed, read from the pruned model at run time (never from an option: ``k = 5`` that removes
      6 layers is drawn at 6);
    * ``"weights"`` -- a fraction of the targeted weights set to zero (the tensors keep their shapes);
    * ``"width"`` -- a fraction of one width axis removed (``label`` names it: "MLP channels",
      "attention heads"); the tensors and the config shrink;
    * ``"parameters"`` -- the variant's parameter count itself (a strategy that targets a size).

    For ``weights`` and ``width`` the amount asked for is ``amount(options)`` (the strategy reads its
    own validated options, e.g. an N:M pattern fixing the sparsity), by default the value of
    ``option`` as a fraction in [0, 1]. What the variant achieved can differ (a count rounded to
    whole channels, or to a multiple a runtime needs): ``achieved(report)``, when declared, reads it
    from the strategy's prune report after pruning (the JSON-able dict ``prune()`` returns: the
    strategy's own report with ``options`` and ``parameters``; also what ``prunelab.json`` and the
    run's manifest keep), and the report draws the variant there. The core reads only what the
    function returns, never a field of the report itself. ``option`` names the option that sets the
    amount: the report keeps it out of a line's label (it is the x axis, not a setting). A strategy
    with several width axes declares one ``SizeAxis`` each; a variant that removes along more than
    one is "combined".
    """

    kind: SizeKind
    option: str | None = None
    label: str = ""
    amount: Callable[[Mapping[str, Any]], float | None] | None = None
    achieved: Callable[[Mapping[str, Any]], float | None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SIZE_KINDS:
            raise PrunelabError(f"size axis kind {self.kind!r} is not one of {', '.join(SIZE_KINDS)}")

    def fraction(self, options: Mapping[str, Any]) -> float | None:
        """The fraction of this axis a variant with these (validated) options asks to remove; None for
        the kinds measured on the model (layers, parameters) or an option that is not a number."""
        if self.kind in ("layers", "parameters"):
            return None
        try:
            value = self.amount(options) if self.amount is not None else options.get(self.option or "")
        except (KeyError, TypeError, ValueError, PrunelabError):
            return None
        return _number(value)

    def achieved_fraction(self, report: Mapping[str, Any] | None) -> float | None:
        """The fraction a pruned variant removed, read from its prune report by the declared
        ``achieved``; None when not declared, no report, or the report does not hold it (an older run)."""
        if self.kind in ("layers", "parameters") or self.achieved is None or report is None:
            return None
        try:
            value = self.achieved(report)
        except (KeyError, IndexError, TypeError, ValueError, PrunelabError):
            return None
        return _number(value)


def _number(value: Any) -> float | None:
    """A declared amount as a float; None for a missing or non-numeric one (a bool is not an amount)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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
    #: The decoder layers a variant removes: ``removes_layers(options)``, or
    #: ``removes_layers(options, num_layers)`` for layers that depend on the model (every k-th of its
    #: ``num_layers`` decoder layers). A depth strategy whose layers follow from these declares it,
    #: and the runner then scores its single-layer variants through one shared layer sweep and the
    #: report draws them on the layer chart. None (the default, or returned): not known without
    #: scoring the model (a plan's layers depend on its scores).
    removes_layers: Callable[..., Sequence[int] | None] | None = None
    #: Options whose study-file value ``"each"`` expands to one grid point per decoder layer
    #: (``layers = "each"``), known once the model is loaded.
    each_layer: tuple[str, ...] = ()
    #: What its variants differ by in size (``SizeAxis``): the report draws each axis's chart and
    #: sets every variant beside the others at equal parameter count. Empty: no sweep chart (the
    #: variant still appears in the size comparison by its recorded parameter count).
    size: tuple[SizeAxis, ...] = ()
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

    def removed_layers(self, options: Mapping[str, Any], num_layers: int | None = None) -> list[int] | None:
        """The layers a variant with these options removes from a model of ``num_layers`` decoder
        layers, or None when the strategy cannot tell (a model-dependent declaration without the count)."""
        if self.removes_layers is None:
            return None
        takes_model = num_layers is not None and accepts_positional(self.removes_layers, 2)
        if not takes_model and not accepts_positional(self.removes_layers, 1):
            return None  # needs the model's layer count, which the caller does not know
        try:
            layers = self.removes_layers(options, num_layers) if takes_model else self.removes_layers(options)
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
    #: For an accuracy metric of a multiple-choice task (one that declares ``Evaluator.answers``): the
    #: record key holding the answer this metric scored (e.g. ``"prediction"``; ``acc_norm``'s own
    #: argmax under another key). The report counts each metric's answers from its own field.
    prediction: str | None = None
    #: For a mean metric of a task that ``compares_with_dense``: which part of fidelity to the dense
    #: model it measures, for the report's fidelity table: ``"divergence"`` (WikiText's KL per token,
    #: lower is closer) or ``"agreement"`` (the share of same top tokens). None: not a fidelity metric.
    fidelity: Literal["divergence", "agreement"] | None = None
    #: For a divergence: the record key listing the per-token values the item's value is the mean of
    #: (WikiText's ``kl_tokens``); the report pools them over a variant's items for the 99th percentile.
    per_token: str | None = None

    def __post_init__(self) -> None:
        if self.fidelity not in (None, "divergence", "agreement"):
            raise PrunelabError(f"MetricSpec {self.name}: fidelity must be divergence, agreement or None, "
                                f"got {self.fidelity!r}")
        if (self.fidelity or self.per_token) and self.kind != "mean":
            raise PrunelabError(f"MetricSpec {self.name}: fidelity and per_token are for a mean metric, not {self.kind}")


@dataclass(frozen=True)
class AnswerFields:
    """Which record keys of a multiple-choice task name the gold answer, the item's category and its choices.

    The report builds its multiple-choice tables from these names alone, for every accuracy metric
    separately: how often each answer was given (from the metric's ``MetricSpec.prediction``) next to
    the gold answers, accuracy per category, and the chance level drawn on the accuracy charts.
    """

    target: str  # the gold answer as a label comparable with a prediction ("B")
    category: str | None = None  # a coarse group of the item (MMLU: stem, humanities, ...)
    #: A record key listing one entry per choice (log-likelihoods, choice texts): its length is the
    #: number of choices and 1 / length the chance accuracy. Items may differ; then no chance line.
    choices: str | None = None
    chance: float | None = None  # a fixed chance accuracy, when the records list no choices

    def __post_init__(self) -> None:
        if self.chance is not None and not 0 < self.chance < 1:
            raise PrunelabError(f"AnswerFields.chance must be in (0, 1), got {self.chance}")


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
    #: ``load_items(source, subset)`` or ``load_items(source, subset, options)``: the task's items, the
    #: subset chosen; ``options`` are its validated options (a data file the user names).
    load_items: Callable[..., list[Item]]
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
    #: For a multiple-choice task: which record keys hold the gold answer, the category and the
    #: choices (``AnswerFields``), so the report builds its answer, per-category and chance tables.
    answers: AnswerFields | None = None

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"task '{self.name}'", self.options)

    def items(self, source: DataSource, subset: Subset, options: Mapping[str, Any]) -> list[Item]:
        """Load the items: ``load_items`` with the options when it takes them (the two-argument form works too)."""
        if accepts_positional(self.load_items, 3):
            return self.load_items(source, subset, dict(options))
        return self.load_items(source, subset)

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
    #: Whether it learns from a teacher (the dense model): the core then finds one (``--teacher``,
    #: the source recorded in the pruned folder's ``prunelab.json``, a study's dense model), checks
    #: that it speaks the student's vocabulary and hands it over as ``context.teacher``.
    uses_teacher: bool = False
    #: Checks that involve several options at once (a token budget below one step), run with the
    #: option checks, before any model is loaded; returns an error message or None.
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    #: How many optimizer steps these options make (the progress bar's total); None: not known.
    planned_steps: Callable[[Mapping[str, Any]], int] | None = None

    @property
    def option_set(self) -> OptionSet:
        return OptionSet(f"recovery '{self.name}'", self.options)

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Every option with its default, each checked, then the checks across options."""
        validated = self.option_set.validate(options)
        if self.check is not None and (problem := self.check(validated)):
            raise PrunelabError(f"recovery '{self.name}': {problem}")
        return validated

    def steps(self, options: Mapping[str, Any]) -> int | None:
        """The optimizer steps of validated options, when the method declares them."""
        return int(self.planned_steps(options)) if self.planned_steps is not None else None


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
    dense_head: Any  # that head (``prunelab.evaluate.DenseHead``, ``ReferenceStore.load_head``) or None:
    #                  needed where the scored model's own head differs (width's hidden axis, include_head)


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

    def save_head(self, adapter: Any) -> None:
        """Keep the dense model's output head, once per run, for variants whose own head differs."""

    def load_head(self, fingerprint: str) -> Any:
        """The kept dense head (``DenseHead``) whose fingerprint is ``fingerprint``, else None."""


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
    ``teacher`` is the dense model's adapter for a method that declares ``uses_teacher`` (else
    None), ``layer_map[i]`` the teacher's index of student layer ``i`` (None when unknown).
    """

    adapter: Any  # where the decoder layers are (``prunelab.model.Adapter``)
    tokenizer: Any
    seed: int
    masks: Any  # the pruning masks the core re-applies afterwards (``prunelab.prune.MaskSet``)
    adapter_dir: Path | None
    teacher: Any  # ``prunelab.model.Adapter`` or None
    layer_map: list[int] | None

    def batches(self, source: str, seqlen: int, batch: int, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` batches of ``batch`` token windows of ``seqlen`` from the training text ``source``."""

    def report_step(self, step: int, loss: float, tokens: int | None = None) -> float | None:
        """Call after every optimizer step (``tokens``: trained so far); returns tokens/s when known."""

    def start_clock(self) -> None:
        """Start timing tokens/s now (call just before the first step)."""

    def hold_masks(self) -> Any:
        """Pruned weights held at zero in full-parameter training: ``.after_step()`` each step, ``.remove()``."""

    def module_masks(self) -> dict[Any, torch.Tensor]:
        """The keep-mask of each masked module's ``weight``, by module (to mask an adapter's update)."""


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


#: What a plugin's own functions are (not declarations about it): ``prunelab plugins`` leaves them out.
BEHAVIOUR = {"name", "description", "options", "prune", "load_items", "evaluate", "recover"}


def declarations(plugin: Strategy | Evaluator | Recovery) -> dict[str, str]:
    """What a plugin declares besides its options, as text (``prunelab plugins NAME``).

    Every field of its description except its name, its own functions and options: a function
    (``removes_layers``) says which arguments it takes, a value is shown as is; unset ones are left out.
    """
    shown: dict[str, str] = {}
    for item in dataclasses.fields(plugin):
        value = getattr(plugin, item.name)
        if item.name in BEHAVIOUR or value is None or value == () or value is False:
            continue
        if callable(value):
            takes = "(options, num_layers)" if accepts_positional(value, 2) else "(options)"
            shown[item.name] = f"declared: a function {takes}" if item.name != "count_units" else "declared"
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for index, entry in enumerate(value):  # one line each: metrics acc, metrics acc_norm
                shown[f"{item.name} {getattr(entry, 'name', index)}"] = _describe(entry)
        else:
            shown[item.name] = _describe(value)
    return shown


def _describe(value: Any) -> str:
    """A declaration's value as one line: a dataclass by its set fields (``MetricSpec``, ``AnswerFields``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return ", ".join(f"{k}=declared" if callable(v) else f"{k}={v!r}"
                         for k, v in fields.items() if v not in (None, "", ()))
    return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def accepts_positional(function: Callable[..., Any], count: int) -> bool:
    """Whether ``function`` can be called with ``count`` positional arguments (a declaration's longer form)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: the short form
        return False
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


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
