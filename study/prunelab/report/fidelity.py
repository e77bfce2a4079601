"""Metrics that see harm when accuracy sits at chance: fidelity to the dense model, and what MMLU answers.

Built from the per-item table alone (no model), so a report can be rebuilt from ``items.parquet``.

**Fidelity** (llama.cpp's ``perplexity --kl-divergence``): per WikiText window the evaluator
records the mean KL(dense || variant) over its scored tokens, the share of tokens whose most likely
next token is dense's and every token's KL; it declares which metric is which
(``MetricSpec.fidelity``: divergence, agreement; ``MetricSpec.per_token``), and only these
declarations choose the rows and fields read here. Per variant
this module reports the mean over windows of the first two (llama.cpp's numbers; with equal-length
windows the mean over all tokens), their median window with a 95% distribution-free interval over
windows (the windows are the independent units; tokens within a window are not), and the 99th
percentile of the KL over all of the variant's tokens, as a point: no interval over 8-24 windows
covers a pooled 99th percentile reliably (a percentile bootstrap recombines only those windows),
so none is printed. The summary's paired tests (``stats``) compare each variant with a tolerance.

**Answers** (multiple-choice tasks, as their evaluators declare them: ``Evaluator.answers`` names the
gold answer, category and choices fields, ``MetricSpec.prediction`` each accuracy metric's answer):
per accuracy metric, how often each variant gives each answer (a model at chance often answers one
letter to almost everything, which accuracy hides) and its accuracy per category, and per task the
chance level (declared, or 1 / the number of choices) for the charts. No record key is read by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
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


def fidelity_metrics(metrics: Mapping[tuple[str, str], Mapping[str, Any]]
                     ) -> dict[str, tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    """Per task: the declaration of its divergence metric and of its agreement metric (or None), as
    ``MetricSpec.fidelity`` names them; a task that declares no divergence has no fidelity table."""
    found: dict[str, dict[str, Mapping[str, Any]]] = {}
    for (task, _), spec in metrics.items():
        if spec.get("fidelity") in ("divergence", "agreement"):
            found.setdefault(task, {}).setdefault(spec["fidelity"], spec)
    return {task: (roles["divergence"], roles.get("agreement")) for task, roles in found.items() if "divergence" in roles}


def fidelity_table(items: pl.DataFrame, metrics: Mapping[tuple[str, str], Mapping[str, Any]]) -> pl.DataFrame | None:
    """Per task and variant: windows, mean / median-window divergence, its pooled 99th percentile and the agreement.

    Which rows and fields are read is what the evaluator declares (``fidelity_metrics``): the
    divergence's and agreement's per-item values, and the divergence's ``per_token`` field.
    """
    out = []
    for task, (divergence, agreement) in fidelity_metrics(metrics).items():
        rows = _metric_values(items, task, divergence["name"], "kl")
        if agreement is not None:
            agree = _metric_values(items, task, agreement["name"], "top1").select("variant", "item_id", "top1")
            rows = rows.join(agree, on=["variant", "item_id"], how="left")
        per_token = divergence.get("per_token")
        for (variant, strategy, params), group in rows.group_by(["variant", "strategy", "params"], maintain_order=True):
            out.append({"task": task, "variant": variant, "strategy": strategy, "params": params,
                        **_fidelity_row(group, per_token if per_token in group.columns else None)})
    return pl.DataFrame(out) if out else None


def _metric_values(items: pl.DataFrame, task: str, metric: str, name: str) -> pl.DataFrame:
    """One declared mean metric's rows of a task that carry a value, the value renamed ``name``."""
    rows = items.filter((pl.col("task") == task) & (pl.col("metric") == metric) & pl.col("value").is_not_null())
    if "params" not in rows.columns:
        rows = rows.with_columns(pl.lit("{}").alias("params"))
    return rows.rename({"value": name})


