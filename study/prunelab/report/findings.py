"""What a study found, in words, from its summary table alone (``prunelab.report.stats.SUMMARY_SCHEMA``).

Per task and metric: the headline (dense value, how many variants are worse after Holm, or
"underpowered" with the smallest detectable difference), the variants ranked by relative change vs
dense, the layers whose removal is not detectably harmful, the first sparsity at which each method
loses significantly, and the best method at each sparsity. The report and the index print these;
the manifest stores the headline.
"""

from __future__ import annotations

import json
import math
from typing import Any

import polars as pl

from prunelab.records import DENSE
from prunelab.report.charts import removed_layer, series_label, sparsity_percent, varying_settings
from prunelab.report.stats import (
    ALPHA,
    BETTER,
    BEYOND,
    UNDERPOWERED,
    WITHIN,
    WORSE,
    format_p,
    harm_order,
    pairs_needed,
)


def headline(summary: pl.DataFrame) -> list[dict[str, Any]]:
    """Per task and metric: dense value and CI, counts of worse/better variants after Holm, power, extremes."""
    lines = []
    for (task, metric), group in summary.group_by(["task", "metric"], maintain_order=True):
        dense = group.filter(pl.col("strategy") == DENSE)
        pruned = harm_order(group.filter(pl.col("strategy") != DENSE))
        tested = pruned.filter(pl.col("p_value").is_not_null())
        first = group.row(0, named=True)
        line = {
            "task": task, "metric": metric, "label": first["label"], "kind": first["kind"],
            "higher_is_better": first["higher_is_better"],
            "dense": dense["value"][0] if dense.height else None,
            "dense_ci": [dense["ci_low"][0], dense["ci_high"][0]] if dense.height else None,
            "n": int(dense["n"][0]) if dense.height else None,
            "variants": pruned.height, "tested": tested.height,
            "significant_drops": tested.filter(pl.col("verdict") == WORSE).height,
            "significant_gains": tested.filter(pl.col("verdict") == BETTER).height,
            "underpowered": bool(tested.height) and bool(tested["underpowered"].all()),
            "min_p": _min(tested["min_p"]), **_mdd_range(tested),
            "tolerance": _first(tested["tolerance"]) if "tolerance" in tested.columns else None,
            "beyond": tested.filter(pl.col("verdict") == BEYOND).height,
            "within": tested.filter(pl.col("verdict") == WITHIN).height,
        }
        if pruned.height:
            line["worst"] = _extreme(pruned.row(0, named=True))
            line["best"] = _extreme(pruned.row(-1, named=True))
        line["text"] = headline_sentence(line)
        lines.append(line)
    return lines


def _min(column: pl.Series) -> float | None:
    values = column.drop_nulls()
    return float(values.min()) if values.len() else None


def _first(column: pl.Series) -> float | None:
    values = column.drop_nulls()
    return float(values[0]) if values.len() else None


def _mdd_range(tested: pl.DataFrame) -> dict[str, float | None]:
    """The smallest detectable change of the variants the headline speaks about: those *not* found
    worse (for them "no detectable change" needs it); each row's own value is in the ranked table.
    ``mdd`` is the least, ``mdd_max`` the largest of them (they differ by the rows' spread)."""
    quiet = tested.filter(~pl.col("verdict").is_in([WORSE, BEYOND])) if tested.height else tested
    values = quiet["mdd"].drop_nulls().abs() if quiet.height else pl.Series([], dtype=pl.Float64)
    if not values.len():
        return {"mdd": None, "mdd_max": None}
    sign = -1.0 if float(quiet["mdd"].drop_nulls()[0]) < 0 else 1.0
    return {"mdd": sign * float(values.min()), "mdd_max": sign * float(values.max())}


def _extreme(row: dict[str, Any]) -> dict[str, Any]:
    return {"variant": row["variant"], "value": row["value"], "rel_change": row["rel_change"],
            "diff": row["diff_vs_dense"], "verdict": row["verdict"]}


def change_text(rel: float | None, diff: float | None, kind: str) -> str:
    """A change vs dense: relative in percent where dense is non-zero, else the difference."""
    if rel is not None and math.isfinite(rel):
        return f"{rel * 100:+.3g}%" if abs(rel) < 10 else f"×{rel + 1:.3g}"
    if diff is None:
        return "—"
    return f"{diff * 100:+.3g} points" if kind == "accuracy" else f"{diff:+.3g}"


def interval_text(row: dict[str, Any]) -> str:
    """The change with its 95% interval, e.g. ``+12.5% [+3.1%, +22.8%]``."""
    change = change_text(row["rel_change"], row["diff_vs_dense"], row["kind"])
    if row["rel_change"] is not None and row.get("rel_ci_low") is not None:
        return f"{change} [{change_text(row['rel_ci_low'], None, row['kind'])}, " \
               f"{change_text(row['rel_ci_high'], None, row['kind'])}]"
    if row["rel_change"] is None and row.get("diff_ci_low") is not None:
        return f"{change} [{change_text(None, row['diff_ci_low'], row['kind'])}, " \
               f"{change_text(None, row['diff_ci_high'], row['kind'])}]"
    return change


def mdd_text(mdd: float | None, dense: float | None, kind: str, mdd_max: float | None = None) -> str:
    """The minimum detectable difference (with 80 % power, for the test used), in the units a reader
    compares with (percent of dense); a range when the variants spoken about differ."""
    if mdd is None:
        return "no difference could be detected"
    span = detectable_text(mdd, dense, kind)
    if mdd_max is not None and not math.isclose(mdd, mdd_max):
        span += f" to {detectable_text(mdd_max, dense, kind)}"
    return f"only a change of about {span} or more would be detected with 80% power"


