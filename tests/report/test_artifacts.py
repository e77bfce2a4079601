"""The artifacts folder from a synthetic per-item table (no model): files, round-trips, pages, browser."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import polars as pl
import pytest

from prunelab.errors import PrunelabError
from prunelab.model.bench import bench_rows
from prunelab.records import json_digest
from prunelab.report import artifacts, charts
from prunelab.report.stats import summarize

NOW = datetime(2026, 11, 28, 14, 30, 0, tzinfo=UTC)
LIBRARY_DEFINITION = "window.vegaEmbed="  # occurs once in vl-convert's bundle


def synthetic_items(seed: int = 0, questions: int = 30, windows: int = 8) -> pl.DataFrame:
    """Dense, a 3-layer sweep, magnitude at 3 sparsities x 2 orders and a 2:4 Wanda, on 4 metrics."""
    rng = random.Random(seed)
    variants = [("dense", "dense", {}, 0.0)]
    variants += [(f"drop-layers[layers={i}]", "drop-layers", {"layers": i}, 0.1 * i) for i in range(3)]
    variants += [(f"magnitude[sparsity={s},order={o}]", "magnitude", {"sparsity": s, "order": o},
                  s / 100 * (0.3 if o == "smallest" else 1.0)) for o in ("smallest", "largest") for s in (20, 50, 80)]
    variants.append(("wanda[pattern=2:4]", "wanda", {"pattern": "2:4"}, 0.1))
    rows = []
    for name, strategy, params, harm in variants:
        common = {"variant": name, "strategy": strategy, "params": json.dumps(params)}
        for task, metric in (("mmlu", "acc"), ("gsm8k", "exact_match_strict"), ("gsm8k", "exact_match_flexible")):
            rows += [{**common, "task": task, "metric": metric, "item_id": f"{task}/{i}",
                      "correct": rng.random() < 0.6 * (1 - harm), "nll_sum": None, "tokens": None}
                     for i in range(questions)]
        rows += [{**common, "task": "wikitext", "metric": "perplexity", "item_id": f"window/{i}", "correct": None,
                  "nll_sum": 64 * (2.3 + 0.2 * rng.random() + 3 * harm), "tokens": 64} for i in range(windows)]
    return pl.DataFrame(rows, infer_schema_length=None)


def synthetic_bench(items: pl.DataFrame) -> pl.DataFrame:
    """Made-up measurements per variant: layer removal gets faster, weight pruning does not."""
    measured = []
    for variant, strategy, params in items.select("variant", "strategy", "params").unique(maintain_order=True).rows():
        layers = 3 if strategy == "drop-layers" else 4
        result = {"parameters": 1000 * layers, "decoder_layers": layers, "peak_memory_bytes": 2**20,
                  "prefill": [{"prompt_length": 64, "tokens_per_s": 100.0 * 4 / layers}],
                  "decode": [{"batch": 1, "tokens_per_s": 10.0 * 4 / layers}]}
        measured.append((variant, strategy, params, result))
    return bench_rows(measured)


MANIFEST = {
    "config": {"model": "tiny", "tasks": ["mmlu", "gsm8k", "wikitext"]},
    "study_file": '[study]\nname = "synthetic"  # <b>not html</b>\n',
    "model": "tiny-random", "model_hash": "sha256:0123", "device": "cpu",
    "timings": {"total_s": 12.5}, "container_image": None,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of one study under one root: (root, first run folder, second run folder, items)."""
    root = tmp_path_factory.mktemp("artifacts")
    items = synthetic_items()
    first = artifacts.write_run(root, "synthetic", items, MANIFEST, now=NOW, commit="abc1234def",
                                bench=synthetic_bench(items))
    later = NOW.replace(hour=15)
    dense_only = synthetic_items(seed=1).filter(pl.col("strategy") == "dense")  # a run without charts
    second = artifacts.write_run(root, "synthetic", dense_only,
                                 {**MANIFEST, "config": {"model": "tiny", "seed": 1}}, now=later, commit="abc1234")
    return root, first, second, items


def test_version_names_time_commit_and_config_hash(runs):
    root, first, second, _ = runs
    digest = json_digest(MANIFEST["config"])
    assert first.name == f"20261128T143000Z-abc1234-{digest[:8]}"
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-z]{5,7}-[0-9a-f]{8}", second.name)
    assert artifacts.version_id("f" * 64, None, NOW) == "20261128T143000Z-nogit-ffffffff"
    assert json_digest({"b": 1, "a": [1, 2]}) == json_digest({"a": [1, 2], "b": 1})
    assert not list(first.parent.glob(".*")), "no staging folder left behind"