def _fidelity_row(group: pl.DataFrame, per_token: str | None) -> dict[str, Any]:
    """One variant's fidelity numbers from its items (a ``kl`` column, maybe ``top1`` and per-token lists)."""
    kl = group["kl"].to_numpy()
    kl_median, kl_low, kl_high = median_with_interval(kl)
    tokens = [np.asarray(json.loads(t), dtype=float) for t in group[per_token]] if per_token else []
    row = {"windows": group.height, "tokens": int(sum(len(t) for t in tokens)) if tokens else None,
           "kl_mean": float(kl.mean()), "kl_median": kl_median, "kl_median_low": kl_low, "kl_median_high": kl_high,
           "kl_p99": pooled_quantile(tokens) if tokens else None,
           "top1_agree": None, "top1_median": None, "top1_median_low": None, "top1_median_high": None}
    if "top1" in group.columns and group["top1"].null_count() == 0:
        top1 = group["top1"].to_numpy()
        top1_median, top1_low, top1_high = median_with_interval(top1)
        row.update(top1_agree=float(top1.mean()), top1_median=top1_median, top1_median_low=top1_low,
                   top1_median_high=top1_high)
    return row


@dataclass(frozen=True)
class ChoiceMetric:
    """One accuracy metric of a multiple-choice task: what its evaluator declared, and its rows.

    ``rows``: the metric's rows of the per-item table that carry an outcome (a row per question and
    variant); ``spec`` the metric's declaration (``MetricSpec`` as the manifest stores it),
    ``answers`` the task's (``AnswerFields``).
    """

    task: str
    metric: str
    spec: Mapping[str, Any]
    answers: Mapping[str, Any]
    rows: pl.DataFrame


def choice_metrics(items: pl.DataFrame, metrics: Mapping[tuple[str, str], Mapping[str, Any]],
                   answers: Mapping[str, Mapping[str, Any]]) -> list[ChoiceMetric]:
    """Each declared accuracy metric of each task that declares its answers (``Evaluator.answers``).

    Only declarations decide: a task whose evaluator declares no answer fields gets no
    multiple-choice tables, whatever its records' keys are called.
    """
    found = []
    for (task, metric), spec in metrics.items():
        if spec.get("kind") != "accuracy" or task not in answers:
            continue
        rows = items.filter((pl.col("task") == task) & (pl.col("metric") == metric) & pl.col("correct").is_not_null())
        if rows.height:
            found.append(ChoiceMetric(task, metric, spec, answers[task], rows))
    return found


def _labels(column: pl.Series) -> pl.Series:
    """Answers as text (a task may record them as indices), so a letter and its count line up."""
    return column.cast(pl.String)


def answer_letters(choices: list[ChoiceMetric]) -> pl.DataFrame | None:
    """Per task, accuracy metric and variant: how many times each answer was given, after a "gold answers" row.

    Each metric counts its own predictions (``MetricSpec.prediction``): ``acc`` and ``acc_norm`` of one
    task are separate, labelled blocks. A metric that names no prediction field has no block.
    """
    blocks = []
    for choice in choices:
        target, prediction = choice.answers.get("target"), choice.spec.get("prediction")
        if not prediction or not {target, prediction} <= set(choice.rows.columns):
            continue
        rows = choice.rows.filter(pl.col(prediction).is_not_null() & pl.col(target).is_not_null())
        if rows.height:
            blocks.append((choice, rows, target, prediction))
    letters = sorted({str(v) for _, rows, target, prediction in blocks
                      for v in (*_labels(rows[prediction]), *_labels(rows[target]))})
    out = []
    for choice, rows, target, prediction in blocks:
        dense = rows.filter(pl.col("strategy") == DENSE)
        gold = _labels((dense if dense.height else rows.filter(pl.col("variant") == rows["variant"][0]))[target])
        own = set(_labels(rows[prediction])) | set(gold)

        def counts(values: pl.Series, own: set[str] = own) -> dict[str, int | None]:
            return {letter: int((values == letter).sum()) if letter in own else None for letter in letters}

        out.append({"task": choice.task, "metric": choice.metric, "variant": "gold answers", "n": len(gold),
                    **counts(gold)})
        for (variant,), per_variant in rows.group_by(["variant"], maintain_order=True):
            out.append({"task": choice.task, "metric": choice.metric, "variant": variant, "n": per_variant.height,
                        **counts(_labels(per_variant[prediction]))})
    return pl.DataFrame(out) if out else None


