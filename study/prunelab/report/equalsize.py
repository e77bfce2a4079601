"""Methods compared at equal size: which one is best at each parameter count, with a paired test.

"Equal size" is a bin of the parameter count: every variant is placed at the share of dense's
parameters it keeps (a weight-pruning variant at its non-zero count, for reference: its stored
size and speed are dense's) and binned in steps of ``BIN_POINTS`` percentage points of dense's
count (100-95 %, 95-90 %, ...). Within a bin each method (a strategy with its varying settings, a
width strategy per set of axes) is represented by its smallest variant there, so no method is
favoured by being larger inside the bin. Methods are ranked by their change vs dense on each task
and metric; the best is then tested against the runner-up on the items both were scored on, with
the test a variant gets against dense (exact McNemar for accuracy, the exact sign test
for perplexity and means), and Holm adjusts over the bins of one task and metric.
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from prunelab.records import DENSE
from prunelab.report.charts import effective_parameters, method_labels
from prunelab.report.findings import harm
from prunelab.report.sizes import VariantSize
from prunelab.report.stats import ALPHA, harmful, holm_adjust, paired_test

BIN_POINTS = 5.0  # width of a size bin, in percentage points of dense's parameter count
BEST = "best (Holm p<0.05)"
NOT_DISTINGUISHED = "not distinguishable from the runner-up"
NOT_CONFIRMED = "runner-up better on the paired items"

EQUAL_SIZE_SCHEMA = {
    "task": pl.String, "metric": pl.String, "label": pl.String, "kind": pl.String, "higher_is_better": pl.Boolean,
    "kept_low": pl.Float64, "kept_high": pl.Float64, "methods": pl.Int64, "others": pl.String,
    "best_method": pl.String, "best_variant": pl.String, "best_parameters": pl.Int64, "best_kept": pl.Float64,
    "best_value": pl.Float64, "best_rel_change": pl.Float64, "best_decode_speedup": pl.Float64,
    "runner_method": pl.String, "runner_variant": pl.String, "runner_parameters": pl.Int64, "runner_kept": pl.Float64,
    "runner_value": pl.Float64, "runner_rel_change": pl.Float64, "runner_decode_speedup": pl.Float64,
    "n_paired": pl.Int64, "diff": pl.Float64, "diff_ci_low": pl.Float64, "diff_ci_high": pl.Float64,
    "rel_diff": pl.Float64, "test": pl.String, "p_value": pl.Float64, "p_holm": pl.Float64, "verdict": pl.String,
}


def size_bin(kept: float) -> int:
    """The bin of a variant keeping ``kept`` % of dense's parameters: 0 for 95-100 %, 1 for 90-95 %, ..."""
    return max(0, math.floor((100.0 - kept) / BIN_POINTS + 1e-9))


def equal_size_table(items: pl.DataFrame, summary: pl.DataFrame, sizes: dict[str, VariantSize],
                     bench: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per task, metric and size bin holding at least two methods (``EQUAL_SIZE_SCHEMA``)."""
    dense = sizes.get(DENSE)
    if dense is None or not dense.parameters:
        return pl.DataFrame(schema=EQUAL_SIZE_SCHEMA)
    speed = _speedups(bench)
    methods = method_labels(summary, sizes)
    out: list[dict[str, Any]] = []
    for (task, metric), group in summary.group_by(["task", "metric"], maintain_order=True):
        candidates = []
        for row in group.iter_rows(named=True):
            size = sizes.get(row["variant"])
            if row["strategy"] == DENSE or row["p_value"] is None or size is None or size.parameters is None \
                    or size.sweep_layer is not None:  # a one-layer sweep diagnoses layers; the plans are the method
                continue
            placed = effective_parameters(size, dense)
            candidates.append({**row, "method": methods[row["variant"]], "placed": placed,
                               "kept": 100 * placed / dense.parameters, "decode_speedup": speed.get(row["variant"])})
        family = [_bin_row(task, metric, members, items) for members in _bins(candidates).values()]
        family = [r for r in family if r is not None]
        for r, adjusted in zip(family, holm_adjust([r["p_value"] if r["p_value"] is not None else 1.0 for r in family]),
                               strict=True):
            r["p_holm"] = adjusted if r["p_value"] is not None else None
            r["verdict"] = _verdict(r)
        out += family
    return pl.DataFrame(out, schema=EQUAL_SIZE_SCHEMA, orient="row") if out else pl.DataFrame(schema=EQUAL_SIZE_SCHEMA)


def _bins(candidates: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per size bin (largest first) each method's smallest variant in it."""
    bins: dict[int, dict[str, dict[str, Any]]] = {}
    for c in sorted(candidates, key=lambda c: c["placed"]):
        bins.setdefault(size_bin(c["kept"]), {}).setdefault(c["method"], c)
    return {b: list(methods.values()) for b, methods in sorted(bins.items())}


def _bin_row(task: str, metric: str, members: list[dict[str, Any]], items: pl.DataFrame) -> dict[str, Any] | None:
    """The best method of one bin against the runner-up, on the items both have."""
    if len(members) < 2:
        return None
    ranked = sorted(members, key=harm)
    best, runner = ranked[0], ranked[1]
    spec = {"kind": best["kind"], "higher_is_better": best["higher_is_better"], "label": best["label"]}
    test = paired_test(_rows(items, runner["variant"], task, metric), _rows(items, best["variant"], task, metric), spec)
    index = size_bin(best["kept"])
    row: dict[str, Any] = {
        "task": task, "metric": metric, "label": best["label"], "kind": best["kind"],
        "higher_is_better": best["higher_is_better"],
        "kept_low": 100.0 - BIN_POINTS * (index + 1), "kept_high": 100.0 - BIN_POINTS * index, "methods": len(members),
        "others": "; ".join(f"{m['method']} ({m['variant']})" for m in ranked[2:]),
        "n_paired": test["n_paired"], "diff": test["diff_vs_dense"], "diff_ci_low": test["diff_ci_low"],
        "diff_ci_high": test["diff_ci_high"], "rel_diff": test["rel_change"], "test": test["test"],
        "p_value": test["p_value"], "p_holm": None, "verdict": None,
    }
    for prefix, member in (("best", best), ("runner", runner)):
        row.update({f"{prefix}_method": member["method"], f"{prefix}_variant": member["variant"],
                    f"{prefix}_parameters": member["placed"], f"{prefix}_kept": member["kept"],
                    f"{prefix}_value": member["value"], f"{prefix}_rel_change": member["rel_change"],
                    f"{prefix}_decode_speedup": member["decode_speedup"]})
    return row


def _rows(items: pl.DataFrame, variant: str, task: str, metric: str) -> pl.DataFrame:
    return items.filter((pl.col("variant") == variant) & (pl.col("task") == task) & (pl.col("metric") == metric))


def _verdict(row: dict[str, Any]) -> str:
    if row["p_holm"] is None or row["p_holm"] >= ALPHA:
        return NOT_DISTINGUISHED
    return NOT_CONFIRMED if harmful(row["diff"], row["higher_is_better"]) else BEST


def _speedups(bench: pl.DataFrame | None) -> dict[str, float | None]:
    if bench is None or "decode_speedup" not in bench.columns:
        return {}
    return dict(zip(bench["variant"], bench["decode_speedup"], strict=True))
