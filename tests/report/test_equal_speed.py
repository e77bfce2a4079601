"""The equal-speed comparison: bins of measured speedup, the best method per bin, its paired test.

The reference is computed here from the hand-built items: McNemar's discordant counts and the sign
test's window signs counted in this file, their p-values from ``scipy.stats.binomtest``, Holm by
its definition (sorted p times the number still in the family, made monotone, capped at 1).
"""

from __future__ import annotations

import json
from html import escape

import polars as pl
import pytest
from scipy import stats as sps

from prunelab.model.bench import bench_rows
from prunelab.report import artifacts, pages
from prunelab.report.equalsize import (
    BEST,
    NOT_DISTINGUISHED,
    SPEED_STEP,
    equal_size_table,
    equal_speed_table,
    speed_bin,
)
from prunelab.report.sizes import AxisAmount, VariantSize
from prunelab.report.stats import summarize

N = 40  # accuracy items
WINDOWS = 12  # perplexity windows, 100 tokens each
TOKENS = 100
DENSE_DECODE = 100.0  # dense's decode tokens/s at batch 1
ODD = "wanda[note=<b>&amp;</b>]"  # a variant name the page must escape

# (variant, strategy, params, decode speedup (None: not measured), wrong answers,
#  extra NLL per window over dense, sizes record)
DEPTH, WIDTH = (AxisAmount("layers", "k", "layers removed", 1),), (AxisAmount("width", "mlp", "MLP channels", 0.2),)
WEIGHTS = (AxisAmount("weights", "sparsity", "sparsity", 0.5),)
VARIANTS = [
    ("dense", "dense", {}, 1.0, set(range(4)), [0] * WINDOWS, ()),
    # x1.0 bin (0.95-1.05): weight pruning at dense's speed. magnitude's representative is its faster
    # variant (x1.01, 12 wrong), not the x0.99 one; wanda (x0.98, 6 wrong) is best: 6 items, all one way
    ("magnitude[sparsity=20]", "magnitude", {"sparsity": 20}, 0.99, set(range(8)), [8] * WINDOWS, WEIGHTS),
    ("magnitude[sparsity=50]", "magnitude", {"sparsity": 50}, 1.01, set(range(12)), [12] * WINDOWS, WEIGHTS),
    (ODD, "wanda", {"note": "<b>&amp;</b>"}, 0.98, set(range(6)), [6] * WINDOWS, WEIGHTS),
    # x1.3 bin (1.25-1.35): width's representative is its faster variant (x1.33): 16 wrong, 2 of them
    # items depth gets right; depth (x1.30) 20 wrong, channel (x1.29) third. A one-layer sweep variant (x1.31, 5 wrong) is
    # a diagnosis, not a method; an unmeasured variant has no speed: both are left out
    ("drop-block[k=1]", "drop-block", {"k": 1}, 1.30, set(range(20)), [20] * WINDOWS, DEPTH),
    ("width[mlp=0.2]", "width", {"mlp": 0.2}, 1.27, set(range(10)), [10] * WINDOWS, WIDTH),
    ("width[mlp=0.3]", "width", {"mlp": 0.3}, 1.33, set(range(14)) | {35, 36}, [25] * 3 + [16] * 9, WIDTH),
    ("drop-layers[layers=3]", "drop-layers", {"layers": 3}, 1.31, set(range(5)), [5] * WINDOWS, DEPTH),
    ("slice[frac=0.3]", "slice", {"frac": 0.3}, None, set(range(4)), [1] * WINDOWS, ()),
    ("channel[frac=0.1]", "channel", {"frac": 0.1}, 1.29, set(range(30)), [30] * WINDOWS, ()),  # third
    # x1.5 bin (1.45-1.55): depth (24 wrong) beats width (35 wrong) on 11 items, none lost
    ("drop-block[k=2]", "drop-block", {"k": 2}, 1.52, set(range(24)), [24] * WINDOWS, DEPTH),
    ("width[mlp=0.4]", "width", {"mlp": 0.4}, 1.47, set(range(35)), [35] * WINDOWS, WIDTH),
    # x1.7: width alone -> no row
    ("width[mlp=0.5]", "width", {"mlp": 0.5}, 1.70, set(range(38)), [38] * WINDOWS, WIDTH),
]
BY_NAME = {v[0]: v for v in VARIANTS}


def dense_nll(window: int) -> float:
    return TOKENS * (2.0 + 0.01 * window)