def category_accuracy(choices: list[ChoiceMetric]) -> pl.DataFrame | None:
    """Accuracy per task, metric, variant and declared category (MMLU: stem / humanities / ...).

    Per metric: a task with ``acc`` and ``acc_norm`` gets each metric's own accuracy, never the two pooled.
    """
    frames = []
    for choice in choices:
        category = choice.answers.get("category")
        if not category or category not in choice.rows.columns:
            continue
        frames.append(choice.rows.filter(pl.col(category).is_not_null())
                      .group_by(["task", "metric", "variant", category], maintain_order=True)
                      .agg(pl.len().alias("n"), pl.col("correct").cast(pl.Float64).mean().alias("accuracy"))
                      .rename({category: "category"}).with_columns(pl.col("category").cast(pl.String)))
    return pl.concat(frames) if frames else None


def mean_metric_table(items: pl.DataFrame, metrics: Mapping[tuple[str, str], Mapping[str, Any]],
                      answers: Mapping[str, Mapping[str, Any]]) -> pl.DataFrame | None:
    """Each declared per-item float of a multiple-choice task (MMLU's ``gold_prob``) per variant: its
    mean with a 95% t-interval over items."""
    out = []
    for (task, metric), spec in metrics.items():
        if spec.get("kind") != "mean" or task not in answers:
            continue
        rows = items.filter((pl.col("task") == task) & (pl.col("metric") == metric) & pl.col("value").is_not_null())
        for (variant,), group in rows.group_by(["variant"], maintain_order=True):
            mean, low, high = mean_interval(group["value"].to_numpy())
            out.append({"task": task, "metric": metric, "label": spec.get("label") or metric, "variant": variant,
                        "n": group.height, "mean": mean, "low": low, "high": high})
    return pl.DataFrame(out) if out else None


def chance_levels(choices: list[ChoiceMetric]) -> dict[str, float]:
    """Chance accuracy per task: the declared ``chance``, or 1 / the length of the declared ``choices``
    field when every question has the same number of choices."""
    found: dict[str, float] = {}
    for choice in choices:
        if choice.answers.get("chance") is not None:
            found[choice.task] = float(choice.answers["chance"])
            continue
        field = choice.answers.get("choices")
        if not field or field not in choice.rows.columns:
            continue
        values = choice.rows[field].drop_nulls()
        counts = {len(json.loads(v)) if isinstance(v, str) else len(v) for v in values}
        if len(counts) == 1 and (k := counts.pop()) > 1:
            found[choice.task] = 1.0 / k
    return found


def summary_records(items: pl.DataFrame, metrics: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                    answers: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The tables above as JSON-able records for the manifest (findings and reports read them there).

    ``metrics`` (keyed by task and metric) and ``answers`` (by task): the evaluators' declarations as
    the manifest stores them; without them there are no fidelity and multiple-choice tables.
    """
    metrics, answers = metrics or {}, answers or {}
    choices = choice_metrics(items, metrics, answers)
    tables = {"fidelity": fidelity_table(items, metrics), "answer_letters": answer_letters(choices),
              "category_accuracy": category_accuracy(choices),
              "mean_metrics": mean_metric_table(items, metrics, answers)}
    records: dict[str, Any] = {name: table.to_dicts() for name, table in tables.items() if table is not None}
    if chance := chance_levels(choices):
        records["chance"] = chance
    return records