def test_run_folder_has_every_file(runs):
    _, first, _, _ = runs
    expected = ["items.parquet", "items.csv", "summary.parquet", "summary.csv", "manifest.json", "report.html"]
    expected += [f"charts/{name}.{ext}" for name in ("layer_sweep", "sparsity_sweep", "dense_vs_pruned")
                 for ext in ("html", "png", "svg")]
    for name in expected:
        assert (first / name).is_file() and (first / name).stat().st_size > 0, name
    assert (first / "charts/layer_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (first / "charts/layer_sweep.svg").read_text()[:500]


def test_tables_round_trip_through_parquet_and_csv(runs):
    _, first, _, items = runs
    summary = summarize(items)
    for name, frame in (("items", items), ("summary", summary)):
        assert pl.read_parquet(first / f"{name}.parquet").equals(frame), name
        from_csv = pl.read_csv(first / f"{name}.csv", schema=frame.schema)
        assert from_csv.equals(frame), name


def test_manifest_records_the_run(runs):
    _, first, _, _ = runs
    manifest = json.loads((first / "manifest.json").read_text())
    for key in ("study_file", "model", "model_hash", "device", "timings"):
        assert manifest[key] == MANIFEST[key]
    assert manifest["config_hash"] == json_digest(MANIFEST["config"])
    assert (manifest["study"], manifest["version"], manifest["created"]) == \
        ("synthetic", first.name, "2026-11-28T14:30:00Z")
    assert manifest["git_commit"] == "abc1234def"
    assert {"polars", "altair", "vl-convert-python", "torch"} <= set(manifest["packages"])
    assert manifest["strategies"] == ["dense", "drop-layers", "magnitude", "wanda"]
    assert manifest["tasks"] == ["mmlu", "gsm8k", "wikitext"]
    mmlu = manifest["headline"][0]
    dense = pl.read_parquet(first / "summary.parquet").filter(task="mmlu", strategy="dense").row(0, named=True)
    assert (mmlu["task"], mmlu["dense"], mmlu["variants"]) == ("mmlu", dense["accuracy"], 10)
    summary = pl.read_parquet(first / "summary.parquet").filter(task="mmlu")
    assert mmlu["significant_drops"] == summary.filter(verdict="worse").height
    assert mmlu["text"].startswith("mmlu · acc: dense")
    assert {"gguf", "scipy"} <= set(manifest["packages"])
    assert {"cpu", "cpu_count", "torch_threads"} <= set(manifest["machine"])
    stats = manifest["statistics"]
    assert stats["alpha"] == 0.05 and stats["power"] == 0.8 and "unclipped" in stats["intervals"]["accuracy"]
    wikitext = next(t for t in stats["tests"] if t["task"] == "wikitext")
    assert wikitext["tests"] == ["exact sign test"] and wikitext["n_paired"] == [8]
    for name, digest in manifest["files"].items():
        assert artifacts._sha256(first / name) == digest, name


def test_container_image_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.CONTAINER_IMAGE_ENV, "prunelab@sha256:feed")
    items = synthetic_items(questions=3, windows=2).filter(pl.col("strategy") == "dense")
    run = artifacts.write_run(tmp_path, "env", items, {"config_hash": "f" * 64}, now=NOW, commit="0000000")
    assert json.loads((run / "manifest.json").read_text())["container_image"] == "prunelab@sha256:feed"


def test_finished_runs_are_never_overwritten_and_names_are_checked(runs):
    root, _, _, items = runs
    with pytest.raises(PrunelabError, match="already exists"):
        artifacts.write_run(root, "synthetic", items, MANIFEST, now=NOW, commit="abc1234")
    with pytest.raises(PrunelabError, match="not a plain folder name"):
        artifacts.write_run(root, "../escape", items, MANIFEST, now=NOW, commit="abc1234")
    with pytest.raises(PrunelabError, match="config_hash"):
        artifacts.write_run(root, "synthetic", items, {"model": "x"}, now=NOW, commit="abc1234")


def html_pages(root: Path, run: Path) -> list[Path]:
    return [run / "report.html", root / "index.html", *sorted((run / "charts").glob("*.html"))]


