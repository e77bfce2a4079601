"""What each variant of a run is, in size: removed layers, parameter counts and its declared axes.

The runner records one ``VariantSize`` per variant while it runs (``Session`` in the runner: dense
and the layer-sweep variants when it plans, every pruned model right after pruning it), read from
the model itself, and stores them in the manifest under ``sizes``. The report draws its sweep
charts and the equal-size comparison from these records and from the strategies' ``SizeAxis``
declarations as recorded, so ``prunelab report`` on an archived run needs no plugin. A run recorded
before sizes existed falls back to today's declarations applied to its stored options (and the
layers ``drop_layers`` reported), without parameter counts.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.plugin import SizeAxis, Strategy
from prunelab.records import DENSE

RECOVERY_SEPARATOR = "+"  # a healed twin's strategy is ``<strategy>+<method>`` (``prune.recovery.healed_name``)


@dataclass(frozen=True)
class AxisAmount:
    """One declared size axis of a variant and how much of it the variant removed.

    ``amount``: what the variant removed -- for ``weights`` and ``width`` a fraction in [0, 1], the
    achieved one where the strategy declares how to read it (``SizeAxis.achieved``), else the one
    its options asked for; the number of removed layers for ``layers``, the parameter count for
    ``parameters``; None when it is not known. ``requested``: the fraction the options asked for
    (``weights`` and ``width``; None for the kinds measured on the model). The charts draw ``amount``.
    """

    kind: str
    option: str | None
    label: str
    amount: float | None
    requested: float | None = None

    @property
    def percent(self) -> float | None:
        """A fraction as a percentage (rounded off float noise: 0.1 -> 10.0, not 10.000000000000002)."""
        return _percent(self.amount)

    @property
    def requested_percent(self) -> float | None:
        """The fraction asked for, as a percentage."""
        return _percent(self.requested)

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> AxisAmount:
        """A recorded axis; one recorded before ``requested`` existed had only the options' amount
        (``weights``/``width``), so that is its requested amount too."""
        amount = record.get("amount")
        requested = record["requested"] if "requested" in record else (
            amount if record["kind"] in REQUESTED_KINDS else None)
        return cls(record["kind"], record.get("option"), record.get("label") or "", amount, requested)


REQUESTED_KINDS = ("weights", "width")  # the kinds whose amount an option asks for (``SizeAxis.fraction``)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else round(fraction * 100, 9)


@dataclass(frozen=True)
class VariantSize:
    """A variant's size as recorded at run time (``None``: not recorded, e.g. a run made before sizes)."""

    removed_layers: tuple[int, ...] | None = None
    #: The strategy chose the layers from its options alone (``Strategy.removes_layers``): a
    #: one-layer variant of it belongs to the layer sweep, drawn by layer index (unless healed).
    layers_from_options: bool = False
    healed: bool = False  # a healed twin (``[recovery]``): trained after pruning, not the sweep's model
    parameters: int | None = None
    non_embedding_parameters: int | None = None
    zero_parameters: int | None = None
    axes: tuple[AxisAmount, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["removed_layers"] = None if self.removed_layers is None else list(self.removed_layers)
        record["axes"] = [asdict(a) for a in self.axes]
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> VariantSize:
        layers = record.get("removed_layers")
        return cls(removed_layers=None if layers is None else tuple(int(i) for i in layers),
                   layers_from_options=bool(record.get("layers_from_options")), healed=bool(record.get("healed")),
                   parameters=record.get("parameters"), non_embedding_parameters=record.get("non_embedding_parameters"),
                   zero_parameters=record.get("zero_parameters"),
                   axes=tuple(AxisAmount.from_json(a) for a in record.get("axes") or ()))

    @property
    def sweep_layer(self) -> int | None:
        """The one removed layer of a one-layer-sweep variant; None for every other variant."""
        layers = self.removed_layers
        single = self.layers_from_options and not self.healed and layers is not None and len(layers) == 1
        return layers[0] if single else None

    @property
    def layers_removed(self) -> int | None:
        """How many layers a removal plan took (a ``layers`` axis whose layers the options do not name)."""
        axis = self.axis("layers")
        return None if axis is None or axis.amount is None or self.layers_from_options else int(axis.amount)

    def axis(self, kind: str) -> AxisAmount | None:
        """The variant's first declared axis of this kind."""
        return next((a for a in self.axes if a.kind == kind), None)

    @property
    def axis_options(self) -> set[str]:
        """The options that set the amounts (a method's size, never part of its name)."""
        return {a.option for a in self.axes if a.option}

    @property
    def swept_options(self) -> set[str]:
        """The options that are a sweep chart's x axis, kept out of its lines' labels: every axis
        option but one that names the layers themselves (a one-layer sweep's x is the layer index)."""
        return {a.option for a in self.axes if a.option and not (a.kind == "layers" and self.layers_from_options)}

    @property
    def width_axes(self) -> list[AxisAmount]:
        """The width axes this variant removes along (amount above 0)."""
        return [a for a in self.axes if a.kind == "width" and a.amount]


def variant_size(strategy: Strategy | None, options: Mapping[str, Any], *, removed_layers: Sequence[int] | None,
                 healed: bool = False, counts: Any = None, num_layers: int | None = None,
                 report: Mapping[str, Any] | None = None) -> VariantSize:
    """The record of one variant: its strategy's declared axes with this variant's amounts.

    ``removed_layers``: read from the model after pruning (or, for a layer-sweep variant, the one
    layer the sweep leaves out); ``counts``: ``prunelab.model.bench.ParameterCounts`` of the variant;
    ``num_layers``: the model's decoder layers, for a strategy whose declared layers depend on it;
    ``report``: the variant's prune report, from which an axis that declares ``achieved`` reads
    what was removed (None: not pruned here, e.g. a layer-sweep variant; the requested amount stands).
    """
    removed = None if removed_layers is None else tuple(sorted(int(i) for i in removed_layers))
    declared = strategy.removed_layers(options, num_layers) if strategy is not None else None
    axes = tuple(_amount(axis, options, removed, counts, report) for axis in (strategy.size if strategy else ()))
    return VariantSize(removed_layers=removed, layers_from_options=declared is not None, healed=healed,
                       parameters=getattr(counts, "total", None),
                       non_embedding_parameters=getattr(counts, "non_embedding", None),
                       zero_parameters=getattr(counts, "zeros", None), axes=axes)


def _amount(axis: SizeAxis, options: Mapping[str, Any], removed: tuple[int, ...] | None, counts: Any,
            report: Mapping[str, Any] | None) -> AxisAmount:
    requested = None
    if axis.kind == "layers":
        amount = None if removed is None else float(len(removed))
    elif axis.kind == "parameters":
        amount = None if counts is None else float(counts.total)
    else:
        requested = axis.fraction(options)
        achieved = axis.achieved_fraction(report)
        amount = requested if achieved is None else achieved
    return AxisAmount(axis.kind, axis.option, axis.label, amount, requested)


# ------------------------------------------------------------------------------------------ reading a run
def run_sizes(manifest: Mapping[str, Any], variants: Sequence[tuple[str, str, str]]) -> dict[str, VariantSize]:
    """Each variant's size record: as the run recorded it, else (an older run) from today's declarations.

    ``variants``: (variant, strategy, params JSON) of every variant in the run's tables.
    """
    recorded = manifest.get("sizes") or {}
    sizes = {name: VariantSize.from_json(record) for name, record in recorded.items()}
    missing = [v for v in variants if v[0] not in sizes]
    if missing:
        reports = manifest.get("variants") or {}
        num_layers = manifest.get("model_layers")
        sizes.update({name: legacy_size(strategy, json.loads(params or "{}"), reports.get(name) or {}, num_layers)
                      for name, strategy, params in missing})
    return sizes


def summary_sizes(summary: Any) -> dict[str, VariantSize]:
    """Size records from a summary table alone (no manifest): today's declarations on its options."""
    variants = summary.select("variant", "strategy", "params").unique(maintain_order=True).iter_rows()
    return run_sizes({}, list(variants))


def legacy_size(strategy_name: str, params: dict[str, Any], report: Mapping[str, Any],
                num_layers: int | None = None) -> VariantSize:
    """A run recorded before sizes: the installed strategy's declarations on the stored options.

    The removed layers are the strategy's declared ones, else what the core's ``drop_layers``
    reported when the variant was pruned (``dropped_layers``); an axis that declares ``achieved``
    reads it from the stored prune report (``report``); parameter counts are unknown.
    """
    if strategy_name == DENSE:
        return VariantSize(removed_layers=())
    from prunelab.prune.masks import validate_options
    from prunelab.registry import default_registry

    registry = default_registry()
    healed = strategy_name not in registry.strategies and RECOVERY_SEPARATOR in strategy_name
    name = strategy_name.rsplit(RECOVERY_SEPARATOR, 1)[0] if healed else strategy_name
    found = registry.strategies.get(name)
    if found is None:
        return VariantSize()
    strategy = found[0]
    options = params
    with contextlib.suppress(PrunelabError, TypeError, ValueError):
        options = validate_options(strategy, params)
    removed = strategy.removed_layers(params, num_layers)
    if removed is None and isinstance(report.get("dropped_layers"), list):
        removed = report["dropped_layers"]
    return variant_size(strategy, options, removed_layers=removed, healed=healed, num_layers=num_layers, report=report)


def slug(text: str) -> str:
    """A label as a file-name-safe chart name part (``MLP channels`` -> ``mlp_channels``)."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "axis"
