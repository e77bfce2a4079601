"""Methods compared at equal size and at equal measured speed: which one is best in each bin, with a paired test.

"Equal size" is a bin of the parameter count: every variant is placed at the share of dense's
parameters it keeps (a weight-pruning variant at its non-zero count, for reference: its stored
size and speed are dense's) and binned in steps of ``BIN_POINTS`` percentage points of dense's
count (100-95 %, 95-90 %, ...). Within a bin each method (a strategy with its varying settings, a
width strategy per set of axes) is represented by its smallest variant there, so no method is
favoured by being larger inside the bin. A variant whose strategy declares a ``weights`` size axis
(zeros stored in dense tensors) is shown beside the bin's best as a *reference* but never ranked:
its file and its speed are dense's, so "best at this size" would not mean what it says; the
comparison is between methods that make the model smaller.

"Equal speed" is a bin of the measured speedup over dense (``[bench]``): the decode speedup (tokens/s
at the first batch size measured, batch 1 by default: the per-token latency a deployer with a
latency target waits on), or the prefill speedup where the bench table has no decode speedup; one
table uses one of them and says which. Bins are ``SPEED_STEP`` (0.1x) wide and centred on its
multiples (x1.3 = 1.25-1.35x): timing noise of a few percent keeps a model in its bin, and dense and
weight pruning -- zeros stored in dense tensors cost dense's time, so they measure about x1.0 unless
the bench ran 2:4 sparse kernels -- share the x1.0 bin instead of being split at 1.0. Each variant
sits at its *measured* speedup (a 2:4 variant measured with sparse kernels is faster); a method is
represented in a bin by its fastest variant there, so none is favoured by being slower inside it.

In both tables methods are ranked by their change vs dense on each task and metric; the best is
then tested against the runner-up on the items both were scored on, with the test a variant gets
against dense (exact McNemar for accuracy, the exact sign test for perplexity and means), and Holm
adjusts over the bins of one task and metric. A bin holding one method has nothing to compare and
is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import polars as pl

from prunelab.records import DECODE_SPEEDUP, DENSE, PREFILL_SPEEDUP
from prunelab.report.charts import effective_parameters, method_labels, speedup_label
from prunelab.report.findings import harm
from prunelab.report.sizes import VariantSize
from prunelab.report.stats import ALPHA, harmful, holm_adjust, paired_test

BIN_POINTS = 5.0  # width of a size bin, in percentage points of dense's parameter count
SPEED_STEP = 0.1  # width of a speed bin, in multiples of dense's speed, centred on multiples of it
BEST = "best (Holm p<0.05)"
NOT_DISTINGUISHED = "not distinguishable from the runner-up"
NOT_CONFIRMED = "runner-up better on the paired items"

_TEST_SCHEMA = {
    "n_paired": pl.Int64, "diff": pl.Float64, "diff_ci_low": pl.Float64, "diff_ci_high": pl.Float64,
    "rel_diff": pl.Float64, "test": pl.String, "p_value": pl.Float64, "p_holm": pl.Float64, "verdict": pl.String,
}
_METRIC_SCHEMA = {"task": pl.String, "metric": pl.String, "label": pl.String, "kind": pl.String,
                  "higher_is_better": pl.Boolean}
# what each of the two compared methods shows, per table: a candidate's key is its column's suffix
SIZE_MEMBER = {"method": pl.String, "variant": pl.String, "parameters": pl.Int64, "kept": pl.Float64,
               "value": pl.Float64, "rel_change": pl.Float64, "decode_speedup": pl.Float64}
# the bin's best weight-pruning variant, shown for reference beside the ranked methods (equal size only)
REFERENCE_MEMBER = {"method": pl.String, "variant": pl.String, "kept": pl.Float64, "value": pl.Float64,
                    "rel_change": pl.Float64}
SPEED_MEMBER = {"method": pl.String, "variant": pl.String, "speedup": pl.Float64, "parameters": pl.Int64,
                "kept": pl.Float64, "value": pl.Float64, "rel_change": pl.Float64}


def _schema(bounds: dict[str, Any], member: dict[str, Any]) -> dict[str, Any]:
    """A comparison table's columns: the metric, the bin's bounds, both methods, their paired test."""
    return {**_METRIC_SCHEMA, **bounds, "methods": pl.Int64, "others": pl.String,
            **{f"{prefix}_{name}": dtype for prefix in ("best", "runner") for name, dtype in member.items()},
            **_TEST_SCHEMA}


EQUAL_SIZE_SCHEMA = {**_schema({"kept_low": pl.Float64, "kept_high": pl.Float64}, SIZE_MEMBER),
                     **{f"reference_{name}": dtype for name, dtype in REFERENCE_MEMBER.items()}}
EQUAL_SPEED_SCHEMA = _schema({"speed": pl.String, "speed_label": pl.String, "speed_low": pl.Float64,
                              "speed_high": pl.Float64}, SPEED_MEMBER)


def size_bin(kept: float) -> int:
    """The bin of a variant keeping ``kept`` % of dense's parameters: 0 for 95-100 %, 1 for 90-95 %, ..."""
    return max(0, math.floor((100.0 - kept) / BIN_POINTS + 1e-9))