def test_every_page_inlines_the_vega_libraries_exactly_once(runs):
    root, first, second, _ = runs
    for page in html_pages(root, first):
        text = page.read_text()
        assert text.count(LIBRARY_DEFINITION) == 1, page
        assert text.count('id="prunelab-vega-libraries"') == 1, page
        assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"?https?:", text), f"{page} loads from the network"
    report = (first / "report.html").read_text()
    assert len(report) < 1.5 * len(first.joinpath("charts/layer_sweep.html").read_text())
    assert report.count('class="chart"') == 4  # layer sweep, sparsity, dense vs pruned, quality vs speed
    assert "no chart has data" in (second.joinpath("report.html").read_text())
    assert "&lt;b&gt;not html&lt;/b&gt;" in report  # the study file is shown, not interpreted


def test_index_lists_every_version_with_links_and_survives_a_broken_manifest(runs):
    root, first, second, _ = runs
    index = (root / "index.html").read_text()
    for run in (first, second):
        link = f'href="./synthetic/{quote(run.name, safe="")}/report.html"'
        assert link in index
    assert index.index(second.name) < index.index(first.name), "newest version first"
    assert "tiny-random" in index and index.count("<td>synthetic</td>") == 1, "one row per study"
    assert "1 earlier" in index
    broken = root / "other" / "20260101T000000Z-nogit-00000000"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text("{not json")
    try:
        artifacts.build_index(root)
        index = (root / "index.html").read_text()
        assert "unreadable manifest.json" in index and first.name in index
    finally:
        shutil.rmtree(broken.parent)
        artifacts.build_index(root)


def test_charts_derive_from_the_stored_summary_alone(runs):
    _, first, _, items = runs
    stored = pl.read_csv(first / "summary.csv", schema=summarize(items).schema)
    bench = pl.read_parquet(first / "bench.parquet")
    specs = {name: chart.to_dict() for name, chart in charts.build_charts(stored, bench=bench).items()}
    assert "quality_vs_speed" in specs
    speedups = {r["variant"]: r["decode_speedup"] for r in inline_values(specs["quality_vs_speed"])}
    assert speedups["dense"] == 1.0 and speedups["drop-layers[layers=1]"] == pytest.approx(4 / 3)
    report = (first / "report.html").read_text()
    embedded = json.loads(re.search(r'id="prunelab-chart-specs">(.*?)</script>', report, re.S).group(1))
    assert embedded == {f"chart-{name}": spec for name, spec in specs.items()}


def test_chart_parameters_from_params():
    assert charts.removed_layer("magnitude", {"layers": 3}) is None  # only a depth strategy says what it removes
    assert [charts.removed_layer("drop-layers", p) for p in ({"layers": 3}, {"layers": [4]}, {"layers": "5"},
                                              {"layers": [1, 2]}, {"layers": "1,2"}, {})] == [3, 4, 5, None, None, None]
    assert [charts.sparsity_percent(p) for p in ({"sparsity": 50}, {"sparsity": 0.3}, {"pattern": "2:4"},
                                                 {"pattern": "4:8"}, {"layers": 1})] == [50, 30, 50, 50, None]
    assert charts.series_label("magnitude", {"sparsity": 50, "order": "largest"}) == "magnitude order=largest"


def test_series_labels_name_only_the_settings_that_vary():
    def row(variant, strategy, params):
        return {"variant": variant, "strategy": strategy, "params": json.dumps(params), "task": "mmlu",
                "metric": "acc", "item_id": "q0", "correct": True, "nll_sum": None, "tokens": None}
    defaults = {"scope": "layer", "include_norms": False}
    items = pl.DataFrame([
        row("dense", "dense", {}),
        *(row(f"m{s}{o}", "magnitude", {**defaults, "sparsity": s, "order": o})
          for s in (10.0, 50.0) for o in ("smallest", "largest")),
        row("w", "wanda", {**defaults, "sparsity": 50.0, "pattern": "unstructured"}),
    ], infer_schema_length=None)
    series = {r["variant"]: r["series"] for r in charts.chart_rows(summarize(items))}
    assert series["m10.0smallest"] == series["m50.0smallest"] == "magnitude order=smallest"
    assert series["m50.0largest"] == "magnitude order=largest"
    assert series["w"] == "wanda"


