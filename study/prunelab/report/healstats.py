"""Healed variants against their unhealed selves: the "before and after healing" table of a study.

A healed variant (``drop-block[k=4]+lora``, see ``prunelab.prune.recovery.healed_name``) is an ordinary
variant to ``prunelab.report.stats.summarize``, so it is already compared with dense. This module adds the
second comparison the question needs -- did healing change anything -- *with the same statistics*:
the unhealed variant plays the baseline's part (relabelled as dense) on the items both evaluated,
then Holm's adjustment runs over the healed variants of each task and metric.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from prunelab.records import DENSE
from prunelab.report.stats import holm_adjust, summarize

HEALING_SCHEMA = {
    "task": pl.String, "metric": pl.String, "kind": pl.String, "variant": pl.String, "unhealed": pl.String,
    "dense_value": pl.Float64,
    "before": pl.Float64, "before_ci_low": pl.Float64, "before_ci_high": pl.Float64,
    "before_diff_vs_dense": pl.Float64, "before_p_vs_dense": pl.Float64,
    "after": pl.Float64, "after_ci_low": pl.Float64, "after_ci_high": pl.Float64,
    "after_diff_vs_dense": pl.Float64, "after_p_vs_dense": pl.Float64,
    "n_paired": pl.Int64, "diff_vs_unhealed": pl.Float64, "lost": pl.Int64, "gained": pl.Int64,
    "p_vs_unhealed": pl.Float64, "p_holm_vs_unhealed": pl.Float64, "test": pl.String,
}


def healed_pairs(items: pl.DataFrame) -> list[tuple[str, str]]:
    """(healed variant, unhealed variant) pairs, recognised by name: ``<name>+<method>`` and ``<name>``.

    The strategy must follow the same convention (``<strategy>+<method>``), so a variant whose own
    name merely contains a '+' is not mistaken for a healed one.
    """
    kinds = dict(items.select("variant", "strategy").unique().iter_rows())
    pairs = []
    for variant, strategy in kinds.items():
        base, sep, method = variant.rpartition("+")
        if sep and base in kinds and strategy == f"{kinds[base]}+{method}" and kinds[base] != DENSE:
            pairs.append((variant, base))
    order = list(dict.fromkeys(items["variant"]))
    return sorted(pairs, key=lambda pair: order.index(pair[0]))


def healing_table(items: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """One row per healed variant x task x metric: before and after healing, vs dense and vs unhealed."""
    rows: list[dict[str, Any]] = []
    for healed, base in healed_pairs(items):
        pair = items.filter(pl.col("variant").is_in([healed, base])).with_columns(
            pl.when(pl.col("variant") == base).then(pl.lit(DENSE)).otherwise(pl.col("strategy")).alias("strategy"))
        versus = summarize(pair).filter(pl.col("variant") == healed)
        for row in versus.iter_rows(named=True):
            rows.append(_row(row, healed, base, summary))
    frame = pl.DataFrame(rows, schema={k: v for k, v in HEALING_SCHEMA.items() if k != "p_holm_vs_unhealed"})
    return _with_holm(frame).select(HEALING_SCHEMA.keys())


def _row(versus: dict[str, Any], healed: str, base: str, summary: pl.DataFrame) -> dict[str, Any]:
    task, metric = versus["task"], versus["metric"]
    column = "value"  # the metric itself, whatever its kind (accuracy, perplexity, a mean)

    def of(variant: str) -> dict[str, Any]:
        found = summary.filter((pl.col("variant") == variant) & (pl.col("task") == task) & (pl.col("metric") == metric))
        return found.row(0, named=True) if found.height else {}

    before, after = of(base), of(healed)
    return {
        "task": task, "metric": metric, "kind": versus["kind"], "variant": healed, "unhealed": base,
        "dense_value": after.get("dense_value"),
        "before": before.get(column), "before_ci_low": before.get("ci_low"), "before_ci_high": before.get("ci_high"),
        "before_diff_vs_dense": before.get("diff_vs_dense"), "before_p_vs_dense": before.get("p_value"),
        "after": after.get(column), "after_ci_low": after.get("ci_low"), "after_ci_high": after.get("ci_high"),
        "after_diff_vs_dense": after.get("diff_vs_dense"), "after_p_vs_dense": after.get("p_value"),
        "n_paired": versus["n_paired"], "diff_vs_unhealed": versus["diff_vs_dense"], "lost": versus["lost"],
        "gained": versus["gained"], "p_vs_unhealed": versus["p_value"], "test": versus["test"],
    }


def _with_holm(frame: pl.DataFrame) -> pl.DataFrame:
    """``p_holm_vs_unhealed``: Holm over the healed variants of each task and metric."""
    adjusted: list[float | None] = [None] * frame.height
    indexed = frame.with_row_index("_row")
    for _, group in indexed.filter(pl.col("p_vs_unhealed").is_not_null()).group_by(["task", "metric"]):
        for row, p in zip(group["_row"], holm_adjust(group["p_vs_unhealed"].to_list()), strict=True):
            adjusted[row] = p
    return frame.with_columns(pl.Series("p_holm_vs_unhealed", adjusted, dtype=pl.Float64))
