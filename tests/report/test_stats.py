"""Statistics against hand-computed, published and scipy values (Wilson CI, exact McNemar, sign test, summary)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from prunelab.errors import PrunelabError
from prunelab.report.stats import (
    SIGN_TEST,
    UNDERPOWERED,
    accuracy_mdd,
    format_p,
    harm_order,
    holm_adjust,
    mcnemar_exact,
    median_interval,
    newcombe_paired_interval,
    paired_comparison,
    pairs_needed,
    perplexity,
    sign_counts,
    sign_test,
    sign_test_min_p,
    summarize,
    tolerance_tests,
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


def test_wilson_interval_matches_scipy_and_vectorises():
    for k, n in ((0, 7), (3, 57), (40, 57), (351, 1404), (1404, 1404)):
        ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)
    low, high = wilson_interval(np.array([0, 5]), np.array([10, 10]))
    assert (low[1], high[1]) == pytest.approx(wilson_interval(5, 10))
    assert mcnemar_exact(np.array([1, 0, 19]), np.array([9, 0, 6])).tolist() == pytest.approx(
        [22 / 1024, 1.0, sps.binomtest(19, 25).pvalue])


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


@pytest.mark.parametrize("n", [2, 5, 8, 12, 24])
def test_sign_test_matches_scipy_binomial_test(n):
    d = np.random.default_rng(n).normal(0.3, 1.0, size=n)
    d[0] = 0.0  # a tie carries no sign and is dropped
    positive, negative = sign_counts(d)
    assert positive + negative == n - 1
    assert sign_test(positive, negative) == pytest.approx(sps.binomtest(int(positive), n - 1).pvalue, rel=1e-12)


def test_sign_test_hand_values():
    assert sign_test(8, 0) == pytest.approx(2 / 256) and sign_test_min_p(8) == 2 / 256
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)  # 2 x (1 + 8) / 2^8
    assert sign_test(*sign_counts(np.zeros(8))) == 1.0  # no difference at all
    assert sign_test(1, 0) == 1.0 and sign_test_min_p(12) == 2 / 4096


def test_median_interval_hand_values():
    """n = 8: [x(1), x(8)] covers 1 - 2/256, [x(2), x(7)] 1 - 2 x 9/256; Hettmansperger-Sheather
    interpolate with I = (g1 - 0.95) / (g1 - g2), lambda = (n - k) I / (k + (n - 2k) I), k = 1."""
    g1, g2 = 1 - 2 / 256, 1 - 2 * 9 / 256
    share = (g1 - 0.95) / (g1 - g2)
    lam = 7 * share / (1 + 6 * share)
    x = np.array([8.0, 1.0, 7.0, 2.0, 6.0, 3.0, 5.0, 4.0])  # 1..8, unsorted
    assert median_interval(x) == pytest.approx((1 + lam, 8 - lam), rel=1e-12)
    # n = 12: [x(3), x(10)] covers 1 - 2 x 79/4096 = 0.961 >= 0.95 and [x(4), x(9)] 1 - 2 x 299/4096 < 0.95
    g3, g4 = 1 - 2 * 79 / 4096, 1 - 2 * 299 / 4096
    share = (g3 - 0.95) / (g3 - g4)
    lam = 9 * share / (3 + 6 * share)
    assert median_interval(np.arange(1.0, 13.0)) == pytest.approx((3 + lam, 10 - lam), rel=1e-12)
    low, high = median_interval(np.vstack([np.arange(1.0, 13.0), 2 * np.arange(1.0, 13.0)]))  # batches
    assert (low[1], high[1]) == pytest.approx((2 * (3 + lam), 2 * (10 - lam)))
    assert median_interval([1.0]) == (None, None) and median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)


def test_tolerance_tests_hand_values():
    harm = np.array([0.001] * 10 + [0.02, 0.5])  # 10 of 12 windows within 0.01
    p_within, p_beyond = tolerance_tests(harm, 0.01)
    assert p_within == pytest.approx(2 * sps.binom.sf(9, 12, 0.5))  # 2 x P(B >= 10) = 2 x 79/4096
    assert p_beyond == 1.0
    assert tolerance_tests(np.full(12, 0.5), 0.01) == (1.0, pytest.approx(2 / 4096))
    assert tolerance_tests(np.full(4, 0.01), 0.01) == (1.0, 1.0)  # all on the tolerance: no evidence


def test_accuracy_mdd_against_brute_force_enumeration():
    """Power at pi: the binomial mass of the lost counts with McNemar p <= alpha / m; scipy throughout."""
    n, discordant, family = 171, 40, 34
    got = accuracy_mdd(n, discordant, family)
    pi = (1 - got * n / discordant) / 2

    def power(q):
        return sum(sps.binom.pmf(b, discordant, q) for b in range(discordant + 1)
                   if b > discordant / 2 and sps.binomtest(b, discordant).pvalue <= 0.05 / family)
    assert power(pi) == pytest.approx(0.8, abs=1e-6)
    assert power(pi - 0.01) < 0.8
    assert accuracy_mdd(171, 0, 34) is None  # no disagreement: nothing is detectable
    assert accuracy_mdd(8, 1, 11) is None  # one disagreement can never pass


def test_newcombe_paired_interval():
    # no discordant pairs and no spread: the difference 0 lies inside a narrow interval
    low, high = newcombe_paired_interval(30, 0, 0, 27)
    assert low < 0 < high and high - low < 0.15
    low, high = newcombe_paired_interval(20, 9, 1, 10)  # dense 29/40, variant 21/40
    assert low < -8 / 40 < high < 0  # a drop: the whole interval below zero
    low2, high2 = newcombe_paired_interval(20, 1, 9, 10)  # the mirror image
    assert (low2, high2) == pytest.approx((-high, -low))


@pytest.mark.parametrize(("p", "text"), [
    (0.0004, "< 0.001"), (1e-30, "< 0.001"), (2 / 256, "0.0078"), (0.0312, "0.031"), (0.25, "0.25"),
    (1.0, "1"), (None, "—"),
])
def test_p_values_are_never_printed_below_their_resolution(p, text):
    assert format_p(p) == text
    assert format_p(2 / 10000, at_floor=True) == "< 0.001"
    assert format_p(2 / 1000, at_floor=True) == "≤ 0.002"


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
    assert pruned_ppl["rel_change"] == pytest.approx(math.exp(150 / 300) - 1)
    assert pruned_ppl["ci_low"] <= pruned_ppl["perplexity"] <= pruned_ppl["ci_high"]
    assert pruned_ppl["rel_ci_low"] - 1e-12 <= pruned_ppl["rel_change"] <= pruned_ppl["rel_ci_high"] + 1e-12
    # worse on every window, but 3 windows have only 8 sign patterns: p = 2/8 at best
    assert pruned_ppl["p_value"] == pytest.approx(0.25) and pruned_ppl["min_p"] == pytest.approx(0.25)
    assert pruned_ppl["test"] == SIGN_TEST
    assert pruned_ppl["underpowered"] is True and pruned_ppl["verdict"] == UNDERPOWERED
    assert pruned_ppl["significant_drop"] is False
    assert pruned["verdict"] == "worse" and pruned["underpowered"] is False
    assert pruned["diff_ci_low"] <= pruned["diff_vs_dense"] <= pruned["diff_ci_high"] < 0


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
    # Holm decides: 66/1024 > 0.05, so no variant is significantly worse
    assert summary["significant_drop"].to_list() == [False, False, False, False]
    assert summary["verdict"].to_list() == ["dense baseline"] + ["no detectable change"] * 3


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


def test_perplexity_verdicts_follow_holm_and_power():
    """8 windows cannot survive Holm over 24 variants (24 x 2/256 > 0.05); 12 windows can."""
    def table(windows, variants):
        rows = ppl_rows("dense", "dense", {}, {f"w{i}": 200.0 + i for i in range(windows)})
        for v in range(variants):
            rows += ppl_rows(f"drop-layers[layers={v}]", "drop-layers", {"layers": v},
                             {f"w{i}": 260.0 + i + v for i in range(windows)})
        return summarize(frame(rows))

    eight = table(8, 24).filter(pl.col("strategy") != "dense")
    assert eight["p_value"].to_list() == pytest.approx([2 / 256] * 24)
    assert set(eight["verdict"]) == {UNDERPOWERED} and not eight["significant_drop"].any()
    assert eight["mdd"].null_count() == 24  # no effect of any size is detectable
    assert pairs_needed(24) == 10  # 24 x 2/2^10 = 0.047
    from prunelab.report.findings import headline
    (line,) = headline(table(8, 24))
    assert line["underpowered"] and "needs at least 10 windows" in line["text"]
    twelve = table(12, 24).filter(pl.col("strategy") != "dense")
    assert set(twelve["verdict"]) == {"worse"} and twelve["significant_drop"].all()
    assert twelve["mdd"].drop_nulls().len() == 24


def test_gsm8k_with_eight_problems_and_dense_one_right_is_underpowered():
    dense = {f"q{i}": i == 0 for i in range(8)}
    variant = {f"q{i}": False for i in range(8)}  # lost the only one: still p = 1
    row = summarize(frame(item_rows("dense", "dense", {}, "gsm8k", "exact_match_strict", dense)
                          + item_rows("x", "magnitude", {"sparsity": 50}, "gsm8k", "exact_match_strict", variant))).row(1, named=True)
    assert row["min_p"] == 1.0 and row["underpowered"] is True and row["verdict"] == UNDERPOWERED
    assert row["mdd"] is None  # no drop could be detected at all


def test_accuracy_minimum_detectable_drop():
    """From the observed disagreements: 10 discordant items per variant, 3 variants."""
    dense = {f"q{i}": i < 40 for i in range(57)}
    rows = item_rows("dense", "dense", {}, "mmlu", "acc", dense)
    for v in range(3):
        flipped = {f"q{i}": (not right) if 30 <= i < 40 or 40 <= i < 40 + v else right
                   for i, right in enumerate(dense.values())}  # 10 lost, v gained
        rows += item_rows(f"v{v}", "magnitude", {"sparsity": v}, "mmlu", "acc", flipped)
    summary = summarize(frame(rows)).filter(pl.col("strategy") != "dense")
    assert summary["mdd"].to_list() == pytest.approx([accuracy_mdd(57, 10 + v, 3) for v in range(3)])
    assert summary["mdd"][0] < 0 and summary["lost"].to_list() == [10] * 3


def test_a_declared_mean_metric_is_compared_generically():
    """A third-party evaluator's float per item (lower is better here): sign test and median intervals."""
    def rows(variant, strategy, values):
        return [dict(variant=variant, strategy=strategy, params="{}", task="fake", metric="kl_mean",
                     item_id=f"i{i}", correct=None, value=v, nll_sum=None, tokens=None) for i, v in enumerate(values)]
    dense = [0.0] * 10
    worse = [0.5, 0.7, 0.4, 0.9, 0.6, 0.5, 0.8, 0.3, 0.6, 0.7]
    same = [0.01, -0.01, 0.02, -0.02, 0.0, 0.01, -0.01, 0.0, 0.02, -0.02]
    summary = summarize(frame(rows("dense", "dense", dense) + rows("a", "x", worse) + rows("b", "x", same)),
                        metrics={("fake", "kl_mean"): {"kind": "mean", "higher_is_better": False, "label": "KL"}})
    dense_row, a, b = summary.iter_rows(named=True)
    assert (a["kind"], a["label"], a["higher_is_better"]) == ("mean", "KL", False)
    assert a["value"] == pytest.approx(np.mean(worse)) and a["diff_vs_dense"] == pytest.approx(np.median(worse))
    assert (a["diff_ci_low"], a["diff_ci_high"]) == pytest.approx(median_interval(worse))
    assert a["p_value"] == pytest.approx(2 / 1024) and a["p_holm"] == pytest.approx(4 / 1024)
    assert a["verdict"] == "worse" and a["significant_drop"] is True
    assert b["p_value"] == 1.0  # 4 up, 4 down, 2 ties
    assert b["verdict"] == "no detectable change" and a["rel_change"] is None  # dense is 0: no relative change
    assert harm_order(summary)["variant"].to_list() == ["dense", "a", "b"]
    # without the declaration the kind follows the filled column; the direction defaults to higher = better
    guessed = summarize(frame(rows("dense", "dense", dense) + rows("a", "x", worse)))
    assert guessed["kind"].to_list() == ["mean", "mean"] and guessed["verdict"][1] == "better"