def inline_values(spec) -> list[dict]:
    """Every data row embedded anywhere in a Vega-Lite spec."""
    if isinstance(spec, dict):
        found = list(spec["values"]) if isinstance(spec.get("values"), list) else []
        return found + [row for key, value in spec.items() if key != "values" for row in inline_values(value)]
    if isinstance(spec, list):
        return [row for value in spec for row in inline_values(value)]
    return []


def test_layer_sweep_plots_one_point_per_layer_and_task(runs):
    _, first, _, _ = runs
    rows = charts.chart_rows(pl.read_parquet(first / "summary.parquet"))
    spec = charts.layer_sweep_chart(rows).to_dict()
    points = [r for r in inline_values(spec) if r.get("strategy") == "drop-layers"]
    assert sorted((p["layer"], p["panel"]) for p in points) == sorted(
        (layer, panel) for layer in range(3)
        for panel in ("mmlu · acc", "gsm8k · exact_match_strict", "gsm8k · exact_match_flexible",
                      "wikitext · perplexity"))
    for p in points:  # on relative change vs dense, in percent
        assert p["change"] == pytest.approx(100 * p["rel_change"])


def test_an_extreme_layer_is_clipped_and_labelled_not_setting_the_axis():
    """Layer 0 at x100000 perplexity must not squeeze layers 1-23 (+2..+30%) into a strip."""
    rows = [{"variant": f"drop-layers[layers={i}]", "strategy": "drop-layers", "layer": i, "panel": "wikitext · perplexity",
             "kind": "perplexity", "p_value": 0.01, "rel_change": 1e5 if i == 0 else 0.02 + 0.01 * (i % 10),
             "rel_ci_low": 9e4 if i == 0 else 0.01 * (i % 10), "rel_ci_high": 2e5 if i == 0 else 0.04 + 0.01 * (i % 10),
             "diff_vs_dense": 1.0, "diff_ci_low": None, "diff_ci_high": None}
            for i in range(24)]
    shown, title, domain = charts.relative_points(rows)
    assert title == "change vs dense (%)"
    assert domain[1] < 100, "the axis spans the ordinary layers, in percent"
    layer0 = shown[0]
    assert layer0["clipped"] and layer0["shown"] == domain[1] and layer0["note"] == "layer 0 ×1e+05"
    assert not any(p["clipped"] for p in shown[1:])
    spec = charts.layer_sweep_chart(rows).to_dict()
    assert spec["concat"][0]["title"]["subtitle"] == ["off scale, drawn at the edge: layer 0 ×1e+05"]


# --- the way a user browses it: headless Chromium --------------------------------------------------

