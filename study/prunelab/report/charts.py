"""Altair charts of a study, derived from the summary table alone (``prunelab.report.stats.SUMMARY_SCHEMA``).

Every chart shows the uncertainty next to the number: a 95% CI band or error bar, the dense model as
a reference rule, and the paired test's verdict (triangles mark significant drops vs dense), so a
reader can tell a real effect from subset noise. Where a variant sits on a sweep comes from its size
record (``report.sizes.VariantSize``: the layers it removed and its parameter counts, recorded at run
time, and its strategy's declared ``SizeAxis`` amounts), never from an option's name: the layer sweep
draws one-layer removals by index, "remove K layers" draws the layers a plan actually removed, the
sparsity chart a ``weights`` axis, one chart per ``width`` axis, and the size comparison every variant
at its parameter count.
"""

from __future__ import annotations

import json
import math
from typing import Any

import altair as alt
import polars as pl

from prunelab.records import DECODE_RATE, DECODE_SPEEDUP, DENSE, PREFILL_RATE, PREFILL_SPEEDUP
from prunelab.report.sizes import VariantSize, slug, summary_sizes

PANEL_WIDTH = 360
PANEL_HEIGHT = 240
SIGNIFICANT = "worse (Holm p<0.05)"
BETTER = "better (Holm p<0.05)"
NOT_SIGNIFICANT = "no detectable change"
UNDERPOWERED = "underpowered"
NO_BASELINE = "no dense baseline"
CHART_FIELDS = ("variant", "strategy", "kind", "n", "ci_low", "ci_high", "dense_value", "diff_vs_dense", "p_value",
                "p_holm", "rel_change", "rel_ci_low", "rel_ci_high", "diff_ci_low", "diff_ci_high")
LOG_AXIS = alt.Axis(labelOverlap="greedy", labelSeparation=6, format="~g")
VERDICT_DOMAIN = [SIGNIFICANT, BETTER, NOT_SIGNIFICANT, UNDERPOWERED, NO_BASELINE]
VERDICTS = alt.Scale(domain=VERDICT_DOMAIN, range=["triangle-down", "triangle-up", "circle", "diamond", "square"])
VERDICT_COLOURS = alt.Scale(domain=VERDICT_DOMAIN, range=["#c0392b", "#27ae60", "#2c3e50", "#b7950b", "#7f8c8d"])
OUTLIER_IQRS = 3.0  # a layer further than this many interquartile ranges out is clipped and labelled


def build_charts(summary: pl.DataFrame, bench: pl.DataFrame | None = None, chance: dict[str, float] | None = None,
                 sizes: dict[str, VariantSize] | None = None) -> dict[str, alt.TopLevelMixin]:
    """Every chart the summary (and the bench table, when measured) has data for, by file-name-safe name.

    ``chance``: a task's chance accuracy (``fidelity.chance_levels``), drawn as a dotted line.
    ``sizes``: each variant's size record (``sizes.run_sizes``); without them, today's declarations
    on the stored options (``sizes.summary_sizes``: no parameter counts, no plan's layers).
    """
    sizes = sizes if sizes is not None else summary_sizes(summary)
    rows = with_chance(chart_rows(summary, sizes), summary, chance or {})
    charts = {
        "layer_sweep": layer_sweep_chart(rows),
        "sparsity_sweep": sparsity_chart(rows),
        "removal_plans": removal_plans_chart(rows),
        **width_charts(rows, sizes),
        "size_comparison": size_comparison_chart(rows, sizes, method_labels(summary, sizes)),
        "dense_vs_pruned": dense_vs_pruned_chart(rows),
        "quality_vs_speed": quality_vs_speed_chart(rows, bench, method_labels(summary, sizes)),
    }
    return {name: chart for name, chart in charts.items() if chart is not None}


def chart_rows(summary: pl.DataFrame, sizes: dict[str, VariantSize] | None = None) -> list[dict[str, Any]]:
    """Summary rows reduced to what the charts plot and show in tooltips (the spec embeds them)."""
    sizes = sizes if sizes is not None else summary_sizes(summary)
    records = [(row, json.loads(row["params"] or "{}")) for row in summary.iter_rows(named=True)]
    varying = varying_settings([(row["strategy"], params) for row, params in records])
    rows = []
    for row, params in records:
        value = row["value"] if "value" in row else row["accuracy"] if row["kind"] == "accuracy" else row["perplexity"]
        size = sizes.get(row["variant"], VariantSize())
        weights = size.axis("weights")
        rows.append({
            **{k: _finite(row[k]) for k in CHART_FIELDS}, "value": _finite(value),
            "panel": f"{row['task']} · {row['metric']}", "layer": size.sweep_layer,
            "sparsity": weights.percent if weights else None, "layers_removed": size.layers_removed,
            "verdict": verdict(row),
            "series": series_label(row["strategy"], params, varying.get(row["strategy"], set()) - size.swept_options),
        })
    return rows


