"""The equal-size comparison: bins of parameter count, the best method per bin, its paired test."""

from __future__ import annotations

import json
from html import escape

import polars as pl
import pytest
from scipy import stats as sps

from prunelab.report import pages
from prunelab.report.charts import build_charts
from prunelab.report.equalsize import BEST, NOT_DISTINGUISHED, equal_size_table, size_bin
from prunelab.report.sizes import AxisAmount, VariantSize
from prunelab.report.stats import summarize

N = 40
DENSE_PARAMS = 1000


def accuracy_rows(variant: str, strategy: str, params: dict, wrong: set[int]) -> list[dict]:
    return [{"variant": variant, "strategy": strategy, "params": json.dumps(params), "task": "mmlu", "metric": "acc",
             "item_id": f"q{i:02d}", "correct": i not in wrong, "nll_sum": None, "tokens": None} for i in range(N)]


def layers(k: int) -> tuple[AxisAmount, ...]:
    return (AxisAmount("layers", "k", "layers removed", k),)


def width(cut: float) -> tuple[AxisAmount, ...]:
    return (AxisAmount("width", "mlp", "MLP channels", cut),)


# (variant, strategy, params, items answered wrong, parameters, zeros, axes)
VARIANTS = [
    ("dense", "dense", {}, set(range(0, 4)), DENSE_PARAMS, 10, ()),
    # bin 2 (85-90 % kept): width beats depth on 10 items and loses none; magnitude (zeros in dense
    # tensors) is better than both but a reference: shown beside the ranking, never ranked
    ("drop-block[k=1]", "drop-block", {"k": 1}, set(range(0, 20)), 880, 10, layers(1)),
    ("width[mlp=0.2]", "width", {"mlp": 0.2}, set(range(0, 10)), 870, 10, width(0.2)),
    ("magnitude[sparsity=20]", "magnitude", {"sparsity": 20}, set(range(0, 6)), DENSE_PARAMS, 130,
     (AxisAmount("weights", "sparsity", "sparsity", 0.2),)),  # 120 zeros added: placed at 880
    # bin 4 (75-80 % kept): depth 1 item ahead of width (not distinguishable); width's larger variant
    # in the same bin is not its representative (the smaller one is)
    ("drop-block[k=2]", "drop-block", {"k": 2}, set(range(0, 29)), 780, 10, layers(2)),
    ("width[mlp=0.35]", "width", {"mlp": 0.35}, set(range(0, 20)), 790, 10, width(0.35)),
    ("width[mlp=0.4]", "width", {"mlp": 0.4}, set(range(0, 30)), 760, 10, width(0.4)),
]


@pytest.fixture(scope="module")
def data():
    items = pl.DataFrame([r for v, s, p, wrong, *_ in VARIANTS for r in accuracy_rows(v, s, p, wrong)],
                         infer_schema_length=None)
    sizes = {v: VariantSize(removed_layers=(), parameters=params, non_embedding_parameters=params - 100,
                            zero_parameters=zeros, axes=axes) for v, _, _, _, params, zeros, axes in VARIANTS}
    return items, summarize(items), sizes


def test_bins_are_shares_of_dense_parameters():
    assert [size_bin(k) for k in (100, 95.01, 95, 90.5, 88, 85, 76)] == [0, 0, 1, 1, 2, 3, 4]


def test_best_per_bin_against_the_runner_up_with_mcnemar_and_holm(data):
    items, summary, sizes = data
    table = equal_size_table(items, summary, sizes).to_dicts()
    assert [(r["kept_low"], r["kept_high"]) for r in table] == [(85.0, 90.0), (75.0, 80.0)]
    first, second = table
    assert (first["best_variant"], first["runner_variant"], first["methods"]) == ("width[mlp=0.2]", "drop-block[k=1]", 2)
    assert first["others"] == ""
    assert (first["reference_variant"], first["reference_method"]) == (
        "magnitude[sparsity=20]", "magnitude (non-zero weights, reference)")
    assert first["reference_kept"] == pytest.approx(88.0) and first["reference_value"] == pytest.approx(1 - 6 / N)
    assert second["reference_variant"] is None  # no weight pruning in bin 4
    assert first["best_parameters"] == 870 and first["best_kept"] == pytest.approx(87.0)
    # best - runner-up on the same 40 items: width wrong on 10, depth on 20 -> +10 items, none lost
    assert first["diff"] == pytest.approx(10 / N) and first["n_paired"] == N
    p_first = sps.binomtest(0, 10, 0.5).pvalue  # exact McNemar: 10 discordant pairs, all one way
    assert first["p_value"] == pytest.approx(p_first) and first["test"] == "exact McNemar"
    # bin 4: width's representative is its smaller variant (760), 1 item behind depth's 780
    assert (second["best_variant"], second["runner_variant"]) == ("drop-block[k=2]", "width[mlp=0.4]")
    p_second = sps.binomtest(0, 1, 0.5).pvalue
    assert second["p_value"] == pytest.approx(p_second)
    holm = sorted([p_first, p_second])
    assert first["p_holm"] == pytest.approx(min(1, 2 * holm[0])) and second["p_holm"] == pytest.approx(1.0)
    assert first["verdict"] == BEST and second["verdict"] == NOT_DISTINGUISHED


def test_the_report_states_the_definition_and_each_bins_best(data):
    items, summary, sizes = data
    html = pages.equal_size_html(equal_size_table(items, summary, sizes).to_dicts())
    assert "5 percentage points of dense's parameter count" in html and "85–90%" in html
    assert "width[mlp=0.2]" in html and escape(BEST) in html
    assert "reference (zeros in dense tensors)" in html and "88.0% non-zero" in html


def test_size_comparison_chart_one_line_per_method(data):
    _, summary, sizes = data
    from tests.report.test_artifacts import inline_values

    points = [r for r in inline_values(build_charts(summary, sizes=sizes)["size_comparison"].to_dict())
              if r.get("method") and r["strategy"] != "dense"]
    assert {r["method"] for r in points} == {"drop-block", "width", "magnitude (non-zero weights, reference)"}
    kept = {r["variant"]: r["kept"] for r in points}
    assert kept["magnitude[sparsity=20]"] == 88.0 and kept["width[mlp=0.4]"] == 76.0