def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after scripts ran (virtual time lets vegaEmbed's promises settle) and console lines."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=30000", "--dump-dom", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return done.stdout, console


@pytest.mark.needs("chromium")
def test_pages_render_their_charts_in_headless_chromium(runs, tmp_path):
    root, first, _, _ = runs
    for page in html_pages(root, first)[:3]:  # report, index, one chart page
        dom, console = render(page, tmp_path / page.stem)
        expected = len(re.findall(r'<div class="chart" id=', page.read_text()))
        assert expected >= 1, page
        assert f'data-charts-rendered="{expected}"' in dom, f"{page.name}: charts did not all render"
        assert 'data-charts-failed="0"' in dom, page
        assert dom.count('class="marks"') >= expected, f"{page.name}: no chart SVG in the DOM"
        assert console == [], f"{page.name} logged to the console: {console}"


@pytest.mark.needs("chromium")
def test_answer_letters_chart_renders_without_a_vega_warning(tmp_path):
    """The MMLU letter chart (absent from the synthetic runs): Vega-Lite logs a warning for a
    nominal ``order`` channel, which the container smoke test's report showed."""
    from prunelab.report.pages import chart_page

    letters = [{"task": "mmlu", "metric": "acc", "variant": v, "n": 4, "A": a, "B": 4 - a, "C": 0, "D": 0}
               for v, a in (("gold", 1), ("dense", 3))]
    page = tmp_path / "letters.html"
    page.write_text(chart_page("letters", charts.answer_letters_chart(letters).to_dict()))
    dom, console = render(page, tmp_path / "profile")
    assert 'data-charts-rendered="1"' in dom and 'data-charts-failed="0"' in dom
    assert console == [], console


def test_removal_plans_chart_has_one_line_per_plan_over_k():
    def rows(variant, strategy, params, correct):
        return [{"variant": variant, "strategy": strategy, "params": json.dumps(params), "task": "mmlu",
                 "metric": "acc", "item_id": f"q{i}", "correct": i < correct, "nll_sum": None, "tokens": None}
                for i in range(10)]
    plans = [("drop-least-important", {"metric": m}) for m in ("bi", "angular")] + [("drop-block", {})]
    items = pl.DataFrame(rows("dense", "dense", {}, 8) + [
        row for strategy, extra in plans for k in (1, 2, 3)
        for row in rows(f"{strategy}{extra}[k={k}]", strategy, {**extra, "k": k}, 8 - k)
    ], infer_schema_length=None)
    summary = summarize(items)
    spec = charts.build_charts(summary)["removal_plans"].to_dict()
    points = [r for r in inline_values(spec) if r["strategy"] != "dense"]
    assert sorted((p["series"], p["layers_removed"], p["value"]) for p in points) == sorted(
        (label, k, (8 - k) / 10) for label in ("drop-least-important metric=bi", "drop-least-important metric=angular",
                                               "drop-block") for k in (1, 2, 3))
    assert {r["value"] for r in inline_values(spec) if r["strategy"] == "dense"} == {0.8}
    assert "layer_sweep" not in charts.build_charts(summary)  # K-layer plans are not a single-layer sweep


def test_a_third_party_mean_metric_flows_from_records_to_the_report(tmp_path):
    """An evaluator declaring a float per item ("mean") gets the same paired test, table and findings."""
    from prunelab.plugin import MetricSpec, TaskResult
    from prunelab.runner.chunks import item_rows
    from prunelab.runner.variants import Variant

    specs = (MetricSpec("acc", "accuracy", "correct"),
             MetricSpec("surprise", "mean", "surprise", higher_is_better=False, label="mean surprise"))
    frames = []
    for name, strategy, shift in (("dense", "dense", 0.0), ("noisy[k=1]", "noisy", 0.5), ("same[k=2]", "same", 0.0)):
        records = [{"item_id": f"q{i}", "correct": i % 3 != 0, "surprise": 1.0 + 0.1 * (i % 4) + shift + 0.01 * (i % 2)}
                   for i in range(12)]
        frames.append(item_rows(Variant(name, strategy, {"k": 1} if strategy != "dense" else {}), "fake",
                                TaskResult("fake", {"n": 12}, records), specs))
    items = pl.concat(frames, how="diagonal_relaxed")
    assert items.schema["value"] == pl.Float64
    assert "surprise" not in items.columns  # the declared field became the metric's `value`
    metrics = [{"task": "fake", "name": m.name, "kind": m.kind, "field": m.field,
                "higher_is_better": m.higher_is_better, "label": m.label} for m in specs]
    run = artifacts.write_run(tmp_path, "third-party", items, {"config": {"x": 1}, "metrics": metrics},
                              now=NOW, commit="abc1234+dirty")
    assert run.name.startswith("20261128T143000Z-abc1234+dirty-"), "the version name keeps +dirty"
    summary = pl.read_parquet(run / "summary.parquet").filter(metric="surprise")
    noisy = summary.filter(variant="noisy[k=1]").row(0, named=True)
    assert (noisy["kind"], noisy["verdict"], noisy["test"]) == ("mean", "worse", "exact sign test")
    assert noisy["p_value"] == pytest.approx(2 / 4096)
    assert summary.filter(variant="same[k=2]")["verdict"][0] == "no detectable change"
    report = (run / "report.html").read_text()
    assert "fake · mean surprise" in report and "Findings" in report
    assert "< 0.001" in report  # 2/4096 printed at the display floor


# ---------------------------------------------------------------------- an untrusted run folder (issue 27 part 2)
def shared_copy(runs, tmp_path, study: str = "synthetic") -> tuple[Path, Path]:
    """A copy of the first run under a fresh artifacts root, as a user who received it would have it."""
    first = runs[1]
    root = tmp_path / "shared"
    folder = root / study / first.name
    shutil.copytree(first, folder)
    return root, folder


def test_report_deletes_only_its_own_chart_files_whatever_the_manifest_lists(runs, tmp_path):
    root, folder = shared_copy(runs, tmp_path)
    victims = [tmp_path / "victim.txt", root / "victim.txt", folder.parent / "victim.txt", folder / "notes.txt"]
    for victim in victims:
        victim.write_text("precious")
    (folder / "charts" / "link.png").symlink_to(victims[0])
    manifest = json.loads((folder / "manifest.json").read_text())
    listed = ["../victim.txt", "charts/../../victim.txt", "charts/../../../victim.txt", "charts/../notes.txt",
              str(victims[0]), "charts/link.png", "charts/x.png/../../notes.txt"]
    manifest["files"].update(dict.fromkeys(listed, "0" * 64))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    told: list[str] = []
    artifacts.rebuild_run(folder, tell=told.append)
    assert all(v.read_text() == "precious" for v in victims), "a file outside prunelab's charts was touched"
    assert (folder / "charts" / "link.png").is_symlink(), "a link prunelab did not write was removed"
    assert any("kept 5 file(s)" in line for line in told), told  # the five under charts/; the rest are never candidates
    # a run folder outside an artifacts root: nothing is written beside it (no index there to rebuild)
    assert sorted(p.name for p in root.iterdir()) == ["synthetic", "victim.txt"]
    assert any(line.startswith(f"index not rebuilt: {root} has no prunelab index") for line in told), told


def test_report_replaces_links_planted_in_the_run_folder_instead_of_writing_through_them(runs, tmp_path):
    root, folder = shared_copy(runs, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("summary.csv", "report.html", ".manifest.json.tmp", ".report.html.tmp", "charts/layer_sweep.svg"):
        target = folder / name
        target.unlink(missing_ok=True)
        target.symlink_to(victim)
    (folder / "manifest.json").rename(folder / "manifest.real")
    (folder / "manifest.json").write_text((folder / "manifest.real").read_text())
    artifacts.rebuild_run(folder)
    assert victim.read_text() == "precious"
    for name in ("summary.csv", "report.html", "charts/layer_sweep.svg"):
        assert not (folder / name).is_symlink() and (folder / name).stat().st_size > 0, name


def test_a_charts_folder_that_is_a_link_is_refused(runs, tmp_path):
    root, folder = shared_copy(runs, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder / "charts", elsewhere)
    (folder / "charts").symlink_to(elsewhere)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir())
    with pytest.raises(PrunelabError, match="charts: is a symbolic link"):
        artifacts.rebuild_run(folder)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir()) == before