def speed_bin(speedup: float) -> int:
    """The bin of a variant ``speedup`` times as fast as dense: its nearest multiple of ``SPEED_STEP``
    (in steps), upper edge exclusive: 13 for 1.25 <= speedup < 1.35."""
    return math.floor(speedup / SPEED_STEP + 0.5 + 1e-9)


def speed_basis(bench: pl.DataFrame | None) -> str | None:
    """The bench column the equal-speed table bins by: the decode speedup where any variant has one,
    else the prefill speedup; None where neither was measured against dense."""
    for column in (DECODE_SPEEDUP, PREFILL_SPEEDUP):
        if bench is not None and column in bench.columns and bench[column].drop_nulls().len():
            return column
    return None


def equal_size_table(items: pl.DataFrame, summary: pl.DataFrame, sizes: dict[str, VariantSize],
                     bench: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per task, metric and size bin holding at least two methods (``EQUAL_SIZE_SCHEMA``)."""
    dense = sizes.get(DENSE)
    if dense is None or not dense.parameters:
        return pl.DataFrame(schema=EQUAL_SIZE_SCHEMA)

    def bounds(index: int) -> dict[str, Any]:
        return {"kept_low": 100.0 - BIN_POINTS * (index + 1), "kept_high": 100.0 - BIN_POINTS * index}

    candidates = _candidates(summary, sizes, _speedups(bench, DECODE_SPEEDUP), "decode_speedup")
    return _comparison(items, candidates, EQUAL_SIZE_SCHEMA, SIZE_MEMBER,
                       place=lambda c: size_bin(c["kept"]) if c["parameters"] is not None else None,
                       order=lambda c: c["parameters"], bounds=bounds, references=True)


def equal_speed_table(items: pl.DataFrame, summary: pl.DataFrame, sizes: dict[str, VariantSize],
                      bench: pl.DataFrame | None) -> pl.DataFrame:
    """One row per task, metric and speed bin holding at least two methods (``EQUAL_SPEED_SCHEMA``);
    empty without a bench table measured against dense."""
    column = speed_basis(bench)
    if column is None:
        return pl.DataFrame(schema=EQUAL_SPEED_SCHEMA)
    label = speedup_label(bench, column)

    def bounds(index: int) -> dict[str, Any]:
        return {"speed": column, "speed_label": label, "speed_low": round((index - 0.5) * SPEED_STEP, 9),
                "speed_high": round((index + 0.5) * SPEED_STEP, 9)}

    candidates = _candidates(summary, sizes, _speedups(bench, column), "speedup")
    return _comparison(items, candidates, EQUAL_SPEED_SCHEMA, SPEED_MEMBER,
                       place=lambda c: speed_bin(c["speedup"]) if c["speedup"] is not None else None,
                       order=lambda c: -c["speedup"], bounds=bounds)


def _candidates(summary: pl.DataFrame, sizes: dict[str, VariantSize], speeds: dict[str, float | None],
                speed_key: str) -> list[dict[str, Any]]:
    """Every pruned variant's summary row that can be compared, with its method, where it stands in
    size (parameters placed, % of dense kept: None without a recorded count) and its speedup.

    Left out: dense, a row without a paired test against dense, and one-layer sweep variants (they
    diagnose layers; the plans are the method). ``zeros_only``: the strategy declares a ``weights``
    axis, so the variant keeps dense's tensors (a reference at equal size, not a competitor)."""
    dense = sizes.get(DENSE)
    methods = method_labels(summary, sizes)
    out = []
    for row in summary.iter_rows(named=True):
        size = sizes.get(row["variant"], VariantSize())
        if row["strategy"] == DENSE or row["p_value"] is None or size.sweep_layer is not None:
            continue
        counted = size.parameters is not None and dense is not None and bool(dense.parameters)
        placed = effective_parameters(size, dense) if counted else None
        out.append({**row, "method": methods[row["variant"]], "parameters": placed,
                    "kept": 100 * placed / dense.parameters if counted else None,
                    speed_key: speeds.get(row["variant"]), "zeros_only": size.axis("weights") is not None})
    return out


def _comparison(items: pl.DataFrame, candidates: list[dict[str, Any]], schema: dict[str, Any],
                member: dict[str, Any], place: Callable[[dict[str, Any]], int | None],
                order: Callable[[dict[str, Any]], float], bounds: Callable[[int], dict[str, Any]],
                references: bool = False) -> pl.DataFrame:
    """The best method of each bin against the runner-up, Holm over the bins of one task and metric.

    ``place`` gives a candidate's bin (None: it has no place on this axis), ``order`` ranks a
    method's variants within a bin (the first represents it), ``bounds`` a bin's columns.
    ``references``: zeros-only variants are set beside the ranking (``reference_*``), not in it."""
    out: list[dict[str, Any]] = []
    by_metric: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in candidates:
        by_metric.setdefault((c["task"], c["metric"]), []).append(c)
    for (task, metric), group in by_metric.items():
        placed = [(index, c) for c in group if (index := place(c)) is not None]
        family = [{**row, **bounds(index)} for index, members in _bins(placed, order).items()
                  if (row := _bin_row(task, metric, members, items, member, references)) is not None]
        for r, adjusted in zip(family, holm_adjust([r["p_value"] if r["p_value"] is not None else 1.0 for r in family]),
                               strict=True):
            r["p_holm"] = adjusted if r["p_value"] is not None else None
            r["verdict"] = _verdict(r)
        out += family
    return pl.DataFrame(out, schema=schema, orient="row") if out else pl.DataFrame(schema=schema)


def _bins(placed: list[tuple[int, dict[str, Any]]], order: Callable[[dict[str, Any]], float]
          ) -> dict[int, list[dict[str, Any]]]:
    """Per bin (by index) each method's first variant in it by ``order``."""
    bins: dict[int, dict[str, dict[str, Any]]] = {}
    for index, c in sorted(placed, key=lambda p: order(p[1])):
        bins.setdefault(index, {}).setdefault(c["method"], c)
    return {b: list(methods.values()) for b, methods in sorted(bins.items())}


def _bin_row(task: str, metric: str, members: list[dict[str, Any]], items: pl.DataFrame,
             member: dict[str, Any], references: bool = False) -> dict[str, Any] | None:
    """The best method of one bin against the runner-up, on the items both have (no bounds, no Holm);
    with ``references`` the zeros-only methods are left out of the ranking and the least harmed of
    them is reported beside it. None when fewer than two methods are ranked."""
    reference = None
    if references:
        shown = sorted((m for m in members if m["zeros_only"]), key=harm)
        reference = shown[0] if shown else None
        members = [m for m in members if not m["zeros_only"]]
    if len(members) < 2:
        return None
    ranked = sorted(members, key=harm)
    best, runner = ranked[0], ranked[1]
    spec = {"kind": best["kind"], "higher_is_better": best["higher_is_better"], "label": best["label"]}
    test = paired_test(_rows(items, runner["variant"], task, metric), _rows(items, best["variant"], task, metric), spec)
    row: dict[str, Any] = {
        "task": task, "metric": metric, "label": best["label"], "kind": best["kind"],
        "higher_is_better": best["higher_is_better"], "methods": len(members),
        "others": "; ".join(f"{m['method']} ({m['variant']})" for m in ranked[2:]),
        "n_paired": test["n_paired"], "diff": test["diff_vs_dense"], "diff_ci_low": test["diff_ci_low"],
        "diff_ci_high": test["diff_ci_high"], "rel_diff": test["rel_change"], "test": test["test"],
        "p_value": test["p_value"], "p_holm": None, "verdict": None,
    }
    for prefix, chosen in (("best", best), ("runner", runner)):
        row.update({f"{prefix}_{name}": chosen[name] for name in member})
    if references:
        row.update({f"reference_{name}": reference[name] if reference else None for name in REFERENCE_MEMBER})
    return row


def _rows(items: pl.DataFrame, variant: str, task: str, metric: str) -> pl.DataFrame:
    return items.filter((pl.col("variant") == variant) & (pl.col("task") == task) & (pl.col("metric") == metric))


def _verdict(row: dict[str, Any]) -> str:
    if row["p_holm"] is None or row["p_holm"] >= ALPHA:
        return NOT_DISTINGUISHED
    return NOT_CONFIRMED if harmful(row["diff"], row["higher_is_better"]) else BEST


def _speedups(bench: pl.DataFrame | None, column: str) -> dict[str, float | None]:
    """Each measured variant's value of one of the bench table's speedup columns."""
    if bench is None or column not in bench.columns:
        return {}
    return dict(zip(bench["variant"], bench[column], strict=True))
