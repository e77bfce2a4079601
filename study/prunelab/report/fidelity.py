"""Metrics that see harm when accuracy sits at chance: fidelity to the dense model, and what MMLU answers.

Built from the per-item table alone (no model), so a report can be rebuilt from ``items.parquet``.

**Fidelity** (llama.cpp's ``perplexity --kl-divergence``): per WikiText window the evaluator
records the mean KL(dense || variant) over its scored tokens (``kl_mean``), the share of tokens whose
most likely next token is dense's (``top1_agree``) and every token's KL (``kl_tokens``). Per variant
this module reports the mean over windows of the first two (llama.cpp's numbers; with equal-length
windows the mean over all tokens), their median window with a 95% distribution-free interval over
windows (the windows are the independent units; tokens within a window are not), and the 99th
percentile of the KL over all of the variant's tokens, as a point: no interval over 8-24 windows
covers a pooled 99th percentile reliably (a percentile bootstrap recombines only those windows),
so none is printed. The summary's paired tests (``stats``) compare each variant with a tolerance.

**Answers** (multiple choice tasks whose records carry ``prediction``/``target``): how often each
variant answers each letter (a model at chance often answers one letter to almost everything, which
accuracy hides), accuracy per ``category`` and the chance level 1/choices for the charts.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import polars as pl
from scipy import stats as scipy_stats

from prunelab.records import DENSE
from prunelab.report.stats import median_interval

QUANTILE = 0.99


def mean_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """The mean and its t-interval (None for fewer than 2 values; a zero-width interval when all are equal)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    half = float(scipy_stats.t.ppf(0.5 + level / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def pooled_quantile(token_values: list[np.ndarray], q: float = QUANTILE) -> float:
    """The q-quantile of all tokens pooled (a point estimate; see the module docstring)."""
    return float(np.quantile(np.concatenate(token_values), q))


def median_with_interval(values: np.ndarray) -> tuple[float, float | None, float | None]:
    """The median and its distribution-free 95% interval (``stats.median_interval``)."""
    low, high = median_interval(values)
    return float(np.median(values)), low, high


def fidelity_table(items: pl.DataFrame) -> pl.DataFrame | None:
    """Per variant: windows, mean / median-window KL, 99th-percentile KL and top-1 agreement."""
    if "kl_mean" not in items.columns:
        return None
    rows = items.filter(pl.col("kl_mean").is_not_null() & (pl.col("metric") == "perplexity"))
    out = []
    if "params" not in rows.columns:
        rows = rows.with_columns(pl.lit("{}").alias("params"))
    for (variant, strategy, params, task), group in rows.group_by(["variant", "strategy", "params", "task"],
                                                                  maintain_order=True):
        kl, top1 = group["kl_mean"].to_numpy(), group["top1_agree"].to_numpy()
        kl_median, kl_low, kl_high = median_with_interval(kl)
        top1_median, top1_low, top1_high = median_with_interval(top1)
        tokens = [np.asarray(json.loads(t), dtype=float) for t in group["kl_tokens"]] if "kl_tokens" in group.columns else []
        out.append({"task": task, "variant": variant, "strategy": strategy, "params": params, "windows": group.height,
                    "tokens": int(group["tokens"].sum()), "kl_mean": float(kl.mean()),
                    "kl_median": kl_median, "kl_median_low": kl_low, "kl_median_high": kl_high,
                    "kl_p99": pooled_quantile(tokens) if tokens else None, "top1_agree": float(top1.mean()),
                    "top1_median": top1_median, "top1_median_low": top1_low, "top1_median_high": top1_high})
    return pl.DataFrame(out) if out else None


def _multiple_choice(items: pl.DataFrame) -> pl.DataFrame:
    """The accuracy rows of tasks whose records name the predicted and the gold answer.

    Rows of per-item float metrics (a ``value`` column) repeat the record's fields; they are left out
    so that each question counts once.
    """
    if not {"prediction", "target"} <= set(items.columns):
        return items.clear()
    rows = items.filter(pl.col("prediction").is_not_null() & pl.col("target").is_not_null()
                        & pl.col("correct").is_not_null())
    return rows.filter(pl.col("value").is_null()) if "value" in rows.columns else rows


def answer_letters(items: pl.DataFrame) -> pl.DataFrame | None:
    """Per task and variant: how many times each answer was predicted, plus a "gold answers" row."""
    choices = _multiple_choice(items)
    if choices.height == 0:
        return None
    letters = sorted(set(choices["prediction"]) | set(choices["target"]))
    rows = []
    for (task, metric), group in choices.group_by(["task", "metric"], maintain_order=True):
        dense = group.filter(pl.col("strategy") == DENSE)
        gold = (dense if dense.height else group.filter(pl.col("variant") == group["variant"][0]))["target"]
        rows.append({"task": task, "metric": metric, "variant": "gold answers", "n": len(gold),
                     **{letter: int((gold == letter).sum()) for letter in letters}})
        for (variant,), per_variant in group.group_by(["variant"], maintain_order=True):
            predicted = per_variant["prediction"]
            rows.append({"task": task, "metric": metric, "variant": variant, "n": per_variant.height,
                         **{letter: int((predicted == letter).sum()) for letter in letters}})
    return pl.DataFrame(rows)


def category_accuracy(items: pl.DataFrame) -> pl.DataFrame | None:
    """Accuracy per variant and category (MMLU's stem / humanities / social sciences / other)."""
    choices = _multiple_choice(items)
    if choices.height == 0 or "category" not in choices.columns:
        return None
    return (choices.group_by(["task", "variant", "category"], maintain_order=True)
            .agg(pl.len().alias("n"), pl.col("correct").cast(pl.Float64).mean().alias("accuracy")))


def mean_metric_table(items: pl.DataFrame, column: str) -> pl.DataFrame | None:
    """A per-item float (``gold_prob``) per task and variant: its mean with a 95% t-interval over items."""
    choices = _multiple_choice(items)
    if choices.height == 0 or column not in choices.columns:
        return None
    out = []
    for (task, variant), group in choices.group_by(["task", "variant"], maintain_order=True):
        values = group[column].drop_nulls().to_numpy()
        if len(values):
            mean, low, high = mean_interval(values)
            out.append({"task": task, "variant": variant, "n": len(values), column: mean, "low": low, "high": high})
    return pl.DataFrame(out) if out else None


def chance_levels(items: pl.DataFrame) -> dict[str, float]:
    """Chance accuracy per task (1 / number of choices) for tasks whose records list each choice's log-likelihood."""
    if "loglikelihoods" not in items.columns:
        return {}
    found = {}
    for (task,), group in _multiple_choice(items).group_by(["task"]):
        sample = group["loglikelihoods"].drop_nulls().head(50)
        counts = {len(json.loads(v)) if isinstance(v, str) else len(v) for v in sample}
        if len(counts) == 1 and (k := counts.pop()) > 1:
            found[task] = 1.0 / k
    return found


def summary_records(items: pl.DataFrame) -> dict[str, Any]:
    """The tables above as JSON-able records for the manifest (findings and reports read them there)."""
    tables = {"fidelity": fidelity_table(items), "answer_letters": answer_letters(items),
              "category_accuracy": category_accuracy(items), "gold_prob": mean_metric_table(items, "gold_prob")}
    return {name: table.to_dicts() for name, table in tables.items() if table is not None}