def item_rows(variant: str, strategy: str, params: dict, wrong: set[int], extra: list[float]) -> list[dict]:
    common = {"variant": variant, "strategy": strategy, "params": json.dumps(params)}
    rows = [{**common, "task": "mmlu", "metric": "acc", "item_id": f"q{i:02d}", "correct": i not in wrong,
             "nll_sum": None, "tokens": None} for i in range(N)]
    rows += [{**common, "task": "wikitext", "metric": "perplexity", "item_id": f"w{w:02d}", "correct": None,
              "nll_sum": dense_nll(w) + extra[w], "tokens": TOKENS} for w in range(WINDOWS)]
    return rows


def size_record(variant: str, axes: tuple[AxisAmount, ...]) -> VariantSize:
    sweep = variant.startswith("drop-layers")
    return VariantSize(removed_layers=(3,) if sweep else (), layers_from_options=sweep, parameters=1000,
                       non_embedding_parameters=900, zero_parameters=0, axes=axes)


def measured(prefill_scale: float = 10.0) -> list[tuple]:
    """What ``measure`` would return per measured variant: decode at batches 1 and 8, prefill at 32 and 64."""
    out = []
    for variant, strategy, params, speedup, *_ in VARIANTS:
        if speedup is None:
            continue
        decode = DENSE_DECODE * speedup
        result = {"parameters": 1000, "decoder_layers": 4, "peak_memory_bytes": None,
                  "prefill": [{"prompt_length": 32, "tokens_per_s": 1.0},
                              {"prompt_length": 64, "tokens_per_s": decode * prefill_scale}],
                  "decode": [{"batch": 1, "tokens_per_s": decode}, {"batch": 8, "tokens_per_s": 1.0}]}
        out.append((variant, strategy, json.dumps(params), result))
    return out


@pytest.fixture(scope="module")
def data():
    items = pl.DataFrame([r for v, s, p, _, wrong, extra, _ in VARIANTS for r in item_rows(v, s, p, wrong, extra)],
                         infer_schema_length=None)
    sizes = {v: size_record(v, axes) for v, *_, axes in VARIANTS}
    return items, summarize(items), sizes, bench_rows(measured())


def mcnemar(best: str, runner: str) -> float:
    """Exact McNemar by hand: of the items one of the two gets wrong, how many the best gets wrong."""
    best_wrong, runner_wrong = BY_NAME[best][4], BY_NAME[runner][4]
    return sps.binomtest(len(best_wrong - runner_wrong), len(best_wrong ^ runner_wrong), 0.5).pvalue


def sign(best: str, runner: str) -> float:
    """Exact sign test by hand on the windows' mean NLL per token (best - runner-up; ties dropped)."""
    diffs = [(dense_nll(w) + BY_NAME[best][5][w]) / TOKENS - (dense_nll(w) + BY_NAME[runner][5][w]) / TOKENS
             for w in range(WINDOWS)]
    nonzero = [d for d in diffs if d != 0]
    return sps.binomtest(sum(d > 0 for d in nonzero), len(nonzero), 0.5).pvalue


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment, by its definition."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * len(p), 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted


EXPECTED_PAIRS = [((0.95, 1.05), ODD, "magnitude[sparsity=50]", 2),
                  ((1.25, 1.35), "width[mlp=0.3]", "drop-block[k=1]", 3),
                  ((1.45, 1.55), "drop-block[k=2]", "width[mlp=0.4]", 2)]


def test_speed_bins_are_centred_on_tenths():
    assert SPEED_STEP == 0.1
    assert [speed_bin(s) for s in (0.949, 0.95, 1.0, 1.049, 1.05, 1.15, 1.25, 1.3, 1.349, 1.35)] == \
        [9, 10, 10, 10, 11, 12, 13, 13, 13, 14]


