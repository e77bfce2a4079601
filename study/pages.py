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
from functools import lru_cache
from typing import Any

import altair as alt
import vl_convert as vlc

LIBRARIES_ID = "prunelab-vega-libraries"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.drop td { background: #fdecea; }
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


def page(title: str, body: str, charts: dict[str, dict[str, Any]] | None = None) -> str:
    """A complete HTML document; ``charts`` maps the id of a ``chart_div`` in ``body`` to its spec."""
    head = f'<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n'
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
    "Accuracy: 95% Wilson score interval. Vs dense: exact McNemar test on the items both evaluated "
    "(lost = dense right and variant wrong, gained = the reverse). Perplexity: exp(sum NLL / sum tokens) "
    "over windows, 95% bootstrap interval and a paired bootstrap test over the same windows. "
    "p (Holm): adjusted for the number of variants compared on the task and metric. "
    "Rows marked red are significant drops (p &lt; 0.05 and worse than dense)."
)


def report_page(manifest: dict[str, Any], summary_rows: list[dict[str, Any]], chart_specs: dict[str, dict[str, Any]],
                files: list[str], bench_rows: list[dict[str, Any]] | None = None) -> str:
    """The page of one run: what ran, the charts, the full summary with CIs and tests, the files."""
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
        "<h2>Charts</h2>", charts_html or '<p class="muted">no chart has data in this run</p>',
        "<h2>Summary</h2>", f'<p class="muted">{METHODS_NOTE}</p>', summary_table(summary_rows),
        *(["<h2>Size and speed</h2>", bench_table(bench_rows)] if bench_rows else []),
        "<h2>Files</h2>", f"<p>{_links(files)}</p>",
        "<h2>Study file</h2>",
        f"<pre>{html.escape(study_file)}</pre>" if study_file else '<p class="muted">not recorded</p>',
    ])
    return page(title, body, {f"chart-{name}": spec for name, spec in chart_specs.items()})


def bench_table(rows: list[dict[str, Any]]) -> str:
    """Each variant's measured size and speed (``benchmodel.bench_rows``), every column as measured."""
    columns = [c for c in rows[0] if c not in {"strategy", "params"}]
    return table(columns, [[html.escape(str(r[c])) if isinstance(r[c], str) else fmt(r[c]) for c in columns]
                           for r in rows], numeric=set(range(1, len(columns))))


def summary_table(rows: list[dict[str, Any]]) -> str:
    header = ["task", "metric", "variant", "n", "value [95% CI]", "dense (same items)", "diff", "lost / gained",
              "p", "p (Holm)", "significant drop"]
    cells, classes = [], []
    for r in rows:
        value = r["accuracy"] if r["kind"] == "accuracy" else r["perplexity"]
        discordant = "—" if r["lost"] is None else f"{r['lost']} / {r['gained']}"
        cells.append([
            html.escape(r["task"]), html.escape(r["metric"]), html.escape(r["variant"]), fmt(r["n"]),
            f"{fmt(value)} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", fmt(r["dense_value"]),
            fmt(r["diff_vs_dense"], "+.4g"), discordant, fmt(r["p_value"], ".3g"), fmt(r["p_holm"], ".3g"),
            "yes" if r["significant_drop"] else ("no" if r["significant_drop"] is not None else "—"),
        ])
        classes.append("drop" if r["significant_drop"] else "")
    return table(header, cells, classes, numeric={3, 4, 5, 6, 7, 8, 9})


def headline_list(headline: list[dict[str, Any]]) -> str:
    """One line per task and metric: the dense value and how many variants are significantly worse."""
    if not headline:
        return '<p class="muted">no results</p>'
    return "<ul>\n" + "\n".join(f"<li>{headline_text(h)}</li>" for h in headline) + "\n</ul>"


def headline_text(h: dict[str, Any]) -> str:
    dense = "no dense baseline" if h.get("dense") is None else (
        f"dense {fmt(h['dense'])} [{fmt(h['dense_ci'][0])}, {fmt(h['dense_ci'][1])}]")
    drops = (f"{h['significant_drops']} of {h['variants']} variants significantly worse "
             f"({h.get('significant_drops_holm', '—')} after Holm correction)")
    return f"<b>{html.escape(h['task'])} · {html.escape(h['metric'])}</b>: {dense}; {drops}"


def index_page(runs: list[dict[str, Any]], chart_specs: dict[str, dict[str, Any]]) -> str:
    """Every study and version under the artifacts root, newest first within a study."""
    rows = []
    for run in runs:
        report = f'<a href="{html.escape(run["report"])}">{html.escape(run["version"])}</a>'
        rows.append([
            html.escape(run["study"]), report, html.escape(run.get("created") or "—"),
            html.escape(str(run.get("model") or "—")), html.escape(", ".join(run.get("strategies", []))),
            html.escape(", ".join(run.get("tasks", []))),
            html.escape(run["error"]) if run.get("error") else "<br>".join(headline_text(h) for h in run.get("headline", [])),
        ])
    listing = table(["study", "version (report)", "date (UTC)", "model", "strategies", "tasks", "headline"], rows) \
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
    return " · ".join(f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in paths)
