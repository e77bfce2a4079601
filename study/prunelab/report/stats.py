"""Statistics that make a study's numbers trustworthy: intervals, paired tests, the summary table.

Every variant is compared with the dense model *on the same items*, with a test chosen by the
metric's kind (``plugin.MetricSpec.kind``) whose level holds at the sample sizes studies use (8-24
windows, 57 questions) *whatever the shape of the data*; docs/statistics.md explains each choice.

- accuracy: 95% Wilson score interval; exact McNemar test (only discordant items carry
  information); Newcombe's interval for the paired difference, unclipped.
- perplexity: exact sign test on the per-window paired differences of mean NLL per token (the log
  of the per-window perplexity ratio): "a window is as likely to get worse as better", i.e. the
  median per-window change is zero. The change vs dense is that median, with the distribution-free
  (order-statistic, Hettmansperger-Sheather) interval the sign test inverts to.
- mean (any float per item, e.g. a KL divergence): the same sign test and median interval on the
  per-item differences; a metric declared with a ``tolerance`` (fidelity to dense: KL, same top
  token) is instead tested against that tolerance: within / beyond / undecided.

Why the median: the sign-flip permutation test of the mean used before is exact only for
differences symmetric about zero; with skewed zero-mean differences its false-positive rate at
8-12 windows is 0.10-0.16 (and so is every test of the mean at that n: no test of a mean holds its
level over all skewed shapes). The sign test is exact for every distribution whose median is 0.

Holm's step-down adjustment over the pruned variants of one task and metric drives every verdict;
where no outcome could survive it the row is "underpowered" rather than "no change".
``summarize`` turns the runner's per-item table into the per-variant x task x metric summary that
the charts, the report and the index are built from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy import stats as sps

from prunelab.errors import PrunelabError
from prunelab.records import DENSE, ITEM_COLUMNS, PERPLEXITY_COLUMNS

ALPHA = 0.05
CONFIDENCE = 0.95
POWER = 0.8  # the minimum detectable difference is the one detected with this probability
P_PRINT_FLOOR = 0.001  # p-values below this print as "< 0.001"

ACCURACY_TEST = "exact McNemar"
SIGN_TEST = "exact sign test"
TOLERANCE_TEST = "exact sign test against the tolerance"

WORSE, BETTER, NO_CHANGE, UNDERPOWERED, BASELINE, NO_BASELINE = (
    "worse", "better", "no detectable change", "underpowered", "dense baseline", "no dense baseline")
WITHIN, BEYOND, UNDECIDED = "within tolerance", "beyond tolerance", "undecided"

# One row per variant x task x metric. ``value`` is the metric (accuracy, perplexity or the mean);
# ``accuracy``/``perplexity`` repeat it for that kind. diff_vs_dense = variant - dense on the paired
# items (accuracy: the difference of accuracies; perplexity and mean: the *median* per-item change),
# rel_change = diff / dense, each with a 95% interval (ci_low/ci_high of a continuous value: of the
# median item). lost/gained are McNemar's b/c. p_value tests "variant differs from dense" (against
# a tolerance: "beyond it", and p_within "within it"); p_holm (p_holm_within) adjusts it over the
# pruned variants of the task and metric and drives ``verdict`` and ``significant_drop``. min_p:
# the smallest p any harmful outcome could give at this n; underpowered: even that cannot survive
# Holm. mdd: the smallest harmful difference the test used detects with 80% power at the Holm
# level (accuracy: given the observed number of disagreements; continuous: given the observed
# spread), in the units of diff_vs_dense.
SUMMARY_SCHEMA = {
    "variant": pl.String, "strategy": pl.String, "params": pl.String,
    "task": pl.String, "metric": pl.String, "kind": pl.String, "label": pl.String, "higher_is_better": pl.Boolean,
    "n": pl.Int64, "correct": pl.Int64, "value": pl.Float64, "accuracy": pl.Float64, "perplexity": pl.Float64,
    "ci_low": pl.Float64, "ci_high": pl.Float64,
    "n_paired": pl.Int64, "dense_value": pl.Float64, "diff_vs_dense": pl.Float64,
    "diff_ci_low": pl.Float64, "diff_ci_high": pl.Float64,
    "rel_change": pl.Float64, "rel_ci_low": pl.Float64, "rel_ci_high": pl.Float64,
    "lost": pl.Int64, "gained": pl.Int64, "p_value": pl.Float64, "p_exact": pl.Boolean, "p_holm": pl.Float64,
    "min_p": pl.Float64, "underpowered": pl.Boolean, "mdd": pl.Float64,
    "verdict": pl.String, "significant_drop": pl.Boolean,
    "test": pl.String, "resamples": pl.Int64,
    "tolerance": pl.Float64, "p_within": pl.Float64, "p_holm_within": pl.Float64,
}


# ------------------------------------------------------------------------------------------ accuracy
def wilson_interval(k: Any, n: Any, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Wilson score interval for k successes in n trials (scalars, or arrays element-wise).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at
    0/n or n/n, which matters for pruned models that score near zero. The closed form, so it
    vectorises; the tests check it against scipy's ``binomtest(...).proportion_ci("wilson")``.
    """
    k_arr, n_arr = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    if np.any(n_arr <= 0) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = float(sps.norm.ppf(0.5 + confidence / 2))
    p, z2 = k_arr / n_arr, z * z
    denominator = 1 + z2 / n_arr
    centre = (p + z2 / (2 * n_arr)) / denominator
    half = z * np.sqrt(p * (1 - p) / n_arr + z2 / (4 * n_arr * n_arr)) / denominator
    low, high = np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def mcnemar_exact(b: Any, c: Any) -> Any:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2.

    2 x the smaller binomial tail, capped at 1 (what scipy's ``binomtest`` gives at p = 1/2;
    scalars or arrays). No discordant pairs means no evidence, p = 1.
    """
    b_arr, c_arr = np.asarray(b), np.asarray(c)
    if np.any(b_arr < 0) or np.any(c_arr < 0):
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    p = np.minimum(1.0, 2 * sps.binom.cdf(np.minimum(b_arr, c_arr), b_arr + c_arr, 0.5))
    p = np.where(b_arr + c_arr == 0, 1.0, p)
    return float(p) if p.ndim == 0 else p


def newcombe_paired_interval(both: Any, lost: Any, gained: Any, neither: Any,
                             confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Interval for other - base accuracy on paired items: Newcombe (1998) method 10.

    Combines the two Wilson intervals with the correlation of the pairs; unlike a Wald interval it
    keeps its coverage at small n and near 0 or 1. ``lost``: base right, other wrong. Scalars or arrays.
    """
    a, b, c, d = (np.asarray(x, dtype=float) for x in (both, lost, gained, neither))
    n = a + b + c + d
    base, other = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, confidence)
    l2, u2 = wilson_interval(a + c, n, confidence)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(denominator > 0, (a * d - b * c) / np.sqrt(np.where(denominator > 0, denominator, 1)), 0.0)
    # interval for base - other, then flipped
    delta = np.sqrt(np.maximum(0.0, (base - l1) ** 2 - 2 * phi * (base - l1) * (u2 - other) + (u2 - other) ** 2))
    epsilon = np.sqrt(np.maximum(0.0, (u1 - base) ** 2 - 2 * phi * (u1 - base) * (other - l2) + (other - l2) ** 2))
    diff = other - base
    low, high = np.maximum(-1.0, diff - epsilon), np.minimum(1.0, diff + delta)
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