def test_index_links_are_escaped_relative_paths_never_a_scheme(runs, tmp_path):
    root, _ = shared_copy(runs, tmp_path, study="javascript:alert(1)")
    shared_copy(runs, tmp_path / "x", study="a b?c#d")
    shutil.copytree(tmp_path / "x" / "shared" / "a b?c#d", root / "a b?c#d")
    index = artifacts.build_index(root).read_text()
    links = re.findall(r'<a href="([^"]*)"', index)
    assert links and all(link.startswith("./") for link in links), links
    assert f'href="./javascript%3Aalert%281%29/{quote(runs[1].name, safe="")}/report.html"' in index
    assert f'href="./a%20b%3Fc%23d/{quote(runs[1].name, safe="")}/report.html"' in index


def test_runs_reached_through_a_link_are_not_indexed(runs, tmp_path):
    root, _ = shared_copy(runs, tmp_path)
    outside = tmp_path / "outside"
    shutil.copytree(root / "synthetic", outside / "other")
    (root / "other").symlink_to(outside / "other")
    index = artifacts.build_index(root).read_text()
    assert "<td>synthetic</td>" in index and "<td>other</td>" not in index


def test_an_index_html_prunelab_did_not_write_is_kept_and_the_user_told(runs, tmp_path):
    root, _ = shared_copy(runs, tmp_path)
    mine = "<!DOCTYPE html><html><body>my own page</body></html>\n"
    (root / "index.html").write_text(mine)
    told: list[str] = []
    written = artifacts.build_index(root, tell=told.append)
    assert (root / "index.html").read_text() == mine
    assert written == root / artifacts.OWN_INDEX and "synthetic" in written.read_text()
    assert told and "kept" in told[0] and str(written) in told[0]
    (root / "index.html").unlink()  # prunelab's own index is rewritten in place, as always
    assert artifacts.build_index(root) == root / "index.html"
    assert artifacts.build_index(root) == root / "index.html", "prunelab's index is recognised as its own"
