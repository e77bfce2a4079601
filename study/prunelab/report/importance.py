"""The importance report: tables and chart of the layer scores, and their Spearman
correlation with a measured layer sweep.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from prunelab.errors import FileProblem, PrunelabError
from prunelab.prune.layer_scores import Importance, LayerScores
from prunelab.readers import atomic_write, read_parquet


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of their positions (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None when either side is constant."""
    if len(x) != len(y):
        raise ValueError("spearman needs two sequences of the same length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


SWEEP_COLUMNS = ("strategy", "params", "task", "metric", "kind", "diff_vs_dense")
CORRELATION_SCHEMA = {"importance_metric": pl.String, "task": pl.String, "task_metric": pl.String,
                      "kind": pl.String, "layers": pl.Int64, "spearman": pl.Float64}


def sweep_harm(summary: pl.DataFrame, num_layers: int) -> dict[tuple[str, str, str], dict[int, float]]:
    """Per (task, metric, kind): the measured harm of removing each single layer in a layer sweep.

    Harm is the accuracy drop vs dense (dense - variant, on the same items) or the perplexity
    increase (variant - dense), so for every task a larger value means the layer mattered more.
    """
    from prunelab.report.charts import removed_layer

    missing = [c for c in SWEEP_COLUMNS if c not in summary.columns]
    if missing:
        raise PrunelabError(f"the sweep table lacks columns {missing}: pass a study's summary.parquet")
    harm: dict[tuple[str, str, str], dict[int, float]] = {}
    for row in summary.iter_rows(named=True):
        layer = removed_layer(row["strategy"], _params(row["params"]))
        if layer is None or row["diff_vs_dense"] is None or not math.isfinite(row["diff_vs_dense"]):
            continue
        if layer >= num_layers:
            raise PrunelabError(f"the sweep removed layer {layer} but this model has {num_layers} layers: "
                                "is the sweep of a different model?")
        better_higher = row.get("higher_is_better")  # summaries before metric declarations lack it
        sign = -1.0 if (better_higher if better_higher is not None else row["kind"] == "accuracy") else 1.0
        harm.setdefault((row["task"], row["metric"], row["kind"]), {})[layer] = sign * row["diff_vs_dense"]
    if not harm:
        raise PrunelabError("the sweep table has no single-layer removals compared with dense")
    return harm


def _params(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def sweep_correlations(scores: Mapping[str, LayerScores], summary: pl.DataFrame) -> pl.DataFrame:
    """Spearman's rho of each metric's per-layer scores with each task's measured harm, over the swept layers."""
    num_layers = len(next(iter(scores.values())).scores)
    rows = []
    for (task, task_metric, kind), by_layer in sweep_harm(summary, num_layers).items():
        layers = sorted(by_layer)
        for name, layer_scores in scores.items():
            rho = spearman([layer_scores.scores[i] for i in layers], [by_layer[i] for i in layers])
            rows.append((name, task, task_metric, kind, len(layers), rho))
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA, orient="row")


# --------------------------------------------------------------------------------------------
# Files: tables, chart, summary
# --------------------------------------------------------------------------------------------

OUTPUT_FILES = ("importance.parquet", "importance.csv", "importance.json", "importance.html", "importance.png")


def importance_chart(importance: Importance, title: str = "") -> Any:
    """Per-layer scores (one panel per metric) and, for angular, the distance of every block (l, n)."""
    import altair as alt

    table = importance.table()
    tooltip = ["metric:N", "layer:Q", "n:Q", alt.Tooltip("score:Q", format=".4g"), "rank:Q",
               alt.Tooltip("perplexity:Q", format=".4g"), alt.Tooltip("baseline_perplexity:Q", format=".4g")]
    panels = []
    for metric in importance.scores:
        rows = table.filter((pl.col("metric") == metric) & (pl.col("n") == 1)).to_dicts()
        label = {"bi": "block influence (1 - cos)", "angular": "angular distance, n = 1",
                 "ppl": "calibration perplexity increase when removed"}[metric]
        panels.append(alt.Chart(alt.Data(values=rows)).mark_bar().encode(
            x=alt.X("layer:O", title="layer"), y=alt.Y("score:Q", title=label), tooltip=tooltip,
            color=alt.Color("rank:Q", title="rank (1 = drop first)", scale=alt.Scale(scheme="viridis")),
        ).properties(width=420, height=180, title=f"{metric}: higher = more important"))
    charts = [alt.vconcat(*panels).resolve_scale(color="independent")]
    if "angular" in importance.scores:
        blocks = table.filter(pl.col("metric") == "angular").to_dicts()
        best = importance.best_block()
        note = f" (best block of {best['n']}: layers {best['layers'][0]}-{best['layers'][-1]})" if best else ""
        charts.append(alt.Chart(alt.Data(values=blocks)).mark_rect().encode(
            x=alt.X("layer:O", title="first layer of the block"), y=alt.Y("n:O", title="block size n", sort="descending"),
            color=alt.Color("score:Q", title="angular distance", scale=alt.Scale(scheme="viridis")), tooltip=tooltip,
        ).properties(width=420, height=300, title=f"angular distance between x^l and x^(l+n){note}"))
    return alt.hconcat(*charts).properties(title=title or "Layer importance")


def check_output(out_dir, overwrite: bool = False):
    """The output folder, unless it holds earlier importance results and ``overwrite`` is off."""
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise PrunelabError(f"output {folder} exists and is not a folder")
    existing = [name for name in (*OUTPUT_FILES, "correlation.csv") if (folder / name).exists()]
    if existing and not overwrite:
        raise PrunelabError(f"{folder} already has {', '.join(existing)} (choose another --out, or --overwrite)")
    return folder


def read_sweep(path) -> pl.DataFrame:
    """A study's summary table from parquet or CSV, with a one-line error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise PrunelabError(f"sweep summary not found: {path}")
    try:
        return pl.read_csv(path) if path.suffix.lower() == ".csv" else read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunelabError(f"could not read sweep summary {path}: {first}") from None
    except FileProblem as exc:  # a damaged parquet file (pyarrow's report)
        raise PrunelabError(f"could not read sweep summary {path}: {exc.problem}") from exc


def _importance_manifest(facts: Mapping[str, Any] | None) -> dict[str, Any]:
    """When and with which code the scores were made: the artifacts index lists it by this version."""
    from datetime import UTC, datetime

    from prunelab.records import json_digest
    from prunelab.report.artifacts import version_id
    from prunelab.versions import code_version

    now = datetime.now(UTC)
    code = code_version()
    return {"version": version_id(json_digest(dict(facts or {})), code["commit"], now),
            "created": f"{now:%Y-%m-%dT%H:%M:%SZ}", **code}


def write_importance(importance: Importance, out_dir, *, correlations: pl.DataFrame | None = None,
                     facts: Mapping[str, Any] | None = None, overwrite: bool = False, title: str = "") -> list[str]:
    """Write the table (parquet + csv), the chart (offline HTML + PNG), the summary JSON and correlations.

    Refuses to replace earlier results in ``out_dir`` unless ``overwrite``; returns the file names.
    """
    import vl_convert as vlc

    from prunelab.report import pages

    folder = check_output(out_dir, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    from prunelab.report.artifacts import write_tables

    written = write_tables(folder, None, None, extra={"importance": importance.table(),
                                                      **({"correlation": correlations} if correlations is not None else {})})
    summary = {**dict(facts or {}), **importance.summary(), "manifest": _importance_manifest(facts)}
    if correlations is not None:
        summary["spearman_vs_sweep"] = correlations.to_dicts()
    atomic_write(folder / "importance.json",
                 lambda staging: staging.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"))
    spec = importance_chart(importance, title).to_dict()
    page = pages.chart_page(title or "Layer importance", spec)
    png = vlc.vegalite_to_png(spec, vl_version=pages.vega_lite_version())
    atomic_write(folder / "importance.html", lambda staging: staging.write_text(page, encoding="utf-8"))
    atomic_write(folder / "importance.png", lambda staging: staging.write_bytes(png))
    return [*written, "importance.json", "importance.html", "importance.png"]