@dataclass(frozen=True)
class PairedComparison:
    """A variant against a baseline on the same items (``difference`` = other - base)."""

    n: int
    base_accuracy: float
    other_accuracy: float
    difference: float
    lost: int  # base right, other wrong (McNemar's b)
    gained: int  # base wrong, other right (McNemar's c)
    p_value: float

    @property
    def significant_drop(self) -> bool:
        """Unadjusted: a single comparison. ``summarize`` decides on Holm-adjusted p-values."""
        return self.p_value < ALPHA and self.difference < 0


def paired_comparison(base: Sequence[bool], other: Sequence[bool]) -> PairedComparison:
    """Compare two per-item correctness arrays that are already aligned item by item."""
    base_arr = np.asarray(base, dtype=bool)
    other_arr = np.asarray(other, dtype=bool)
    if base_arr.shape != other_arr.shape or base_arr.ndim != 1:
        raise ValueError(f"paired arrays must be 1-D and the same length, got {base_arr.shape} and {other_arr.shape}")
    n = int(base_arr.size)
    if n == 0:
        raise ValueError("no paired items to compare")
    lost = int(np.sum(base_arr & ~other_arr))
    gained = int(np.sum(~base_arr & other_arr))
    base_acc = float(base_arr.mean())
    other_acc = float(other_arr.mean())
    return PairedComparison(n, base_acc, other_acc, other_acc - base_acc, lost, gained, mcnemar_exact(lost, gained))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values (family-wise error control), in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------------ continuous
