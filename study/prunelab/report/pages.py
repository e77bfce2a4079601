"""Self-contained HTML pages: a run's report, the artifacts index, one page per chart.

Every page opens offline: the Vega, Vega-Lite and Vega-Embed libraries (~0.9 MB, from vl-convert's
bundle) are inlined in ONE script block per page, and each chart is only its Vega-Lite spec passed to
``vegaEmbed``. (Altair's own ``to_html(inline=True)`` inlines the libraries once per chart, which
would make a report with ten charts ten times larger.) When all charts have settled the page sets
``data-charts-rendered`` / ``data-charts-failed`` on ``<body>``; a failed chart shows its error in
place of the chart and on the console.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import altair as alt
import vl_convert as vlc

from prunelab.records import DENSE, STRATEGY
from prunelab.report.stats import format_p

LIBRARIES_ID = "prunelab-vega-libraries"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.drop td { background: #fdecea; }
tr.gain td { background: #eafaf1; }
tr.underpowered td { color: #8a6d00; }
.findings li { margin: 0.2rem 0; }
.headline { font-size: 1.02rem; }
.chart { margin: 0.5rem 0 2rem; }
.chart-error { color: #b00; white-space: pre-wrap; }
.muted { color: #777; }
pre { background: #f7f7f7; padding: 0.75rem; overflow-x: auto; }
"""

EMBED_SCRIPT = """
(function () {
  const specs = JSON.parse(document.getElementById("prunelab-chart-specs").textContent);
  const options = {renderer: "svg", actions: {export: true, source: true, compiled: false, editor: false}};
  const embeds = Object.entries(specs).map(([id, spec]) =>
    vegaEmbed("#" + id, spec, options).catch((err) => {
      console.error("chart " + id + " failed: " + err);
      const div = document.getElementById(id);
      div.classList.add("chart-error");
      div.textContent = "This chart failed to render: " + err;
      throw err;
    }));
  Promise.allSettled(embeds).then((results) => {
    document.body.dataset.chartsRendered = results.filter((r) => r.status === "fulfilled").length;
    document.body.dataset.chartsFailed = results.filter((r) => r.status === "rejected").length;
  });
})();
"""


def vega_lite_version() -> str | None:
    """The Vega-Lite version Altair writes specs for, if vl-convert bundles it (else its latest)."""
    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return major_minor if major_minor in vlc.get_vegalite_versions() else None


@lru_cache(maxsize=1)
def vega_libraries() -> str:
    """vl-convert's offline bundle of Vega + Vega-Lite + Vega-Embed, defining ``window.vegaEmbed``."""
    bundle = vlc.javascript_bundle(vl_version=vega_lite_version())
    if "</script" in bundle.lower():  # would end the inline script block early
        raise RuntimeError("the vl-convert JavaScript bundle contains '</script'; it cannot be inlined")
    return bundle


def chart_div(chart_id: str) -> str:
    return f'<div class="chart" id="{html.escape(chart_id)}"></div>'


GENERATOR = '<meta name="generator" content="prunelab">'
LEGACY_INDEX_TITLE = "<title>prunelab artifacts</title>"  # indexes written before the generator tag


