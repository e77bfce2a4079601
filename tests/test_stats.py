"""Statistics against hand-computed and published values (Wilson CI, exact McNemar, summary)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from prunelab.errors import PrunelabError
from prunelab.stats import (
    bootstrap_perplexity_interval,
    holm_adjust,
    mcnemar_exact,
    paired_bootstrap_p_value,
    paired_comparison,
    perplexity,
    summarize,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # textbook values for 0/10, 5/10, 10/10
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (score interval without correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_is_symmetric_and_rejects_bad_counts():
    low, high = wilson_interval(3, 17)
    assert wilson_interval(14, 17) == pytest.approx((1 - high, 1 - low))
    for k, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


@pytest.mark.parametrize(("b", "c", "p"), [
    (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (9, 1, 22 / 1024),
    (0, 6, 2 / 64),
    (0, 5, 2 / 32),
    (2, 1, 1.0),  # 2 * (1 + 3) / 8 is capped at 1
    (5, 5, 1.0),
    (0, 0, 1.0),  # no discordant pairs, no evidence
    (3, 7, 2 * (1 + 10 + 45 + 120) / 1024),
])
def test_mcnemar_exact_hand_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_matches_scipy_binomial_test_on_large_tables():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in ((19, 6), (20, 40), (130, 170), (1000, 1100)):
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c).pvalue, rel=1e-9)


def test_holm_adjustment_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(1 x 0.04, previous) in input order
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0]
    assert holm_adjust([]) == []


def test_paired_comparison_counts_discordant_items():
    dense = [True, True, True, False, False, True]
    other = [False, True, False, True, False, True]
    cmp = paired_comparison(dense, other)
    assert (cmp.n, cmp.lost, cmp.gained) == (6, 2, 1)
    assert cmp.base_accuracy == pytest.approx(4 / 6)
    assert cmp.other_accuracy == pytest.approx(3 / 6)
    assert cmp.difference == pytest.approx(-1 / 6)
    assert cmp.p_value == 1.0
    assert not cmp.significant_drop
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_significant_drop_needs_both_small_p_and_a_lower_accuracy():
    base = [True] * 10 + [False]
    worse = [True] + [False] * 9 + [True]  # lost 9, gained 1
    assert paired_comparison(base, worse).significant_drop
    assert not paired_comparison(worse, base).significant_drop  # same p, but an improvement


def test_perplexity_is_token_weighted():
    assert perplexity([10.0, 30.0], [10, 30]) == pytest.approx(math.e)
    assert perplexity([2.0, 40.0], [2, 20]) == pytest.approx(math.exp(42 / 22))


def test_perplexity_bootstrap_interval_and_paired_test():
    nll = [2.0 * 64, 2.2 * 64, 1.9 * 64, 2.4 * 64, 2.1 * 64]
    tokens = [64] * 5
    low, high = bootstrap_perplexity_interval(nll, tokens)
    assert low < perplexity(nll, tokens) < high
    assert math.exp(1.9) <= low and high <= math.exp(2.4)
    assert paired_bootstrap_p_value(nll, nll, tokens) == 1.0
    worse = [x + 0.1 * 64 for x in nll]  # every window worse: every resample says so
    assert paired_bootstrap_p_value(nll, worse, tokens, samples=1000) == pytest.approx(1 / 1000)


def item_rows(variant, strategy, params, task, metric, correct_by_id):
    return [dict(variant=variant, strategy=strategy, params=json.dumps(params), task=task, metric=metric,
                 item_id=item_id, correct=correct, nll_sum=None, tokens=None)
            for item_id, correct in correct_by_id.items()]


def ppl_rows(variant, strategy, params, nll_by_id):
    return [dict(variant=variant, strategy=strategy, params=json.dumps(params), task="wikitext",
                 metric="perplexity", item_id=item_id, correct=None, nll_sum=nll, tokens=100)
            for item_id, nll in nll_by_id.items()]


def frame(rows):
    return pl.DataFrame(rows, infer_schema_length=None)


def hand_table() -> pl.DataFrame:
    """Dense right on q0..q9 and wrong on q10, q11; the variant right on q0 and q10 only (b=9, c=1),
    listed in another order and with one extra item (q12) that dense has not got."""
    dense = {f"q{i}": i < 10 for i in range(12)}
    variant = {f"q{i}": i in (0, 10) for i in reversed(range(13))}
    return frame(
        item_rows("dense", "dense", {}, "gsm8k", "exact_match_strict", dense)
        + item_rows("magnitude[sparsity=50]", "magnitude", {"sparsity": 50}, "gsm8k", "exact_match_strict", variant)
        + ppl_rows("dense", "dense", {}, {"w0": 200.0, "w1": 220.0, "w2": 210.0})
        + ppl_rows("magnitude[sparsity=50]", "magnitude", {"sparsity": 50}, {"w2": 260.0, "w0": 250.0, "w1": 270.0})
    )


def test_summary_of_a_hand_made_table():
    summary = summarize(hand_table())
    assert summary["variant"].to_list() == ["dense", "magnitude[sparsity=50]"] * 2
    dense, pruned, dense_ppl, pruned_ppl = summary.iter_rows(named=True)

    assert (dense["n"], dense["correct"], dense["accuracy"]) == (12, 10, pytest.approx(10 / 12))
    assert (dense["ci_low"], dense["ci_high"]) == pytest.approx(wilson_interval(10, 12))
    assert (dense["lost"], dense["gained"], dense["p_value"], dense["significant_drop"]) == (0, 0, 1.0, False)

    assert (pruned["n"], pruned["correct"], pruned["n_paired"]) == (13, 2, 12)
    assert pruned["accuracy"] == pytest.approx(2 / 13)
    assert pruned["dense_value"] == pytest.approx(10 / 12)
    assert pruned["diff_vs_dense"] == pytest.approx(2 / 12 - 10 / 12)  # on the 12 shared items
    assert (pruned["lost"], pruned["gained"]) == (9, 1)
    assert pruned["p_value"] == pytest.approx(0.021484375)
    assert pruned["p_holm"] == pytest.approx(0.021484375)  # the only pruned variant of its task
    assert dense["p_holm"] is None
    assert pruned["significant_drop"] is True
    assert pruned["test"] == "exact McNemar"

    assert dense_ppl["kind"] == "perplexity" and dense_ppl["accuracy"] is None
    assert dense_ppl["perplexity"] == pytest.approx(math.exp(630 / 300))
    assert pruned_ppl["perplexity"] == pytest.approx(math.exp(780 / 300))
    assert pruned_ppl["diff_vs_dense"] == pytest.approx(math.exp(780 / 300) - math.exp(630 / 300))
    assert pruned_ppl["ci_low"] <= pruned_ppl["perplexity"] <= pruned_ppl["ci_high"]
    assert pruned_ppl["significant_drop"] is True  # worse on every window
    assert pruned_ppl["test"].startswith("paired bootstrap")


def test_summary_adjusts_p_values_across_the_variants_of_a_task():
    dense = {f"q{i}": i < 10 for i in range(12)}
    worse = {f"q{i}": i in (0, 10) for i in range(12)}  # lost 9, gained 1: p = 22/1024
    better = {f"q{i}": True for i in range(12)}  # lost 0, gained 2: p = 0.5
    other = {f"q{i}": i not in (1, 2, 3, 4, 5, 6) or i == 1 for i in range(12)}  # lost 5, gained 2: p = 0.453125
    items = frame(item_rows("dense", "dense", {}, "mmlu", "acc", dense)
                  + item_rows("a", "magnitude", {"sparsity": 10}, "mmlu", "acc", worse)
                  + item_rows("b", "magnitude", {"sparsity": 20}, "mmlu", "acc", better)
                  + item_rows("c", "magnitude", {"sparsity": 30}, "mmlu", "acc", other))
    summary = summarize(items)
    assert summary["p_value"].to_list() == pytest.approx([1.0, 22 / 1024, 0.5, 0.453125])
    # sorted: 3 x 22/1024, 2 x 0.453125, max(1 x 0.5, 0.90625)
    assert summary["p_holm"].to_list()[1:] == pytest.approx([66 / 1024, 0.90625, 0.90625])
    assert summary["significant_drop"].to_list() == [False, True, False, False]


def test_summary_without_dense_leaves_the_comparison_empty():
    items = frame(item_rows("drop-layers[layers=1]", "drop-layers", {"layers": 1}, "mmlu", "acc",
                            {"a": True, "b": False}))
    row = summarize(items).row(0, named=True)
    assert row["accuracy"] == 0.5 and row["n_paired"] == 0
    assert row["p_value"] is None and row["significant_drop"] is None


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda f: f.drop("item_id"), "lacks columns"),
    (lambda f: pl.concat([f, f.head(1)]), "duplicated items"),
    (lambda f: f.with_columns(pl.when(pl.col("item_id") == "q3").then(None).otherwise(pl.col("correct"))
                              .alias("correct")), "mix"),
    (lambda f: pl.concat([f, f.filter(pl.col("strategy") == "dense").with_columns(pl.lit("dense2").alias("variant"))]),
     "more than one dense"),
])
def test_summary_rejects_inconsistent_tables(mutate, message):
    with pytest.raises(PrunelabError, match=message):
        summarize(mutate(hand_table()))