def perplexity(nll_sum: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-weighted perplexity over windows: exp(sum NLL / sum tokens), as the papers report it."""
    return math.exp(float(np.asarray(nll_sum, dtype=float).sum()) / float(np.asarray(tokens, dtype=float).sum()))


def sign_test(positive: Any, negative: Any) -> Any:
    """Two-sided exact sign test: of the non-zero paired differences, ``positive`` were > 0.

    Under "a window is as likely to get worse as better" (the differences' median is 0) the count
    of positive ones among the non-zero ones is Binomial(k, 1/2) *whatever the distribution's
    shape*: exact at any n, skewed or heavy-tailed. The same binomial as exact McNemar's, whose
    discordant items are the non-zero differences of two 0/1 columns, so it reuses it.
    """
    return mcnemar_exact(positive, negative)


def sign_counts(differences: Any) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) counts along the last axis; zeros (ties) carry no sign and are dropped."""
    d = np.asarray(differences, dtype=float)
    return np.sum(d > 0, axis=-1), np.sum(d < 0, axis=-1)


def sign_test_min_p(n: int) -> float:
    """The smallest two-sided p the sign test can return with n pairs: every one the same sign."""
    return min(1.0, 2.0 / 2**n)


def median_interval(values: Any, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Distribution-free interval for the median (last axis): interpolated order statistics.

    [x(k), x(n-k+1)] covers the median with probability 1 - 2 P(Binom(n, 1/2) < k) for *any*
    continuous distribution (the sign test inverted); Hettmansperger & Sheather (1986) interpolate
    between k and k+1 so that the coverage is close to ``confidence`` instead of jumping (n = 8:
    0.93 or 0.99). Below 6 values even [min, max] covers less than 95 %: (None, None) under 2
    values, [min, max] from 2 to 5. Batches: shape (batch, n) gives arrays.
    """
    x = np.sort(np.asarray(values, dtype=float), axis=-1)
    n = x.shape[-1]
    if n < 2:
        return None, None
    coverage = 1 - 2 * sps.binom.cdf(np.arange(n // 2 + 1) - 1, n, 0.5)  # index k: [x(k), x(n-k+1)], k >= 1
    ok = [k for k in range(1, n // 2 + 1) if coverage[k] >= confidence]
    if not ok:
        low, high = x[..., 0], x[..., -1]
    else:
        k = max(ok)
        g_k, g_next = coverage[k], coverage[k + 1] if k + 1 <= n // 2 else 0.0
        share = (g_k - confidence) / (g_k - g_next) if g_k > g_next else 0.0
        lam = (n - k) * share / (k + (n - 2 * k) * share) if k < n - k else 0.0
        inner = min(k, n - k - 1)  # x(k+1) and x(n-k), 0-based k and n-k-1
        low = (1 - lam) * x[..., k - 1] + lam * x[..., inner]
        high = (1 - lam) * x[..., n - k] + lam * x[..., n - 1 - inner]
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


def sign_test_mdd(differences: np.ndarray, family: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest shift of the median the sign test detects with ``power`` at the Holm/Bonferroni level.

    Exact for the test used: at shift delta the n signs are Binomial(n, q(delta)) with q the chance
    that a window's difference is positive, and the power is the binomial mass of the counts whose
    p <= alpha / family (Holm's first step). q comes from the observed differences centred on their
    median, smoothed by a normal kernel (Silverman's robust bandwidth, 0.9 min(sd, IQR / 1.34) n^-1/5)
    so that it is not a step function of n points. None: no shift can be detected (too few windows
    for this family). The calibration test checks that the stated power holds on fresh data.
    """
    d = np.asarray(differences, dtype=float)
    n = d.size
    rejecting = np.flatnonzero(sign_test(np.arange(n + 1), n - np.arange(n + 1)) <= alpha / max(1, family))
    rejecting = rejecting[rejecting > n / 2]  # the harmful side (more positive differences)
    if n < 2 or rejecting.size == 0:
        return None
    residuals = d - np.median(d)
    q75, q25 = np.percentile(residuals, [75, 25])
    spread = min(float(np.std(residuals, ddof=1)), float(q75 - q25) / 1.34) or float(np.std(residuals, ddof=1))
    if spread == 0 or not math.isfinite(spread):
        return 0.0
    bandwidth = 0.9 * spread * n ** -0.2

    def power_at(shift: float) -> float:
        q = float(np.mean(sps.norm.cdf((residuals + shift) / bandwidth)))
        return float(sps.binom.pmf(rejecting, n, q).sum())

    low, high = 0.0, spread
    while power_at(high) < power:
        high *= 2
        if high > 1e6 * spread:
            return None
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if power_at(middle) < power else (low, middle)
    return high


def pairs_needed(family: int, alpha: float = ALPHA) -> int:
    """Fewest pairs with which the exact sign test can survive Holm over ``family`` comparisons."""
    return max(1, math.ceil(math.log2(2 * max(1, family) / alpha)))


def accuracy_mdd(n: int, discordant: int, family: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest accuracy drop exact McNemar detects with ``power``, given the observed discordant count.

    McNemar conditions on the D = lost + gained items on which the two models disagree: lost is
    Binomial(D, pi). The power at pi is the mass of the lost counts whose p <= alpha / family
    (Holm's first step); the smallest pi >= 1/2 reaching ``power`` is a change of -(2 pi - 1) D / n.
    None: with D disagreements no drop is detectable (D = 0, or too few for this family).
    """
    if discordant <= 0:
        return None
    lost = np.arange(discordant + 1)
    rejecting = lost[(mcnemar_exact(lost, discordant - lost) <= alpha / max(1, family)) & (lost > discordant / 2)]
    if rejecting.size == 0 or sps.binom.pmf(rejecting, discordant, 1.0).sum() < power:
        return None
    low, high = 0.5, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if sps.binom.pmf(rejecting, discordant, middle).sum() < power else (low, middle)
    return -(2 * high - 1) * discordant / n


def tolerance_tests(harm: np.ndarray, tolerance: float) -> tuple[float, float]:
    """(p_within, p_beyond): exact sign tests of the harmful change's median against ``tolerance``.

    ``harm``: per item the change in the harmful direction (KL itself; for agreement, 1 - share).
    "within": the median is below the tolerance (H0: at or above it), from the items below it;
    "beyond": the median is above it. Each one-sided p is doubled (capped at 1) so that comparing
    either with alpha is a 95 % two-sided interval compared with the tolerance: a variant whose
    median sits on it is called within or beyond with probability <= alpha in all.
    """
    below, above = int(np.sum(harm < tolerance)), int(np.sum(harm > tolerance))
    total = below + above
    if total == 0:
        return 1.0, 1.0
    p_within = min(1.0, 2 * float(sps.binom.sf(below - 1, total, 0.5)))
    p_beyond = min(1.0, 2 * float(sps.binom.sf(above - 1, total, 0.5)))
    return p_within, p_beyond


def format_p(p: float | None, at_floor: bool = False) -> str:
    """A p-value as text, never below its resolution: "< 0.001", or "≤ x" at a Monte-Carlo floor."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "—"
    if p < P_PRINT_FLOOR:
        return f"< {P_PRINT_FLOOR:g}"
    if at_floor:
        return f"≤ {p:.2g}"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}".rstrip("0").rstrip(".") if p < 1 else "1"


# ------------------------------------------------------------------------------------------ summary
def summarize(items: pl.DataFrame, *, metrics: Mapping[tuple[str, str], Mapping[str, Any]] | None = None
              ) -> pl.DataFrame:
    """The per-variant x task x metric summary of a per-item table (see ``SUMMARY_SCHEMA``).

    ``metrics``: (task, metric) -> the evaluator's declaration (``kind``, ``higher_is_better``,
    ``label``, ``tolerance``), as the run manifest stores it; without one the kind follows the columns that are
    filled (``correct``, ``value``, ``nll_sum``/``tokens``). The dense variant (strategy
    ``"dense"``) of the same task and metric is the baseline; pairs are matched by ``item_id``.
    Rows keep the order in which variants first appear, dense first within each task and metric.
    """
    check_items(items)
    metrics = metrics or {}
    rows: list[dict[str, Any]] = []
    for (task, metric), group in items.group_by(["task", "metric"], maintain_order=True):
        dense = group.filter(pl.col("strategy") == DENSE)
        if dense.select(pl.col("variant").n_unique()).item() > 1:
            raise PrunelabError(f"more than one dense variant for task {task}: {sorted(set(dense['variant']))}")
        spec = dict(metrics.get((task, metric), {}))
        kind = spec.get("kind") or _kind(group, task, metric)
        spec = {"kind": kind, "higher_is_better": spec.get("higher_is_better", kind != "perplexity"),
                "label": spec.get("label") or metric,
                "tolerance": spec.get("tolerance") if kind == "mean" else None}
        ordered = pl.concat([dense, group.filter(pl.col("strategy") != DENSE)])
        family = [_summary_row(variant, dense if dense.height else None, spec)
                  for _, variant in ordered.group_by("variant", maintain_order=True)]
        rows += _decide(family)
    return pl.DataFrame(rows, schema=SUMMARY_SCHEMA, orient="row") if rows else pl.DataFrame(schema=SUMMARY_SCHEMA)


def check_items(items: pl.DataFrame) -> None:
    """Reject a per-item table that would give wrong statistics, with a one-line reason."""
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise PrunelabError(f"per-item table lacks columns {missing} (has {items.columns})")
    dupes = items.group_by(["variant", "task", "metric", "item_id"]).len().filter(pl.col("len") > 1)
    if dupes.height:
        first = dupes.row(0, named=True)
        raise PrunelabError(f"per-item table has {dupes.height} duplicated items, e.g. {first['item_id']!r} "
                            f"of {first['variant']} / {first['task']} / {first['metric']}")


def _kind(group: pl.DataFrame, task: str, metric: str) -> str:
    """accuracy / mean / perplexity from the filled columns (tables written before declarations)."""
    if group["correct"].null_count() == 0:
        return "accuracy"
    if "value" in group.columns and group["value"].null_count() == 0 and group["correct"].null_count() == group.height:
        return "mean"
    if group["correct"].null_count() == group.height and _has_perplexity(group):
        return "perplexity"
    raise PrunelabError(f"{task} / {metric}: rows mix correct/incorrect with missing values; accuracy rows need "
                        "`correct`, perplexity rows `nll_sum` and `tokens`, mean rows `value`")


def _has_perplexity(frame: pl.DataFrame) -> bool:
    return all(c in frame.columns and frame[c].null_count() == 0 for c in PERPLEXITY_COLUMNS)


def _paired(variant: pl.DataFrame, dense: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The items both have, dense columns suffixed ``_dense``, in item order."""
    return (variant.select("item_id", *columns)
            .join(dense.select("item_id", *columns), on="item_id", how="inner", suffix="_dense")
            .sort("item_id"))


def _summary_row(variant: pl.DataFrame, dense: pl.DataFrame | None, spec: dict[str, Any]) -> dict[str, Any]:
    first = variant.row(0, named=True)
    row = {key: None for key in SUMMARY_SCHEMA}
    row.update({k: first[k] for k in ("variant", "strategy", "params", "task", "metric")})
    row.update(kind=spec["kind"], label=spec["label"], higher_is_better=spec["higher_is_better"], n_paired=0)
    where = f"{first['variant']} / {first['task']} / {first['metric']}"
    if spec["kind"] == "accuracy":
        if variant["correct"].null_count():
            raise PrunelabError(f"{where}: rows mix correct/incorrect with missing values")
        _accuracy_stats(row, variant, dense)
    elif spec["kind"] == "perplexity":
        if not _has_perplexity(variant):
            raise PrunelabError(f"{where}: perplexity rows need `nll_sum` and `tokens`")
        _perplexity_stats(row, variant, dense, where)
    elif spec["kind"] == "mean":
        if "value" not in variant.columns or variant["value"].null_count():
            raise PrunelabError(f"{where}: mean rows need a `value` on every item")
        _mean_stats(row, variant, dense, spec)
    else:
        raise PrunelabError(f"{where}: unknown metric kind {spec['kind']!r} (accuracy, perplexity or mean)")
    return row


def _accuracy_stats(row: dict[str, Any], variant: pl.DataFrame, dense: pl.DataFrame | None) -> None:
    n, k = variant.height, int(variant["correct"].sum())
    row.update(n=n, correct=k, value=k / n, accuracy=k / n)
    row["ci_low"], row["ci_high"] = wilson_interval(k, n)
    pairs = _paired(variant, dense, ["correct"]) if dense is not None else None
    if pairs is None or pairs.height == 0:
        return
    base, other = pairs["correct_dense"].to_numpy(), pairs["correct"].to_numpy()
    cmp = paired_comparison(base, other)
    both, neither = int(np.sum(base & other)), int(np.sum(~base & ~other))
    # Newcombe's interval as it is: clipping it to [-dense, 1 - dense] (the observed dense accuracy is
    # not the true one) made it cover 45-65 % for a variant that is always wrong (issue #26)
    low, high = newcombe_paired_interval(both, cmp.lost, cmp.gained, neither)
    row.update(n_paired=cmp.n, dense_value=cmp.base_accuracy, diff_vs_dense=cmp.difference, diff_ci_low=low,
               diff_ci_high=high, lost=cmp.lost, gained=cmp.gained, p_value=cmp.p_value, p_exact=True,
               test=ACCURACY_TEST, _dense_correct=int(base.sum()), _harm=None)
    _relative(row, cmp.base_accuracy)


def _perplexity_stats(row: dict[str, Any], variant: pl.DataFrame, dense: pl.DataFrame | None, where: str) -> None:
    value = perplexity(variant["nll_sum"], variant["tokens"])
    log_ppl = variant["nll_sum"].to_numpy() / variant["tokens"].to_numpy()
    low, high = median_interval(log_ppl)
    row.update(n=variant.height, value=value, perplexity=value, ci_low=_exp(low), ci_high=_exp(high))
    pairs = _paired(variant, dense, ["nll_sum", "tokens"]) if dense is not None else None
    if pairs is None or pairs.height == 0:
        return
    if (pairs["tokens"] != pairs["tokens_dense"]).any():
        raise PrunelabError(f"{where}: windows differ in token count from the dense run's; the evaluation "
                            "settings do not match")
    tokens = pairs["tokens"].to_numpy()
    differences = (pairs["nll_sum"].to_numpy() - pairs["nll_sum_dense"].to_numpy()) / tokens  # log ratio per window
    dense_ppl = perplexity(pairs["nll_sum_dense"], pairs["tokens_dense"])
    median = float(np.median(differences))
    log_low, log_high = median_interval(differences)
    row.update(n_paired=pairs.height, dense_value=dense_ppl, rel_change=math.expm1(median),
               diff_vs_dense=dense_ppl * math.expm1(median), p_value=sign_test(*sign_counts(differences)),
               p_exact=True, test=SIGN_TEST, _harm=differences)
    if log_low is not None:
        row.update(rel_ci_low=math.expm1(log_low), rel_ci_high=math.expm1(log_high),
                   diff_ci_low=dense_ppl * math.expm1(log_low), diff_ci_high=dense_ppl * math.expm1(log_high))


def _mean_stats(row: dict[str, Any], variant: pl.DataFrame, dense: pl.DataFrame | None, spec: dict[str, Any]) -> None:
    values = variant["value"].to_numpy()
    row.update(n=variant.height, value=float(values.mean()))
    row["ci_low"], row["ci_high"] = median_interval(values)
    pairs = _paired(variant, dense, ["value"]) if dense is not None else None
    if pairs is None or pairs.height == 0:
        return
    differences = pairs["value"].to_numpy() - pairs["value_dense"].to_numpy()
    low, high = median_interval(differences)
    row.update(n_paired=pairs.height, dense_value=float(pairs["value_dense"].mean()),
               diff_vs_dense=float(np.median(differences)), diff_ci_low=low, diff_ci_high=high, p_exact=True,
               _harm=differences if not spec["higher_is_better"] else -differences)
    tolerance = spec.get("tolerance")
    if tolerance is None:
        row.update(p_value=sign_test(*sign_counts(differences)), test=SIGN_TEST)
    else:
        p_within, p_beyond = tolerance_tests(row["_harm"], tolerance)
        row.update(tolerance=tolerance, p_within=p_within, p_value=p_beyond, test=TOLERANCE_TEST)
    _relative(row, row["dense_value"])


def _relative(row: dict[str, Any], dense_value: float) -> None:
    """Relative change and its interval (the dense value taken as fixed); none when dense is 0."""
    if not dense_value:
        return
    scale = abs(dense_value)
    row["rel_change"] = row["diff_vs_dense"] / scale
    if row["diff_ci_low"] is not None:
        row["rel_ci_low"], row["rel_ci_high"] = row["diff_ci_low"] / scale, row["diff_ci_high"] / scale


def _exp(x: float | None) -> float | None:
    return None if x is None else math.exp(x)


def harmful(diff: float | None, higher_is_better: bool) -> bool:
    """Whether a difference vs dense is in the bad direction."""
    return diff is not None and (diff < 0 if higher_is_better else diff > 0)


def _decide(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Holm over the family's pruned variants, then each row's power and verdict.

    Against a tolerance, Holm runs separately over the "beyond" and the "within" p-values (each a
    doubled one-sided p, so a variant on the tolerance is misclassified with probability <= alpha).
    """
    tested = [r for r in rows if r["strategy"] != DENSE and r["p_value"] is not None]
    for r, adjusted in zip(tested, holm_adjust([r["p_value"] for r in tested]), strict=True):
        r["p_holm"] = adjusted
    against = [r for r in tested if r["p_within"] is not None]
    for r, adjusted in zip(against, holm_adjust([r["p_within"] for r in against]), strict=True):
        r["p_holm_within"] = adjusted
    family = len(tested)
    for r in rows:
        harm = r.pop("_harm", None)
        dense_correct = r.pop("_dense_correct", None)
        if r["strategy"] == DENSE:
            r.update(verdict=BASELINE, significant_drop=False if r["p_value"] is not None else None)
            continue
        if r["p_value"] is None:
            r.update(verdict=NO_BASELINE)
            continue
        if r["kind"] == "accuracy":
            r["min_p"] = mcnemar_exact(dense_correct, 0) if r["higher_is_better"] else mcnemar_exact(0, r["n_paired"] - dense_correct)
            r["mdd"] = accuracy_mdd(r["n_paired"], r["lost"] + r["gained"], family)
            if r["mdd"] is not None and not r["higher_is_better"]:
                r["mdd"] = -r["mdd"]
        else:
            r["min_p"] = sign_test_min_p(r["n_paired"])
            shift = sign_test_mdd(harm - (r["tolerance"] or 0.0), family) if harm is not None else None
            if shift is not None:
                shift += r["tolerance"] or 0.0
                sign = -1 if r["higher_is_better"] else 1
                r["mdd"] = sign * (r["dense_value"] * math.expm1(shift) if r["kind"] == "perplexity" else shift)
        r["underpowered"] = family * r["min_p"] > ALPHA
        if r["underpowered"] and r["kind"] != "accuracy":
            r["mdd"] = None  # no effect of any size could be detected with these pairs
        r.update(_verdict(r))
    return rows


def _verdict(r: dict[str, Any]) -> dict[str, Any]:
    """verdict and significant_drop of a tested pruned row (Holm-adjusted p-values already set)."""
    if r["tolerance"] is not None:
        if r["p_holm"] < ALPHA:
            return {"verdict": BEYOND, "significant_drop": True}
        if r["p_holm_within"] < ALPHA:
            return {"verdict": WITHIN, "significant_drop": False}
        return {"verdict": UNDERPOWERED if r["underpowered"] else UNDECIDED, "significant_drop": False}
    significant = r["p_holm"] < ALPHA
    bad = harmful(r["diff_vs_dense"], r["higher_is_better"])
    verdict = (WORSE if bad else BETTER) if significant else (UNDERPOWERED if r["underpowered"] else NO_CHANGE)
    return {"verdict": verdict, "significant_drop": bool(significant and bad)}


def harm_order(summary: pl.DataFrame) -> pl.DataFrame:
    """Rows by task and metric, dense first, then most harmful relative change first."""
    harm = (pl.when(pl.col("higher_is_better")).then(-pl.col("rel_change").fill_null(pl.col("diff_vs_dense")))
            .otherwise(pl.col("rel_change").fill_null(pl.col("diff_vs_dense"))))
    keyed = summary.with_row_index("_order").with_columns(
        pl.col("_order").min().over(["task", "metric"]).alias("_group"),
        (pl.col("strategy") != DENSE).alias("_pruned"), harm.fill_nan(None).alias("_harm"))
    return keyed.sort(["_group", "_pruned", "_harm"], descending=[False, False, True], nulls_last=True).drop(
        "_order", "_group", "_pruned", "_harm")


def statistics_manifest(summary: pl.DataFrame) -> dict[str, Any]:
    """What the manifest records about the tests: per task and metric the test, n and tolerance."""
    tests = []
    for (task, metric), group in summary.group_by(["task", "metric"], maintain_order=True):
        tested = group.filter(pl.col("test").is_not_null())
        tolerances = sorted(set(tested["tolerance"].drop_nulls()))
        tests.append({"task": task, "metric": metric, "kind": group["kind"][0],
                      "tests": sorted(set(tested["test"])), "n_paired": sorted(set(tested["n_paired"])),
                      "comparisons": tested.filter(pl.col("strategy") != DENSE).height,
                      **({"tolerance": tolerances[0]} if tolerances else {})})
    return {"alpha": ALPHA, "confidence": CONFIDENCE, "power": POWER,
            "multiple_comparisons": "Holm, per task and metric",
            "intervals": {"accuracy": "Wilson; difference: Newcombe (1998) method 10, unclipped",
                          "perplexity": "median per-window change: interpolated order statistics "
                                        "(Hettmansperger-Sheather 1986), exponentiated",
                          "mean": "median per-item change: interpolated order statistics"},
            "tests": tests}
