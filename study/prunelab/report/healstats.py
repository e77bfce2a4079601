"""Healed variants against their unhealed selves: the "before and after healing" table of a study.

A healed variant (``drop-block[k=4]+lora``, see ``prunelab.prune.recovery.healed_name``) is an ordinary
variant to ``prunelab.report.stats.summarize``, so it is already compared with dense. This module adds the
second comparison the question needs -- did healing change anything -- *with the same statistics*:
the unhealed variant plays the baseline's part (relabelled as dense) on the items both evaluated,
then Holm's adjustment runs over the healed variants of each task and metric.

And a third, when the study heals the dense model too (``dense+<method>``, the control): each healed
variant against the healed dense model, the same way. Healing the dense model measures what the
method does to a model that lost nothing (adaptation to the healing text); a healed variant's gap
to the healed dense model is what healing did *not* recover, with the adaptation taken out. The
control's own row is its before (dense) and after.
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
    "healed_dense": pl.String, "healed_dense_value": pl.Float64, "diff_vs_healed_dense": pl.Float64,
    "p_vs_healed_dense": pl.Float64, "p_holm_vs_healed_dense": pl.Float64,
}
HOLM = {"p_vs_unhealed": "p_holm_vs_unhealed", "p_vs_healed_dense": "p_holm_vs_healed_dense"}


def healed_pairs(items: pl.DataFrame) -> list[tuple[str, str]]:
    """(healed variant, unhealed variant) pairs, recognised by name: ``<name>+<method>`` and ``<name>``.

    The strategy must follow the same convention (``<strategy>+<method>``), so a variant whose own
    name merely contains a '+' is not mistaken for a healed one. The healed dense control
    (``dense+<method>``, unhealed ``dense``) is one of the pairs.
    """
    kinds = dict(items.select("variant", "strategy").unique().iter_rows())
    pairs = []
    for variant, strategy in kinds.items():
        base, sep, method = variant.rpartition("+")
        if sep and base in kinds and strategy == f"{kinds[base]}+{method}":
            pairs.append((variant, base))
    order = list(dict.fromkeys(items["variant"]))
    return sorted(pairs, key=lambda pair: order.index(pair[0]))


def versus(items: pl.DataFrame, variant: str, baseline: str) -> pl.DataFrame:
    """``summarize`` of ``variant`` with ``baseline`` in dense's place, on the items both evaluated."""
    pair = items.filter(pl.col("variant").is_in([variant, baseline])).with_columns(
        pl.when(pl.col("variant") == baseline).then(pl.lit(DENSE)).otherwise(pl.col("strategy")).alias("strategy"))
    return summarize(pair).filter(pl.col("variant") == variant)


def healing_table(items: pl.DataFrame, summary: pl.DataFrame) -> pl.DataFrame:
    """One row per healed variant x task x metric: before and after healing, vs dense, unhealed, healed dense."""
    rows: list[dict[str, Any]] = []
    pairs = healed_pairs(items)
    controls = {variant for variant, base in pairs if base == DENSE}
    for healed, base in pairs:
        control = f"{DENSE}+{healed.rpartition('+')[2]}"
        against_control = {}
        if control in controls and healed != control:
            against_control = {(r["task"], r["metric"]): r for r in versus(items, healed, control).iter_rows(named=True)}
        for row in versus(items, healed, base).iter_rows(named=True):
            rows.append(_row(row, healed, base, summary)
                        | _control_row(against_control.get((row["task"], row["metric"])), control))
    frame = pl.DataFrame(rows, schema={k: v for k, v in HEALING_SCHEMA.items() if k not in HOLM.values()})
    return _with_holm(frame).select(HEALING_SCHEMA.keys())


def _control_row(row: dict[str, Any] | None, control: str) -> dict[str, Any]:
    if row is None:
        return {"healed_dense": None, "healed_dense_value": None, "diff_vs_healed_dense": None,
                "p_vs_healed_dense": None}
    return {"healed_dense": control, "healed_dense_value": row["dense_value"],
            "diff_vs_healed_dense": row["diff_vs_dense"], "p_vs_healed_dense": row["p_value"]}


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
    """Holm over the healed variants of each task and metric, for each family of comparisons."""
    indexed = frame.with_row_index("_row")
    for column, holm in HOLM.items():
        adjusted: list[float | None] = [None] * frame.height
        for _, group in indexed.filter(pl.col(column).is_not_null()).group_by(["task", "metric"]):
            for row, p in zip(group["_row"], holm_adjust(group[column].to_list()), strict=True):
                adjusted[row] = p
        frame = frame.with_columns(pl.Series(holm, adjusted, dtype=pl.Float64))
    return frame