def test_a_metric_with_a_tolerance_is_within_beyond_or_undecided():
    """Dense's own KL is 0, so every variant differs from it; against the tolerance the answer means something."""
    def rows(variant, strategy, values):
        return [dict(variant=variant, strategy=strategy, params="{}", task="wikitext", metric="kl_mean",
                     item_id=f"w{i}", correct=None, value=v, nll_sum=None, tokens=None) for i, v in enumerate(values)]
    n = 12
    tiny = [1e-9] * n  # not bit-identical to dense, but far inside the tolerance
    large = [0.2 + 0.01 * i for i in range(n)]
    mixed = [0.005] * 6 + [0.02] * 6
    spec = {("wikitext", "kl_mean"): {"kind": "mean", "higher_is_better": False, "tolerance": 0.01}}
    summary = summarize(frame(rows("dense", "dense", [0.0] * n) + rows("tiny", "x", tiny) + rows("large", "x", large)
                              + rows("mixed", "x", mixed)), metrics=spec)
    verdicts = dict(zip(summary["variant"], summary["verdict"], strict=True))
    assert verdicts == {"dense": "dense baseline", "tiny": "within tolerance", "large": "beyond tolerance",
                        "mixed": "undecided"}
    tiny_row = summary.row(1, named=True)
    assert tiny_row["p_within"] == pytest.approx(2 / 4096) and tiny_row["p_holm_within"] == pytest.approx(3 * 2 / 4096)
    assert tiny_row["significant_drop"] is False and tiny_row["tolerance"] == 0.01
    assert summary.row(2, named=True)["significant_drop"] is True
    from prunelab.report.findings import headline
    (line,) = headline(summary)
    assert "1 of 3 variants beyond it, 1 within it, 1 undecided" in line["text"]