@pytest.mark.parametrize(("task", "reference"), [("mmlu", mcnemar), ("wikitext", sign)])
def test_best_per_speed_bin_against_the_runner_up_with_its_test_and_holm(data, task, reference):
    items, summary, sizes, bench = data
    table = equal_speed_table(items, summary, sizes, bench).filter(pl.col("task") == task).to_dicts()
    got = [((r["speed_low"], r["speed_high"]), r["best_variant"], r["runner_variant"], r["methods"]) for r in table]
    assert got == EXPECTED_PAIRS  # the x1.7 bin (width alone) is omitted; the sweep and unmeasured variants too
    assert {r["speed"] for r in table} == {"decode_speedup"}
    assert {r["speed_label"] for r in table} == {"decode speedup vs dense (batch 1)"}
    p = [reference(best, runner) for _, best, runner, _ in EXPECTED_PAIRS]
    assert [r["p_value"] for r in table] == pytest.approx(p)
    assert [r["p_holm"] for r in table] == pytest.approx(holm(p))
    assert [r["test"] for r in table] == ["exact McNemar" if task == "mmlu" else "exact sign test"] * 3
    assert [r["n_paired"] for r in table] == [N if task == "mmlu" else WINDOWS] * 3
    assert [s for r in table for s in (r["best_speedup"], r["runner_speedup"])] == \
        pytest.approx([0.98, 1.01, 1.33, 1.30, 1.52, 1.47])
    assert [r["others"] for r in table] == ["", "channel (channel[frac=0.1])", ""]
    assert (table[0]["best_method"], table[0]["runner_method"]) == \
        ("wanda (non-zero weights, reference)", "magnitude (non-zero weights, reference)")
    # the reference's p-values, adjusted over the three bins, decide each verdict
    verdicts = [BEST if q < 0.05 else NOT_DISTINGUISHED for q in holm(p)]
    assert [r["verdict"] for r in table] == verdicts
    assert verdicts == ([NOT_DISTINGUISHED, NOT_DISTINGUISHED, BEST] if task == "mmlu"
                        else [BEST, NOT_DISTINGUISHED, BEST])


def test_prefill_is_the_speed_where_no_decode_speedup_was_measured(data):
    items, summary, sizes, _ = data
    bench = bench_rows(measured(prefill_scale=10.0)).drop("decode_speedup")
    table = equal_speed_table(items, summary, sizes, bench).to_dicts()
    assert {(r["speed"], r["speed_label"]) for r in table} == \
        {("prefill_speedup", "prefill speedup vs dense (batch 1, 64-token prompt)")}
    assert [(r["task"], r["best_variant"]) for r in table] == \
        [(task, best) for task in ("mmlu", "wikitext") for _, best, _, _ in EXPECTED_PAIRS]
    assert equal_speed_table(items, summary, sizes, None).is_empty()
    assert equal_speed_table(items, summary, sizes, bench.drop("prefill_speedup")).is_empty()


def test_no_size_record_is_needed_and_the_size_table_is_unchanged(data):
    """An archived run without size records still compares at equal speed (no plugin asked)."""
    items, summary, sizes, bench = data
    blind = equal_speed_table(items, summary, {}, bench)
    assert blind["best_kept"].null_count() == blind.height
    # without size records nothing marks the one-layer sweep variant: it competes in the x1.3 bin
    assert "drop-layers[layers=3]" in blind.filter(pl.col("speed_low") == 1.25)["best_variant"].to_list()
    size_table = equal_size_table(items, summary, sizes, bench)  # one bin: every record keeps dense's count
    assert size_table.height == 2 and all(r["best_decode_speedup"] == pytest.approx(BY_NAME[r["best_variant"]][3])
                                          for r in size_table.to_dicts())


def test_the_page_states_the_speed_and_escapes_every_name(data):
    items, summary, sizes, bench = data
    html = pages.equal_speed_html(equal_speed_table(items, summary, sizes, bench).to_dicts())
    assert "decode speedup vs dense (batch 1)" in html and "×1.3 (1.25–1.35×)" in html and "×1.0 (0.95–1.05×)" in html
    assert "&lt; 0.001" in html and "< 0.001" not in html
    assert "runs at dense's speed" in html and "fastest variant" in html
    assert escape(ODD) in html and ODD not in html and "<b>" not in html
    assert escape(BEST) in html


def test_a_run_folder_writes_the_table_and_report_rebuilds_it(data, tmp_path):
    items, _, sizes, bench = data
    manifest = {"config": {"study": "speed"}, "sizes": {name: size.to_json() for name, size in sizes.items()}}
    folder = artifacts.write_run(tmp_path, "speed", items, manifest, bench=bench, commit="abc1234")
    stored = pl.read_parquet(folder / "equal_speed.parquet")
    assert stored.equals(equal_speed_table(items, summarize(items), sizes, bench))
    assert "equal_speed.csv" in json.loads((folder / "manifest.json").read_text())["files"]
    assert "<h2>At equal speed</h2>" in (folder / "report.html").read_text()
    for name in ("equal_speed.parquet", "equal_speed.csv", "report.html"):
        (folder / name).unlink()
    artifacts.rebuild_run(folder)  # ``prunelab report``: from the stored items, bench and manifest alone
    assert pl.read_parquet(folder / "equal_speed.parquet").equals(stored)
    assert escape(ODD) in (folder / "report.html").read_text()