def detectable_text(mdd: float | None, dense: float | None, kind: str) -> str:
    """One row's smallest detectable change as text (percent of dense where dense is non-zero)."""
    if mdd is None:
        return "none"
    return change_text(mdd / abs(dense) if dense else None, mdd, kind)


def headline_sentence(h: dict[str, Any]) -> str:
    """One plain sentence: what dense scored and what the paired tests support."""
    name = h.get("label") or h["metric"]
    if h.get("dense") is None:
        return f"{h['task']} · {name}: no dense baseline, no comparison"
    dense = f"dense {h['dense']:.4g}"
    if h.get("dense_ci") and h["dense_ci"][0] is not None:
        interval = f"[{h['dense_ci'][0]:.4g}, {h['dense_ci'][1]:.4g}]"
        # a continuous value's interval is of the median item (window): distribution-free, see stats
        dense += f" {interval}" if h["kind"] == "accuracy" else f" (median window {interval})"
    if not h.get("tested"):
        return f"{h['task']} · {name}: {dense}; no pruned variant"
    if h.get("underpowered"):
        text = (f"{h['task']} · {name}: {dense}; underpowered — with n = {h['n']} no outcome could reach "
                f"p < {ALPHA} after Holm over {h['tested']} variants (smallest possible p {format_p(h['min_p'])}); ")
        if h["kind"] == "accuracy":
            return text + mdd_text(h.get("mdd"), h["dense"], h["kind"])
        return text + f"the paired test needs at least {pairs_needed(h['tested'])} windows/items"
    if h.get("tolerance") is not None:
        undecided = h["tested"] - h["beyond"] - h["within"]
        return (f"{h['task']} · {name}: against a tolerance of {h['tolerance']:g}, {h['beyond']} of {h['tested']} "
                f"variants beyond it, {h['within']} within it, {undecided} undecided (Holm)")
    text = f"{h['task']} · {name}: {dense}; {h['significant_drops']} of {h['tested']} variants worse after Holm"
    if h.get("significant_gains"):
        text += f", {h['significant_gains']} better"
    worst = h.get("worst")
    if worst and worst.get("verdict") == WORSE:
        text += f" (worst: {worst['variant']}, {change_text(worst['rel_change'], worst['diff'], h['kind'])})"
    if h.get("mdd") is not None and h["significant_drops"] < h["tested"]:
        text += f"; {mdd_text(h['mdd'], h['dense'], h['kind'], h.get('mdd_max'))}"
    return text


def findings(summary: pl.DataFrame) -> list[dict[str, Any]]:
    """Per task and metric: the headline, the ranking, safe layers, sparsity cliffs, best methods."""
    blocks = []
    heads = {(h["task"], h["metric"]): h for h in headline(summary)}
    for (task, metric), group in summary.group_by(["task", "metric"], maintain_order=True):
        ranked = harm_order(group.filter((pl.col("strategy") != DENSE) & pl.col("p_value").is_not_null())).to_dicts()
        blocks.append({
            "task": task, "metric": metric, "headline": heads[(task, metric)], "ranked": ranked,
            "safe_layers": safe_layers(ranked), "layers_tested": sum(_layer(r) is not None for r in ranked),
            "cliffs": sparsity_cliffs(ranked), "best_by_sparsity": best_by_sparsity(ranked),
        })
    return blocks


def _layer(row: dict[str, Any]) -> int | None:
    return removed_layer(row["strategy"], json.loads(row["params"] or "{}"))


def safe_layers(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Single-layer removals not detectably harmful after Holm (not underpowered), least harmful first."""
    return [r for r in ranked if _layer(r) is not None and r["verdict"] not in (WORSE, BEYOND, UNDERPOWERED)][::-1]


def _sparsity_rows(ranked: list[dict[str, Any]]) -> list[tuple[str, float, dict[str, Any]]]:
    """(series label, sparsity %, row) of every weight-pruning variant."""
    params = [(r, json.loads(r["params"] or "{}")) for r in ranked]
    varying = varying_settings([(r["strategy"], p) for r, p in params])
    return [(series_label(r["strategy"], p, varying.get(r["strategy"], set())), s, r)
            for r, p in params if (s := sparsity_percent(p)) is not None]


def sparsity_cliffs(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each method: the lowest sparsity with a significant loss (None: none up to the highest tried)."""
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for label, sparsity, row in _sparsity_rows(ranked):
        series.setdefault(label, []).append((sparsity, row))
    cliffs = []
    for label, points in series.items():
        points.sort(key=lambda p: p[0])
        first = next(((s, r) for s, r in points if r["verdict"] in (WORSE, BEYOND)), None)
        cliffs.append({"method": label, "sparsity": first[0] if first else None, "row": first[1] if first else None,
                       "highest_tried": points[-1][0],
                       "underpowered": all(r["verdict"] == UNDERPOWERED for _, r in points)})
    return cliffs


def best_by_sparsity(ranked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At each sparsity tried by more than one method: the least harmful one."""
    by_level: dict[float, list[tuple[str, dict[str, Any]]]] = {}
    for label, sparsity, row in _sparsity_rows(ranked):
        by_level.setdefault(sparsity, []).append((label, row))
    best = []
    for sparsity in sorted(by_level):
        candidates = by_level[sparsity]
        if len(candidates) < 2:
            continue
        label, row = min(candidates, key=lambda c: _harm(c[1]))
        best.append({"sparsity": sparsity, "method": label, "row": row, "of": len(candidates)})
    return best


def _harm(row: dict[str, Any]) -> float:
    change = row["rel_change"] if row["rel_change"] is not None else row["diff_vs_dense"]
    if change is None or not math.isfinite(change):
        return math.inf
    return -change if row["higher_is_better"] else change