def varying_settings(variants: list[tuple[str, dict[str, Any]]]) -> dict[str, set[str]]:
    """Per strategy, the settings that differ between its variants (the rest would only clutter labels)."""
    seen: dict[str, dict[str, set[str]]] = {}
    for strategy, params in variants:
        for key, value in params.items():
            seen.setdefault(strategy, {}).setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    return {strategy: {k for k, values in keys.items() if len(values) > 1} for strategy, keys in seen.items()}


def _finite(value: Any) -> Any:
    """NaN/inf (a diverged model) is not JSON: plot it as missing."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def series_label(strategy: str, params: dict[str, Any], keys: set[str]) -> str:
    """One line per strategy and setting, e.g. ``magnitude order=largest``.

    ``keys``: the settings to name -- those that vary in the study, less the options that set a
    size axis (the sweep's x, declared by the strategy).
    """
    settings = [f"{k}={v}" for k, v in sorted(params.items()) if k in keys]
    return " ".join([strategy, *settings])


def verdict(row: dict[str, Any]) -> str:
    """The Holm-adjusted paired test's verdict as a legend entry (``stats`` decides it)."""
    decided = row.get("verdict")
    if decided is None or decided == "no dense baseline" or row.get("p_value") is None:
        return NO_BASELINE if row["strategy"] != DENSE else NOT_SIGNIFICANT
    return {"worse": SIGNIFICANT, "beyond tolerance": SIGNIFICANT, "better": BETTER,
            "underpowered": UNDERPOWERED}.get(decided, NOT_SIGNIFICANT)


def layer_sweep_chart(rows: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """Relative change vs dense against the removed layer, one panel per task and metric.

    On relative change every metric reads the same way (0 = dense). An extreme layer (removing
    layer 0 can multiply perplexity by 10^5) would squeeze all the others into a thin strip, so a
    layer more than ``OUTLIER_IQRS`` interquartile ranges out is drawn at the panel's edge, its value in the subtitle.
    """
    sweep = [r for r in rows if r["layer"] is not None and r["p_value"] is not None]
    if not sweep:
        return None
    x = alt.X("layer:Q", title="removed layer", axis=alt.Axis(tickMinStep=1, format="d"))
    panels = [_relative_panel([r for r in sweep if r["panel"] == panel], x, panel)
              for panel in dict.fromkeys(r["panel"] for r in sweep)]
    return alt.concat(*panels, columns=2).properties(
        title="Remove one decoder layer: change vs dense (95% CI bands; shape = Holm-adjusted paired test)")


def relative_points(points: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str, list[float]]:
    """Points with ``shown``/``low``/``high`` on the panel's axis, clipped outliers labelled; (points, title, domain).

    The axis is the relative change in percent, or the plain difference where dense is 0.
    """
    relative = any(p["rel_change"] is not None for p in points)
    keys = ("rel_change", "rel_ci_low", "rel_ci_high") if relative else ("diff_vs_dense", "diff_ci_low", "diff_ci_high")
    scale = 100.0 if relative else 1.0
    values = [p[keys[0]] * scale for p in points if p[keys[0]] is not None]
    inliers = values
    if len(values) >= 4:
        q1, q3 = _quantile(values, 0.25), _quantile(values, 0.75)
        spread = max(q3 - q1, 1e-9 * max(1.0, abs(q3)))
        inliers = [v for v in values if q1 - OUTLIER_IQRS * spread <= v <= q3 + OUTLIER_IQRS * spread]
    lows = [p[keys[1]] * scale for p in points if p[keys[1]] is not None and p[keys[0]] * scale in inliers]
    highs = [p[keys[2]] * scale for p in points if p[keys[2]] is not None and p[keys[0]] * scale in inliers]
    bottom, top = min([0.0, *inliers, *lows]), max([0.0, *inliers, *highs])
    pad = 0.08 * (top - bottom or 1.0)
    domain = [bottom - pad, top + pad]
    shown = []
    for p in points:
        value = None if p[keys[0]] is None else p[keys[0]] * scale
        clipped = value is not None and not domain[0] <= value <= domain[1]
        low = None if p[keys[1]] is None else min(max(p[keys[1]] * scale, domain[0]), domain[1])
        high = None if p[keys[2]] is None else min(max(p[keys[2]] * scale, domain[0]), domain[1])
        shown.append({**p, "change": value, "shown": min(max(value, domain[0]), domain[1]) if value is not None else None,
                      "low": low, "high": high, "clipped": clipped,
                      "note": (f"{'layer ' + str(p['layer']) if p.get('layer') is not None else p['variant']} "
                               f"{_short(value, relative)}") if clipped else ""})
    title = "change vs dense (%)" if relative else "change vs dense"
    return shown, title, domain


def _short(value: float, relative: bool) -> str:
    if relative and abs(value) >= 1000:
        return f"×{value / 100 + 1:.3g}"
    return f"{value:+.3g}%" if relative else f"{value:+.3g}"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _relative_panel(points: list[dict[str, Any]], x: alt.X, panel: str) -> alt.LayerChart:
    """CI band, line and verdict-shaped points on change vs dense; 0 (dense) as a dashed rule."""
    data, title, domain = relative_points(points)
    scale = alt.Scale(domain=domain, clamp=True, nice=False)
    y = alt.Y("shown:Q", title=title, scale=scale)
    tooltip = [*_tooltip(), alt.Tooltip("change:Q", format="+.4g", title=title)]
    base = alt.Chart()
    layers = [
        base.mark_area(opacity=0.18, color="#4c78a8").encode(x=x, y=alt.Y("low:Q", scale=scale, title=title), y2="high:Q"),
        base.mark_line(color="#4c78a8").encode(x=x, y=y),
        base.mark_point(filled=True, size=50).encode(
            x=x, y=y, tooltip=tooltip,
            shape=alt.Shape("verdict:N", title="vs dense", scale=VERDICTS, legend=alt.Legend(orient="bottom")),
            color=alt.Color("verdict:N", title="vs dense", scale=VERDICT_COLOURS, legend=alt.Legend(orient="bottom"))),
        alt.Chart(alt.Data(values=[{"zero": 0}])).mark_rule(strokeDash=[5, 4], color="#444").encode(
            y=alt.Y("zero:Q", scale=scale, title=title)),
    ]
    notes = [p["note"] for p in data if p["clipped"]]
    heading = alt.TitleParams(panel, subtitle=[f"off scale, drawn at the edge: {'; '.join(notes)}"],
                              subtitleColor="#c0392b") if notes else panel
    return alt.layer(*layers, data=alt.Data(values=data)).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT,
                                                                      title=heading)


def sparsity_chart(rows: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """Accuracy and perplexity (log scale) vs sparsity per task: one line per strategy/order/pattern."""
    x = alt.X("sparsity:Q", title="sparsity (%)", scale=alt.Scale(domain=[0, 100]))
    return _series_sweep(rows, "sparsity", x,
                         "Prune weights: effect of sparsity on each task (95% CI bands, dashed = dense)")


def removal_plans_chart(rows: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """Each task vs the number of layers removed (K): one line per removal plan, dense as a rule.

    Answers "which K layers can go together": the plans (least important by a metric, best block,
    greedy) are compared at the same K on the same items.
    """
    x = alt.X("layers_removed:Q", title="layers removed (K)", axis=alt.Axis(tickMinStep=1, format="d"))
    return _series_sweep(rows, "layers_removed", x,
                         "Remove K layers together: each plan's effect on each task (95% CI bands, dashed = dense)")


def _series_sweep(rows: list[dict[str, Any]], field: str, x: alt.X, title: str) -> alt.TopLevelMixin | None:
    """One panel per task and metric, one line per series over ``field`` (the non-dense rows that have it)."""
    sweep = [r for r in rows if r["strategy"] != DENSE and r[field] is not None]
    if not sweep:
        return None
    panels = []
    for panel in dict.fromkeys(r["panel"] for r in sweep):
        points = [r for r in sweep if r["panel"] == panel]
        kind = points[0]["kind"]
        panel_title = f"{panel} (log scale)" if kind == "perplexity" else panel
        panels.append(_sweep_panel(points, _dense_rows(rows, points), x, "series", kind, panel_title))
    return alt.concat(*panels, columns=2).resolve_scale(color="shared").properties(title=title)


def width_charts(rows: list[dict[str, Any]], sizes: dict[str, VariantSize]) -> dict[str, alt.TopLevelMixin | None]:
    """One sweep chart per declared width axis (by its label): the variants that remove along that
    axis alone, against the fraction removed (the achieved one where the strategy declares how to read
    it, ``SizeAxis.achieved``: rounding to whole channels or ``round_to`` moves it off the option). A variant shrinking several axes at once (combined
    width) is on none of these: the size comparison sets it beside the others."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        size = sizes.get(row["variant"], VariantSize())
        if len(axes := size.width_axes) == 1:
            by_label.setdefault(axes[0].label or axes[0].option or "width", []).append({**row, "width": axes[0].percent})
    charts = {}
    for label, points in by_label.items():
        x = alt.X("width:Q", title=f"{label} removed (%)", scale=alt.Scale(domain=[0, 100]))
        with_dense = [*points, *({**r, "width": None} for r in rows if r["strategy"] == DENSE)]
        charts[f"width_sweep_{slug(label)}"] = _series_sweep(
            with_dense, "width", x, f"Prune width ({label}): effect on each task (95% CI bands, dashed = dense)")
    return charts


def size_points(rows: list[dict[str, Any]], sizes: dict[str, VariantSize], methods: dict[str, str]) -> list[dict[str, Any]]:
    """Chart rows placed at their size: ``kept`` = parameters as a percentage of dense's, ``method`` a line.

    A variant that only zeroes weights keeps dense's tensors: it is placed at its non-zero count
    (parameters less the zeros it added), for reference, and its line says so. One-layer-sweep
    variants are a diagnosis (which layer matters), not a method: the depth methods are the plans.
    """
    dense = sizes.get(DENSE)
    if dense is None or not dense.parameters:
        return []
    points = []
    for row in rows:
        size = sizes.get(row["variant"])
        if size is None or size.parameters is None or size.sweep_layer is not None:
            continue
        placed = effective_parameters(size, dense)
        points.append({**row, "parameters": placed, "kept": round(100 * placed / dense.parameters, 6),
                       "method": methods.get(row["variant"], row["variant"])})
    return points


def method_labels(summary: pl.DataFrame, sizes: dict[str, VariantSize]) -> dict[str, str]:
    """Each variant's line in the size comparison (``method_label``), dense as ``dense``."""
    records = [(row, json.loads(row["params"] or "{}")) for row in
               summary.select("variant", "strategy", "params").unique(maintain_order=True).iter_rows(named=True)]
    varying = varying_settings([(row["strategy"], params) for row, params in records])
    labels = {}
    for row, params in records:
        size = sizes.get(row["variant"], VariantSize())
        keys = varying.get(row["strategy"], set()) - size.axis_options
        labels[row["variant"]] = DENSE if row["strategy"] == DENSE else method_label(
            series_label(row["strategy"], params, keys), size)
    return labels


def effective_parameters(size: VariantSize, dense: VariantSize) -> int:
    """Where a variant stands in size: its parameter count, less the zeros it added for weight pruning."""
    if size.axis("weights") is None or size.zero_parameters is None or dense.zero_parameters is None:
        return int(size.parameters)
    return int(size.parameters - max(0, size.zero_parameters - dense.zero_parameters))


def method_label(series: str, size: VariantSize) -> str:
    """A line of the size comparison: the series (strategy and varying settings), the width axes a
    multi-axis strategy removed along (``width mlp+heads``), and "non-zero" for weight pruning."""
    declared = [a for a in size.axes if a.kind == "width"]
    if len(declared) > 1:
        series = f"{series} {'+'.join(a.option or a.label for a in size.width_axes) or 'none'}"
    if size.axis("weights") is not None:
        series = f"{series} (non-zero weights, reference)"
    return series


def size_comparison_chart(rows: list[dict[str, Any]], sizes: dict[str, VariantSize],
                          methods: dict[str, str]) -> alt.TopLevelMixin | None:
    """Each task against the parameters kept (% of dense): one line per method, so methods are
    compared at equal size (the report's table pairs the best against the runner-up)."""
    points = [p for p in size_points(rows, sizes, methods) if p["strategy"] != DENSE]
    if not points:
        return None
    dense = [r for r in rows if r["strategy"] == DENSE]
    x = alt.X("kept:Q", title="parameters kept (% of dense)", scale=alt.Scale(zero=False, reverse=True))
    panels = []
    for panel in dict.fromkeys(p["panel"] for p in points):
        data = sorted((p for p in points if p["panel"] == panel), key=lambda p: -p["kept"])
        kind = data[0]["kind"]
        title = f"{panel} (log scale)" if kind == "perplexity" else panel
        panels.append(_sweep_panel(data, [r for r in dense if r["panel"] == panel], x, "method", kind, title))
    return alt.concat(*panels, columns=2).resolve_scale(color="shared").properties(
        title="At equal size: each method's quality against the parameters it keeps (95% CI bands, dashed = dense)")


def speedup_label(bench: pl.DataFrame, column: str) -> str:
    """What a bench table's speedup column measures, read off the table's own rate columns: decode
    at the first batch size it measured, prefill (batch 1) at its longest prompt (``bench_rows``)."""
    if column == DECODE_SPEEDUP:
        batches = [c.removeprefix(DECODE_RATE) for c in bench.columns if c.startswith(DECODE_RATE)]
        return f"decode speedup vs dense (batch {batches[0]})" if batches else "decode speedup vs dense"
    lengths = [int(c.removeprefix(PREFILL_RATE)) for c in bench.columns
               if c.startswith(PREFILL_RATE) and c.removeprefix(PREFILL_RATE).isdigit()]
    return f"prefill speedup vs dense (batch 1, {max(lengths)}-token prompt)" if lengths else "prefill speedup vs dense"


def quality_vs_speed_chart(rows: list[dict[str, Any]], bench: pl.DataFrame | None,
                           methods: dict[str, str] | None = None) -> alt.TopLevelMixin | None:
    """Each task's value against the variant's measured decode speedup over dense (x = 1 is dense),
    one line per method.

    What a deployer weighs: a variant up and to the right is both faster and as good. Unstructured
    sparsity sits at x ~ 1 (zeros in dense matrices cost the same); layer removal moves right.
    """
    if bench is None or bench[DECODE_SPEEDUP].null_count() == len(bench):
        return None
    speed = {r["variant"]: r for r in bench.select("variant", DECODE_SPEEDUP, PREFILL_SPEEDUP, "parameters")
             .iter_rows(named=True)}
    methods = methods or {}
    points = [{**r, **speed[r["variant"]], "method": methods.get(r["variant"], r["series"])}
              for r in rows if r["variant"] in speed]
    if not points:
        return None
    x = alt.X(f"{DECODE_SPEEDUP}:Q", title=speedup_label(bench, DECODE_SPEEDUP), scale=alt.Scale(zero=False))
    tooltip = [*_tooltip(), alt.Tooltip(f"{DECODE_SPEEDUP}:Q", format=".3f"),
               alt.Tooltip(f"{PREFILL_SPEEDUP}:Q", format=".3f"), alt.Tooltip("parameters:Q", format=",")]
    panels = []
    for panel in dict.fromkeys(r["panel"] for r in points):
        data = sorted((r for r in points if r["panel"] == panel), key=lambda r: r[DECODE_SPEEDUP] or 0.0)
        kind = data[0]["kind"]
        title = f"{panel} (log scale)" if kind == "perplexity" else panel
        color = alt.Color("method:N", legend=alt.Legend(orient="bottom", columns=1))
        base = alt.Chart()
        panels.append(alt.layer(
            base.mark_line(opacity=0.6).encode(x=x, y=_y(kind, title), color=color),
            base.mark_point(filled=True, size=60).encode(
                x=x, y=_y(kind, title), color=color,
                shape=alt.Shape("verdict:N", title="vs dense", scale=VERDICTS, legend=alt.Legend(orient="bottom")),
                tooltip=tooltip), data=alt.Data(values=data)).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT))
    return alt.concat(*panels, columns=2).properties(
        title="Quality against measured speed: one line per method (shape = paired test vs dense)")


def dense_vs_pruned_chart(rows: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """The original study's table done right: every pruned variant against dense, with 95% CIs.

    One panel per task and metric; the grey band is the dense model's CI, the dashed rule its value,
    each variant a point with its CI as an error bar and its paired-test verdict as the shape.
    """
    pruned = [r for r in rows if r["strategy"] != DENSE]
    if not pruned:
        return None
    panels = []
    for panel in dict.fromkeys(r["panel"] for r in pruned):
        points = [r for r in pruned if r["panel"] == panel]
        panels.append(_forest_panel(points, _dense_rows(rows, points), panel))
    return alt.concat(*panels, columns=2).properties(
        title="Dense vs pruned, per variant (95% CIs; shape = Holm-adjusted paired test vs dense)")


def _dense_rows(rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    panels = {r["panel"] for r in points}
    return [r for r in rows if r["strategy"] == DENSE and r["panel"] in panels]


def _y(kind: str, title: str, field: str = "value") -> alt.Y:
    if kind == "perplexity":
        return alt.Y(f"{field}:Q", title=title, scale=alt.Scale(type="log"), axis=LOG_AXIS)
    if kind == "accuracy":
        return alt.Y(f"{field}:Q", title=title, scale=alt.Scale(domain=[0, 1]))
    return alt.Y(f"{field}:Q", title=title, scale=alt.Scale(zero=False))


def _tooltip() -> list[alt.Tooltip]:
    return [
        alt.Tooltip("variant:N"), alt.Tooltip("panel:N", title="task · metric"),
        alt.Tooltip("value:Q", format=".4g"), alt.Tooltip("ci_low:Q", format=".4g"),
        alt.Tooltip("ci_high:Q", format=".4g"), alt.Tooltip("n:Q"),
        alt.Tooltip("dense_value:Q", format=".4g", title="dense (same items)"),
        alt.Tooltip("diff_vs_dense:Q", format="+.4g"), alt.Tooltip("rel_change:Q", format="+.2%", title="relative change"),
        alt.Tooltip("p_value:Q", format=".3g"),
        alt.Tooltip("p_holm:Q", format=".3g", title="p (Holm)"),
        alt.Tooltip("verdict:N"),
    ]


def _sweep_panel(points, dense, x: alt.X, color_field: str, kind: str, title: str) -> alt.LayerChart:
    """CI band + line + verdict-shaped points per series, with the dense values as dashed rules."""
    color = alt.Color(f"{color_field}:N", title=None, legend=alt.Legend(orient="bottom", columns=1, symbolOpacity=1))
    base = alt.Chart()  # the layers share the panel's data, embedded once
    band = base.mark_area(opacity=0.18).encode(x=x, y=_y(kind, title, "ci_low"), y2="ci_high:Q", color=color)
    line = base.mark_line().encode(x=x, y=_y(kind, title), color=color)
    dots = base.mark_point(filled=True, size=45).encode(
        x=x, y=_y(kind, title), color=color, tooltip=_tooltip(),
        shape=alt.Shape("verdict:N", title="vs dense", scale=VERDICTS, legend=alt.Legend(orient="bottom")))
    layers = [band, line, dots, *chance_rule(points, "y", kind, title)]
    if dense:
        rule_color = color if color_field == "panel" else alt.value("#444")
        layers.append(alt.Chart(alt.Data(values=dense)).mark_rule(strokeDash=[5, 4]).encode(
            y=_y(kind, title), color=rule_color, tooltip=_tooltip()))
    return alt.layer(*layers, data=alt.Data(values=points)).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT)


def _forest_panel(points, dense, panel: str) -> alt.LayerChart:
    kind = points[0]["kind"]
    log = kind == "perplexity"
    scale = alt.Scale(type="log") if log else alt.Scale(domain=[0, 1]) if kind == "accuracy" else alt.Scale(zero=False)
    axis = LOG_AXIS if log else alt.Axis()
    title = f"{kind} (log scale)" if log else kind
    order = list(dict.fromkeys(r["variant"] for r in points))
    y = alt.Y("variant:N", sort=order, title=None)
    base = alt.Chart()
    bars = base.mark_rule().encode(y=y, x=alt.X("ci_low:Q", scale=scale, title=title, axis=axis), x2="ci_high:Q")
    dots = base.mark_point(filled=True, size=50).encode(
        y=y, x=alt.X("value:Q", scale=scale, title=title, axis=axis), tooltip=_tooltip(),
        shape=alt.Shape("verdict:N", title="vs dense", scale=VERDICTS, legend=alt.Legend(orient="bottom")),
        color=alt.Color("verdict:N", title="vs dense", legend=alt.Legend(orient="bottom"),
                        scale=VERDICT_COLOURS))
    layers = [bars, dots, *chance_rule(points, "x", kind, title)]
    if dense:
        dense_data = alt.Data(values=dense)
        layers[:0] = [
            alt.Chart(dense_data).mark_rect(opacity=0.15, color="#888").encode(x="ci_low:Q", x2="ci_high:Q"),
            alt.Chart(dense_data).mark_rule(strokeDash=[5, 4], color="#444").encode(x="value:Q", tooltip=_tooltip()),
        ]
    height = max(PANEL_HEIGHT // 2, 16 * len(order))
    return alt.layer(*layers, data=alt.Data(values=points)).properties(width=PANEL_WIDTH, height=height, title=panel)


def with_chance(rows: list[dict[str, Any]], summary: pl.DataFrame, chance: dict[str, float]) -> list[dict[str, Any]]:
    """Each accuracy row with its task's chance level (None where unknown)."""
    for row, task in zip(rows, summary["task"], strict=True):
        row["chance"] = chance.get(task) if row["kind"] == "accuracy" else None
    return rows


def chance_rule(points: list[dict[str, Any]], axis: str, kind: str, title: str) -> list[alt.Chart]:
    """A dotted rule at the chance accuracy of the panel's tasks (MMLU: 0.25), labelled; none if unknown."""
    levels = sorted({p["chance"] for p in points if p.get("chance") is not None})
    if not levels:
        return []
    data = alt.Data(values=[{"chance": level, "label": f"chance {level:g}"} for level in levels])
    scale = alt.Scale(domain=[0, 1])
    encoding = ({"y": alt.Y("chance:Q", scale=scale, title=title)} if axis == "y"
                else {"x": alt.X("chance:Q", scale=scale, title=title)})
    rule = alt.Chart(data).mark_rule(strokeDash=[2, 3], color="#b9770e").encode(
        **encoding, tooltip=[alt.Tooltip("label:N")])
    text = alt.Chart(data).mark_text(align="left", dx=3, dy=-6, color="#b9770e", fontSize=10).encode(
        **encoding, text="label:N")
    return [rule, text]


def answer_letters_chart(letters: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """Stacked bars per variant: the share of questions answered with each letter (gold answers first).

    A model at chance often answers one letter to nearly every question; accuracy alone hides that.
    """
    if not letters:
        return None
    fixed = {"task", "metric", "variant", "n"}
    values = [{"task": r["task"], "metric": r["metric"], "panel": f"{r['task']} · {r['metric']}",
               "variant": r["variant"], "letter": letter, "count": r[letter],
               "share": r[letter] / r["n"] if r["n"] else 0.0}
              for r in letters for letter in r if letter not in fixed and r[letter] is not None]
    order = list(dict.fromkeys(r["variant"] for r in letters))
    bars = alt.Chart(alt.Data(values=values)).mark_bar().encode(
        y=alt.Y("variant:N", sort=order, title=None),
        x=alt.X("share:Q", stack="normalize", title="share of questions", axis=alt.Axis(format="%")),
        color=alt.Color("letter:N", title="answer", legend=alt.Legend(orient="bottom")),
        order=alt.Order("letter:O"),  # ordinal: Vega-Lite warns on a nominal order channel
        tooltip=["task:N", "metric:N", "variant:N", "letter:N", "count:Q", alt.Tooltip("share:Q", format=".1%")],
    ).properties(width=PANEL_WIDTH, height=max(PANEL_HEIGHT // 2, 14 * len(order)))
    return bars.facet(column=alt.Column("panel:N", title=None)).properties(
        title="Answer letters per variant (first row: the gold answers)")


def fidelity_chart(fidelity: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """Per variant: mean and 99th-percentile KL to dense (log scale) and top-1 agreement, with 95% intervals."""
    pruned = [r for r in fidelity if r["strategy"] != DENSE]
    if not pruned:
        return None
    order = list(dict.fromkeys(r["variant"] for r in pruned))
    y = alt.Y("variant:N", sort=order, title=None)
    height = max(PANEL_HEIGHT // 2, 14 * len(order))
    panels = []
    for field, title, log in (("kl_median", "median window's mean KL(dense || variant), nats (log)", True),
                              ("kl_p99", "99th percentile KL, nats (log; no interval)", True),
                              ("top1_median", "median window's same top token as dense", False)):
        data = [r for r in pruned if r.get(field) is not None and (not log or r[field] > 0)]
        if not data:
            continue
        scale = alt.Scale(type="log") if log else alt.Scale(domain=[0, 1])
        x = alt.X(f"{field}:Q", title=title, scale=scale, axis=LOG_AXIS if log else alt.Axis())
        base = alt.Chart(alt.Data(values=data))
        tooltip = ["variant:N", "windows:Q", alt.Tooltip(f"{field}:Q", format=".4g")]
        layers = [base.mark_point(filled=True, size=45).encode(y=y, x=x, tooltip=tooltip)]
        if f"{field}_low" in data[0]:
            layers.insert(0, base.mark_rule().encode(y=y, x=alt.X(f"{field}_low:Q", scale=scale, title=title),
                                                     x2=f"{field}_high:Q"))
        panels.append(alt.layer(*layers).properties(width=PANEL_WIDTH * 2 // 3, height=height))
    return alt.hconcat(*panels).properties(
        title="Fidelity to the dense model on the same WikiText windows (median window, 95% intervals over windows)")


def fidelity_layer_chart(fidelity: list[dict[str, Any]], sizes: dict[str, VariantSize]) -> alt.TopLevelMixin | None:
    """Mean KL to dense (log scale) and top-1 agreement vs the removed layer, with 95% bands over windows."""
    points = [{**r, "layer": sizes.get(r["variant"], VariantSize()).sweep_layer} for r in fidelity]
    points = [p for p in points if p["layer"] is not None and p.get("kl_median") is not None and p["kl_median"] > 0]
    if not points:
        return None
    x = alt.X("layer:Q", title="removed layer", axis=alt.Axis(tickMinStep=1, format="d"))
    panels = []
    for field, title, scale in (("kl_median", "median window's mean KL(dense || variant), nats (log)",
                                 alt.Scale(type="log")),
                                ("top1_median", "median window's same top token as dense", alt.Scale(domain=[0, 1]))):
        base = alt.Chart(alt.Data(values=points))
        y = alt.Y(f"{field}:Q", title=title, scale=scale, axis=LOG_AXIS if field == "kl_median" else alt.Axis())
        panels.append(alt.layer(
            base.mark_area(opacity=0.18).encode(x=x, y=alt.Y(f"{field}_low:Q", scale=scale, title=title),
                                                y2=f"{field}_high:Q"),
            base.mark_line(point=True).encode(x=x, y=y, tooltip=[
                "variant:N", alt.Tooltip(f"{field}:Q", format=".4g"), alt.Tooltip(f"{field}_low:Q", format=".4g"),
                alt.Tooltip(f"{field}_high:Q", format=".4g"), "windows:Q"]),
        ).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT))
    return alt.hconcat(*panels).properties(
        title="Remove one decoder layer: fidelity to dense on the same WikiText windows (95% bands over windows)")


def baseline_history_chart(points: list[dict[str, Any]]) -> alt.TopLevelMixin | None:
    """The dense model's value per run (with its CI): reruns of a study should agree within noise.

    ``points`` have ``study``, ``version``, ``created`` (ISO time), ``panel``, ``kind``, ``value``,
    ``ci_low`` and ``ci_high``; accuracy and perplexity (log scale) get separate panels.
    """
    panels = []
    for kind in ("accuracy", "perplexity"):
        data = [p for p in points if p["kind"] == kind and p["value"] is not None]
        if not data:
            continue
        title = f"dense {kind} (log scale)" if kind == "perplexity" else f"dense {kind}"
        x = alt.X("created:T", title="run (UTC)")
        # one legend per panel (the panels' series differ), at full width: no clipped or repeated entries
        color = alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=1, labelLimit=0))
        base = alt.Chart(alt.Data(values=[{**p, "series": f"{p['study']} · {p['panel']}"} for p in data]))
        # runs agree within a few points: zoom in rather than show accuracy on [0, 1]
        scale = alt.Scale(type="log") if kind == "perplexity" else alt.Scale(zero=False)
        y = alt.Y("value:Q", title=title, scale=scale)
        panels.append(alt.layer(
            base.mark_rule().encode(x=x, y=alt.Y("ci_low:Q", scale=scale, title=title), y2="ci_high:Q", color=color),
            base.mark_line(point=True).encode(x=x, y=y, color=color, tooltip=[
                "study:N", "version:N", "panel:N", alt.Tooltip("value:Q", format=".4g"),
                alt.Tooltip("ci_low:Q", format=".4g"), alt.Tooltip("ci_high:Q", format=".4g")]),
        ).properties(width=PANEL_WIDTH, height=PANEL_HEIGHT * 2 // 3))
    return alt.hconcat(*panels).resolve_scale(color="independent") if panels else None