def written_by_prunelab(path: Path) -> bool:
    """Whether an HTML file is one of prunelab's pages (its ``generator`` meta tag, in the head)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return GENERATOR in head or LEGACY_INDEX_TITLE in head


def href(*segments: str) -> str:
    """A relative link from escaped path segments: ``./javascript%3Aalert%281%29/v/report.html``.

    Every segment is percent-encoded whole (``/``, ``:``, ``?``, ``#`` included) and the link starts
    with ``./``, so no folder name can become a scheme, a query or a path outside the page's folder.
    """
    return "./" + "/".join(quote(segment, safe="") for segment in segments)


def page(title: str, body: str, charts: dict[str, dict[str, Any]] | None = None) -> str:
    """A complete HTML document; ``charts`` maps the id of a ``chart_div`` in ``body`` to its spec."""
    head = f'<meta charset="utf-8">\n{GENERATOR}\n<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n'
    scripts = ""
    if charts:
        head += f'<script id="{LIBRARIES_ID}">\n{vega_libraries()}\n</script>\n'
        scripts = (f'<script type="application/json" id="prunelab-chart-specs">{_json_for_script(charts)}</script>\n'
                   f"<script>{EMBED_SCRIPT}</script>\n")
    return f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n{head}</head>\n<body>\n{body}\n{scripts}</body>\n</html>\n"


def chart_page(title: str, spec: dict[str, Any]) -> str:
    """A single chart as its own self-contained page (the ``charts/<name>.html`` files)."""
    return page(title, f"<h1>{html.escape(title)}</h1>\n{chart_div('chart')}", {"chart": spec})


def _json_for_script(value: Any) -> str:
    """JSON safe inside <script>: '<' only occurs in strings, where \\u003c means the same."""
    return json.dumps(value, allow_nan=False).replace("<", "\\u003c")


def table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
          numeric: set[int] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML, ``numeric`` column indexes align right."""
    numeric = numeric or set()
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a table cell; missing values show as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return html.escape(str(value))


METHODS_NOTE = (
    "Every variant is compared with dense on the same items. Accuracy: 95% Wilson interval; exact McNemar "
    "test (lost = dense right and variant wrong, gained = the reverse); Newcombe interval of the difference. "
    "Perplexity: exp(sum NLL / sum tokens); exact sign test on per-window differences of mean NLL per token "
    "(is a window as likely to get worse as better?); the change shown is the median per-window change, with "
    "its distribution-free interval (interpolated order statistics). Other per-item metrics: the same sign "
    "test and median interval; fidelity metrics (KL, same top token) are tested against a declared tolerance: "
    "within / beyond / undecided. p (Holm): adjusted over the variants of the "
    "task and metric; it alone decides the verdict (red: worse, green: better). Underpowered: even the most "
    "extreme outcome could not reach p &lt; 0.05 after Holm. p-values are never shown below their "
    "resolution. See docs/statistics.md."
)


def report_page(manifest: dict[str, Any], summary_rows: list[dict[str, Any]], chart_specs: dict[str, dict[str, Any]],
                files: list[str], bench_rows: list[dict[str, Any]] | None = None,
                findings: list[dict[str, Any]] | None = None, extra_sections: str = "",
                healing_rows: list[dict[str, Any]] | None = None,
                equal_size: list[dict[str, Any]] | None = None,
                equal_speed: list[dict[str, Any]] | None = None) -> str:
    """The page of one run: what ran, what it found, the charts, the summary by harm, the files."""
    title = f"{manifest['study']} — {manifest['version']}"
    charts_html = "\n".join(
        f"<h3>{html.escape(name.replace('_', ' '))}</h3>\n"
        f'<p class="muted">{_links([f"charts/{name}.{ext}" for ext in ("html", "png", "svg")])}</p>\n'
        f"{chart_div(f'chart-{name}')}"
        for name in chart_specs
    )
    study_file = manifest.get("study_file")
    body = "\n".join([
        f"<h1>{html.escape(title)}</h1>",
        '<p><a href="../../index.html">all studies and versions</a></p>',
        _run_facts(manifest),
        "<h2>Headline</h2>", headline_list(manifest.get("headline", [])),
        *(["<h2>Findings</h2>", findings_html(findings)] if findings else []),
        *(["<h2>At equal size</h2>", equal_size_html(equal_size)] if equal_size else []),
        *(["<h2>At equal speed</h2>", equal_speed_html(equal_speed)] if equal_speed else []),
        "<h2>Charts</h2>", charts_html or '<p class="muted">no chart has data in this run</p>',
        "<h2>Summary (most harmful first)</h2>", f'<p class="muted">{METHODS_NOTE}</p>', summary_table(summary_rows),
        *(["<h2>Healing</h2>", f'<p class="muted">{HEALING_NOTE}</p>', healing_table(healing_rows)]
          if healing_rows else []),
        extra_sections,
        *(["<h2>Size and speed</h2>", bench_table(bench_rows)] if bench_rows else []),
        "<h2>Files</h2>", f"<p>{_links(files)}</p>",
        "<h2>Study file</h2>",
        f"<pre>{html.escape(study_file)}</pre>" if study_file else '<p class="muted">not recorded</p>',
    ])
    return page(title, body, {f"chart-{name}": spec for name, spec in chart_specs.items()})


def equal_size_html(rows: list[dict[str, Any]]) -> str:
    """Per task and metric, per size bin: the best method, the runner-up and their paired test."""
    from prunelab.report.equalsize import BIN_POINTS

    note = (f"Same size = the same bin of {BIN_POINTS:g} percentage points of dense's parameter count. Each variant "
            "sits at the parameters it keeps; weight pruning (zeros stored in dense tensors, dense's size and speed) "
            "at its non-zero count, for reference only: it is shown beside the ranking, never ranked. A method is "
            "represented in a bin by its smallest variant there. "
            "Methods are ranked by their change vs dense; the best is tested against the runner-up on the items both "
            "were scored on (the test each variant gets against dense), Holm over the bins of the task and metric.")
    speed = any(r.get("best_decode_speedup") is not None for r in rows)

    def member(row: dict[str, Any], prefix: str) -> str:
        faster = row.get(f"{prefix}_decode_speedup")
        return _member(row, prefix, f"{row[f'{prefix}_kept']:.1f}% kept",
                       f", decode ×{faster:.3g}" if speed and faster is not None else "")

    def reference(row: dict[str, Any]) -> str:
        if row.get("reference_variant") is None:
            return "—"
        return _member(row, "reference", f"{row['reference_kept']:.1f}% non-zero", "")

    return f'<p class="muted">{note}</p>' + _comparison_table(
        rows, "parameters kept", lambda r: f"{r['kept_low']:g}–{r['kept_high']:g}%", member,
        ("reference (zeros in dense tensors)", reference))


def equal_speed_html(rows: list[dict[str, Any]]) -> str:
    """Per task and metric, per bin of measured speedup: the best method, the runner-up and their paired test."""
    from prunelab.report.equalsize import SPEED_STEP

    measure = rows[0]["speed_label"]
    note = (f"Same speed = the same bin of ×{SPEED_STEP:g} of the measured {html.escape(measure)}, centred on its "
            f"multiples (×1.3 = 1.25–1.35×), as [bench] measured it on this run's machine. Each variant sits at its "
            "measured speedup. Weight pruning stores zeros in dense tensors and runs at dense's speed (about ×1) unless "
            "the bench converted it to 2:4 sparse kernels. A method is represented in a bin by its fastest variant there. "
            "Methods are ranked by their change vs dense; the best is tested against the runner-up on the items both "
            "were scored on (the test each variant gets against dense), Holm over the bins of the task and metric.")

    def member(row: dict[str, Any], prefix: str) -> str:
        kept = row[f"{prefix}_kept"]
        return _member(row, prefix, f"×{row[f'{prefix}_speedup']:.3g}",
                       f", {kept:.1f}% kept" if kept is not None else "")

    decimals = max(1, -math.floor(math.log10(SPEED_STEP)))  # a bin's centre as written: x1.0, x1.3

    def bin_cell(row: dict[str, Any]) -> str:
        return f"×{(row['speed_low'] + row['speed_high']) / 2:.{decimals}f} ({row['speed_low']:g}–{row['speed_high']:g}×)"

    return f'<p class="muted">{note}</p>' + _comparison_table(rows, html.escape(measure), bin_cell, member)


def _comparison_table(rows: list[dict[str, Any]], bin_header: str, bin_cell: Callable[[dict[str, Any]], str],
                      member: Callable[[dict[str, Any], str], str],
                      extra: tuple[str, Callable[[dict[str, Any]], str]] | None = None) -> str:
    """An equal-size or equal-speed table: per row its bin, both methods, their difference and test,
    and an ``extra`` column (header, cell) last. ``bin_header`` and what ``bin_cell``, ``member`` and
    the extra cell return are already-escaped HTML (the extra header is plain text)."""
    from prunelab.report.findings import change_text

    header = ["task · metric", bin_header, "best", "runner-up", "best − runner-up", "test", "p", "p (Holm)",
              "verdict", "other methods", *([html.escape(extra[0])] if extra else [])]
    body, classes = [], []
    for r in rows:
        diff = "—" if r["diff"] is None else (f"{r['diff'] * 100:+.3g} points" if r["kind"] == "accuracy"
                                               else f"{r['diff']:+.4g}")
        if r["diff_ci_low"] is not None and r["kind"] != "perplexity":
            scale = 100 if r["kind"] == "accuracy" else 1
            diff += f" [{r['diff_ci_low'] * scale:+.3g}, {r['diff_ci_high'] * scale:+.3g}]"
        if r["kind"] == "perplexity" and r["rel_diff"] is not None:
            diff += f" ({change_text(r['rel_diff'], None, r['kind'])})"
        body.append([f"{html.escape(r['task'])} · {html.escape(r['label'] or r['metric'])}", bin_cell(r),
                     member(r, "best"), member(r, "runner"), html.escape(diff), fmt(r["test"]),
                     html.escape(format_p(r["p_value"])), html.escape(format_p(r["p_holm"])), html.escape(r["verdict"]),
                     html.escape(r["others"]) or "—", *([extra[1](r)] if extra else [])])
        classes.append("gain" if r["verdict"].startswith("best") else "")
    return table(header, body, classes, numeric={4, 6, 7})


def _member(row: dict[str, Any], prefix: str, position: str, extra: str) -> str:
    """One method of a comparison bin: its line, variant, where it stands (``position``), its value
    and change vs dense, then ``extra`` (both plain text, escaped here)."""
    from prunelab.report.findings import change_text

    change = change_text(row[f"{prefix}_rel_change"], None, row["kind"])
    return (f"{html.escape(row[f'{prefix}_method'])}<br><span class=\"muted\">{html.escape(row[f'{prefix}_variant'])}: "
            f"{html.escape(position)}, {fmt(row[f'{prefix}_value'])} ({html.escape(change)} vs dense)"
            f"{html.escape(extra)}</span>")


RANKED_SHOWN = 8  # per task and metric, the most and least harmful variants; the rest behind "show all"


def findings_html(blocks: list[dict[str, Any]]) -> str:
    """The findings block: per task and metric what the paired tests support, in sentences and a ranking."""
    from prunelab.report.findings import detectable_text, interval_text

    parts = []
    for block in blocks:
        h = block["headline"]
        items = []
        if block["layers_tested"]:
            safe = block["safe_layers"]
            if h.get("underpowered"):
                items.append("Layers whose removal is not detectably harmful: cannot tell, the test is underpowered.")
            elif safe:
                listed = ", ".join(f"{_layer_name(r)} ({interval_text(r)}; detectable with 80% power: "
                                   f"{detectable_text(r['mdd'], r['dense_value'], r['kind'])})" for r in safe)
                items.append(f"Layers whose removal is not detectably harmful (Holm, {len(safe)} of "
                             f"{block['layers_tested']}): {html.escape(listed)}")
            elif h.get("tolerance") is not None:
                items.append(f"No single-layer removal is within the tolerance of {h['tolerance']:g} (Holm): "
                             f"{h['beyond']} of {block['layers_tested']} are beyond it, the rest undecided.")
            else:
                items.append(f"Removing any one of the {block['layers_tested']} layers is detectably harmful (Holm).")
        for cliff in block["cliffs"]:
            if cliff["underpowered"]:
                text = "underpowered at every sparsity tried"
            elif cliff["sparsity"] is None:
                text = f"no significant loss up to {cliff['highest_tried']:g}%"
            else:
                text = f"first significant loss at {cliff['sparsity']:g}% ({interval_text(cliff['row'])})"
            items.append(f"{html.escape(cliff['method'])}: {html.escape(text)}")
        for best in block["best_by_sparsity"]:
            items.append(f"Least change at {best['sparsity']:g}% sparsity (point estimates of {best['of']} methods; "
                         "each is tested against dense, not against the others): "
                         f"{html.escape(best['method'])} ({html.escape(interval_text(best['row']))}, "
                         f"{html.escape(best['row']['verdict'])})")
        ranked = block["ranked"]
        rows = [[str(i + 1), html.escape(r["variant"]), html.escape(interval_text(r)),
                 format_p(r["p_holm"], _at_floor(r)), html.escape(r["verdict"])] for i, r in enumerate(ranked)]
        classes = [_row_class(r) for r in ranked]
        header = ["rank", "variant", "change vs dense [95% CI]", "p (Holm)", "verdict"]
        if len(rows) > 2 * RANKED_SHOWN:
            ranking = (table(header, rows[:RANKED_SHOWN] + [["…", "", "", "", ""]] + rows[-RANKED_SHOWN:],
                             classes[:RANKED_SHOWN] + [""] + classes[-RANKED_SHOWN:], numeric={0, 2, 3})
                       + f"<details><summary>all {len(rows)} variants</summary>{table(header, rows, classes, numeric={0, 2, 3})}"
                         "</details>")
        else:
            ranking = table(header, rows, classes, numeric={0, 2, 3}) if rows else ""
        parts.append(f"<h3>{html.escape(h['task'])} · {html.escape(h.get('label') or h['metric'])}</h3>\n"
                     f'<p class="headline">{html.escape(h.get("text") or "")}</p>\n'
                     + (f'<ul class="findings">{"".join(f"<li>{i}</li>" for i in items)}</ul>' if items else "")
                     + f"\n<p class=\"muted\">Variants ranked from most to least harmful:</p>\n{ranking}")
    return "\n".join(parts)


def _layer_name(row: dict[str, Any]) -> str:
    params = json.loads(row["params"] or "{}")
    return f"layer {params.get('layers')}"


def _at_floor(row: dict[str, Any]) -> bool:
    """A Monte-Carlo p-value at its resolution (every random pattern less extreme)."""
    return bool(row.get("resamples")) and row.get("p_value") is not None and \
        row["p_value"] <= 2 / (row["resamples"] + 1) + 1e-15


def _row_class(row: dict[str, Any]) -> str:
    return {"worse": "drop", "better": "gain", "underpowered": "underpowered"}.get(row.get("verdict") or "", "")


FIDELITY_NOTE = (
    "As llama.cpp's <code>perplexity --kl-divergence</code>: on the same WikiText windows, the exact "
    "KL(dense ‖ variant) of the next-token distributions over the full vocabulary (dense log-probabilities "
    "recomputed from its stored final hidden states), and the share of tokens whose most likely next token "
    "is dense's. Mean KL and top-1 agreement: mean over windows, 95% t-interval over windows. "
    "99th percentile: over all tokens of the variant, 95% percentile bootstrap resampling whole windows "
    "(B = 2000, seed 0; rough with few windows). Harm shows here when accuracy sits at chance."
)
ANSWERS_NOTE = (
    "Per accuracy metric, how often each variant gives each answer (the metric's own prediction); the "
    "first row of each block is the gold answers. A model at chance often gives one answer to nearly "
    "every question. Per-item means (e.g. the gold answer's probability): mean over questions with a 95% "
    "t-interval. Accuracy per category is each metric's own."
)


def sensitive_sections(extras: dict[str, list[dict[str, Any]]]) -> str:
    """Report sections for fidelity to dense and multiple-choice answers (``fidelity.summary_records``)."""
    parts = []
    if extras.get("fidelity"):
        parts += ["<h2>Fidelity to the dense model</h2>", f'<p class="muted">{FIDELITY_NOTE}</p>',
                  fidelity_html(extras["fidelity"])]
    if extras.get("answer_letters") or extras.get("category_accuracy"):
        parts += ["<h2>Multiple-choice answers</h2>", f'<p class="muted">{ANSWERS_NOTE}</p>']
    if extras.get("answer_letters"):
        parts += ["<h3>Answer letters</h3>", answer_letters_html(extras["answer_letters"])]
    if extras.get("mean_metrics"):
        parts += ["<h3>Per-item means</h3>", mean_metrics_html(extras["mean_metrics"])]
    if extras.get("category_accuracy"):
        parts += ["<h3>Accuracy per category</h3>", category_html(extras["category_accuracy"])]
    return "\n".join(parts)


def _with_interval(value: Any, low: Any, high: Any, spec: str = ".4g") -> str:
    return f"{fmt(value, spec)} [{fmt(low, spec)}, {fmt(high, spec)}]"


def fidelity_html(rows: list[dict[str, Any]]) -> str:
    header = ["task", "variant", "windows", "tokens", "mean KL", "median window KL [95% CI]", "99th pct KL",
              "same top token", "median window same top token [95% CI]"]
    cells = [[html.escape(r["task"]), html.escape(r["variant"]), fmt(r["windows"]), fmt(r["tokens"]),
              fmt(r["kl_mean"], ".4g"), _with_interval(r["kl_median"], r["kl_median_low"], r["kl_median_high"]),
              fmt(r["kl_p99"], ".4g"), fmt(r["top1_agree"], ".3f"),
              _with_interval(r["top1_median"], r["top1_median_low"], r["top1_median_high"], ".3f")] for r in rows]
    return table(header, cells, numeric={2, 3, 4, 5, 6, 7, 8})


def answer_letters_html(rows: list[dict[str, Any]]) -> str:
    letters = [k for k in rows[0] if k not in {"task", "metric", "variant", "n"}]
    header = ["task", "metric", "variant", "n", *map(html.escape, letters)]
    cells = [[html.escape(r["task"]), html.escape(r["metric"]), html.escape(r["variant"]), fmt(r["n"]),
              *(f"{r[x]} ({r[x] / r['n']:.0%})" if r["n"] and r[x] is not None else "—" for x in letters)]
             for r in rows]
    return table(header, cells, ["muted" if r["variant"] == "gold answers" else "" for r in rows],
                 numeric=set(range(3, 4 + len(letters))))


def mean_metrics_html(rows: list[dict[str, Any]]) -> str:
    cells = [[html.escape(r["task"]), html.escape(r["label"]), html.escape(r["variant"]), fmt(r["n"]),
              _with_interval(r["mean"], r["low"], r["high"], ".3f")] for r in rows]
    return table(["task", "metric", "variant", "n", "mean [95% CI]"], cells, numeric={3, 4})


def category_html(rows: list[dict[str, Any]]) -> str:
    categories = list(dict.fromkeys(r["category"] for r in rows))
    variants = list(dict.fromkeys((r["task"], r["metric"], r["variant"]) for r in rows))
    lookup = {(r["task"], r["metric"], r["variant"], r["category"]): r for r in rows}
    cells = []
    for task, metric, variant in variants:
        found = [lookup.get((task, metric, variant, c)) for c in categories]
        cells.append([html.escape(task), html.escape(metric), html.escape(variant),
                      *(f"{fmt(r['accuracy'], '.3f')} (n={r['n']})" if r else "—" for r in found)])
    return table(["task", "metric", "variant", *map(html.escape, categories)], cells,
                 numeric=set(range(3, 3 + len(categories))))
HEALING_NOTE = (
    "Each healed variant (&lt;variant&gt;+&lt;method&gt;) before and after healing, both paired against dense "
    "(diff and p as in the summary), and after against before on the same items with the same test "
    "(unhealed in the baseline's place); p (Holm) adjusts for the healed variants of a task and metric. "
    "With the healed dense control (dense+&lt;method&gt;, the dense model healed the same way), the last columns "
    "pair each healed variant against it: healing the dense model shows what the method adapts without any "
    "loss to recover, and after − healed dense is what healing did not recover, adaptation taken out."
)


def healing_table(rows: list[dict[str, Any]]) -> str:
    """Before and after healing per task: each vs dense, and after vs before (``healstats.healing_table``)."""
    header = ["task", "metric", "healed variant", "dense", "before [95% CI]", "before − dense (p)",
              "after [95% CI]", "after − dense (p)", "after − before", "lost / gained", "p", "p (Holm)",
              "healed dense", "after − healed dense (p, Holm)"]
    cells = []
    for r in rows:
        discordant = "—" if r["lost"] is None else f"{r['lost']} / {r['gained']}"
        cells.append([
            html.escape(r["task"]), html.escape(r["metric"]), html.escape(r["variant"]), fmt(r["dense_value"]),
            f"{fmt(r['before'])} [{fmt(r['before_ci_low'])}, {fmt(r['before_ci_high'])}]",
            f"{fmt(r['before_diff_vs_dense'], '+.4g')} ({fmt(r['before_p_vs_dense'], '.3g')})",
            f"{fmt(r['after'])} [{fmt(r['after_ci_low'])}, {fmt(r['after_ci_high'])}]",
            f"{fmt(r['after_diff_vs_dense'], '+.4g')} ({fmt(r['after_p_vs_dense'], '.3g')})",
            fmt(r["diff_vs_unhealed"], "+.4g"), discordant, fmt(r["p_vs_unhealed"], ".3g"),
            fmt(r["p_holm_vs_unhealed"], ".3g"), fmt(r["healed_dense_value"]),
            "—" if r["healed_dense"] is None else f"{fmt(r['diff_vs_healed_dense'], '+.4g')} "
            f"({fmt(r['p_vs_healed_dense'], '.3g')}, {fmt(r['p_holm_vs_healed_dense'], '.3g')})",
        ])
    return table(header, cells, numeric=set(range(3, 14)))


def bench_table(rows: list[dict[str, Any]]) -> str:
    """Each variant's measured size and speed (``benchmodel.bench_rows``), every column as measured."""
    columns = [c for c in rows[0] if c not in {"strategy", "params"}]
    return table(columns, [[html.escape(str(r[c])) if isinstance(r[c], str) else fmt(r[c]) for c in columns]
                           for r in rows], numeric=set(range(1, len(columns))))


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Every variant x task x metric with its interval, change vs dense, tests and verdict."""
    from prunelab.report.findings import interval_text

    header = ["task", "metric", "variant", "n", "value [95% CI]", "dense (same items)", "change vs dense [95% CI]",
              "lost / gained", "test", "p", "p (Holm)", "verdict"]
    cells, classes = [], []
    for r in rows:
        value = r.get("value", r["accuracy"] if r["kind"] == "accuracy" else r["perplexity"])
        discordant = "—" if r["lost"] is None else f"{r['lost']} / {r['gained']}"
        verdict = r.get("verdict") or "—"
        if verdict == "underpowered" and r.get("min_p") is not None:
            verdict += f" (min p {format_p(r['min_p'])})"
        test = r["test"] or "—"
        if r.get("resamples"):
            test += f" (B={r['resamples']})"
        cells.append([
            html.escape(r["task"]), html.escape(r["metric"]), html.escape(r["variant"]), fmt(r["n"]),
            f"{fmt(value)} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt(r["dense_value"]),
            html.escape(interval_text(r)) if r.get("p_value") is not None and r[STRATEGY] != DENSE else "—",
            discordant, html.escape(test), format_p(r["p_value"], _at_floor(r)),
            format_p(r["p_holm"], _at_floor(r)) if r["p_holm"] is not None else "—", html.escape(verdict),
        ])
        classes.append(_row_class(r))
    return table(header, cells, classes, numeric={3, 4, 5, 6, 7, 9, 10})


def headline_list(headline: list[dict[str, Any]]) -> str:
    """One line per task and metric: the dense value and what the paired tests support."""
    if not headline:
        return '<p class="muted">no results</p>'
    return "<ul>\n" + "\n".join(f"<li>{headline_text(h)}</li>" for h in headline) + "\n</ul>"


def headline_text(h: dict[str, Any]) -> str:
    """The stored sentence (``findings.headline_sentence``); older manifests get the counts they recorded."""
    if h.get("text"):
        task, _, rest = h["text"].partition(": ")
        return f"<b>{html.escape(task)}</b>: {html.escape(rest)}"
    dense = "no dense baseline" if h.get("dense") is None else (
        f"dense {fmt(h['dense'])} [{fmt(h['dense_ci'][0])}, {fmt(h['dense_ci'][1])}]")
    drops = f"{h.get('significant_drops_holm', '—')} of {h.get('variants', '—')} variants significantly worse after Holm"
    return f"<b>{html.escape(h['task'])} · {html.escape(h['metric'])}</b>: {dense}; {drops} (recorded by an older prunelab)"


def index_page(runs: list[dict[str, Any]], chart_specs: dict[str, dict[str, Any]]) -> str:
    """One row per study: its latest run (date, model, headline), earlier versions folded away."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for run in runs:  # newest first within a study
        studies.setdefault(run["study"], []).append(run)
    rows = []
    for study, versions in studies.items():
        latest = versions[0]
        report = f'<a href="{html.escape(latest["report"])}">{html.escape(latest["version"])}</a>'
        if len(versions) > 1:
            earlier = "<br>".join(f'<a href="{html.escape(v["report"])}">{html.escape(v["version"])}</a>'
                                  for v in versions[1:])
            report += f"<details><summary>{len(versions) - 1} earlier</summary>{earlier}</details>"
        if latest.get("error"):
            summary = html.escape(latest["error"])
        elif latest.get("kind") == "importance":
            summary = html.escape(latest.get("summary") or "layer importance scores")
        else:
            summary = "<br>".join(headline_text(h) for h in latest.get("headline", []))
        rows.append([
            html.escape(study), report, html.escape(latest.get("created") or "—"),
            html.escape(str(latest.get("model") or "—")),
            html.escape(", ".join(latest.get("strategies", []))) or html.escape(latest.get("kind") or "—"),
            summary,
        ])
    listing = table(["study", "latest run (report)", "date (UTC)", "model", "strategies", "headline"], rows) \
        if rows else '<p class="muted">no runs yet</p>'
    charts = "".join(f"<h2>Dense baseline across runs</h2>\n{chart_div(f'chart-{name}')}" for name in chart_specs)
    body = f"<h1>prunelab artifacts</h1>\n{listing}\n{charts}"
    return page("prunelab artifacts", body, {f"chart-{name}": spec for name, spec in chart_specs.items()})


def _run_facts(manifest: dict[str, Any]) -> str:
    facts = [
        ("model", manifest.get("model")), ("model hash", manifest.get("model_hash")),
        ("created (UTC)", manifest.get("created")), ("git commit", manifest.get("git_commit")),
        ("config hash", manifest.get("config_hash")), ("device", manifest.get("device")),
        ("container image", manifest.get("container_image")),
        ("base image", manifest.get("base_image_id") or manifest.get("base_image")),
    ]
    rows = [[html.escape(k), html.escape(str(v)) if v is not None else "—"] for k, v in facts]
    for key in ("timings", "packages"):
        if manifest.get(key):
            rows.append([key, f"<details><summary>show</summary><pre>{html.escape(json.dumps(manifest[key], indent=2))}"
                              "</pre></details>"])
    return table(["", ""], rows)


def _links(paths: list[str]) -> str:
    return " · ".join(f'<a href="{html.escape(href(*p.split("/")))}">{html.escape(p)}</a>' for p in paths)
