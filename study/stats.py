"""Statistics that make a study's numbers trustworthy: intervals, paired tests, the summary table.

On 10% subsets (GSM8K: 132 problems) a few points of accuracy are noise, so every accuracy gets a
95% Wilson score interval and every variant is compared with the dense model *on the same items*
with an exact McNemar test: only the discordant items (dense right and variant wrong, or the
reverse) carry information about the difference. Perplexity is exp(sum NLL / sum tokens) over the
windows; its interval and its paired test against dense come from a seeded bootstrap over windows.

``summarize`` turns the runner's per-item table into the per-variant x task x metric summary that
the charts, the report and the index are built from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from .errors import PrunelabError

DENSE = "dense"
ALPHA = 0.05
BOOTSTRAP_SAMPLES = 2000

ITEM_COLUMNS = ("variant", "strategy", "params", "task", "metric", "item_id", "correct")
PERPLEXITY_COLUMNS = ("nll_sum", "tokens")

# One row per variant x task x metric. lost/gained are McNemar's b/c: items dense got right and the
# variant got wrong, and the reverse. p_value tests "variant differs from dense on these items";
# p_holm adjusts it for the many variants compared on one task and metric (a 28-layer sweep at
# p < 0.05 flags about one layer by chance alone). significant_drop uses the unadjusted p_value.
SUMMARY_SCHEMA = {
    "variant": pl.String, "strategy": pl.String, "params": pl.String,
    "task": pl.String, "metric": pl.String, "kind": pl.String,
    "n": pl.Int64, "correct": pl.Int64, "accuracy": pl.Float64, "perplexity": pl.Float64,
    "ci_low": pl.Float64, "ci_high": pl.Float64,
    "n_paired": pl.Int64, "dense_value": pl.Float64, "diff_vs_dense": pl.Float64,
    "lost": pl.Int64, "gained": pl.Int64, "p_value": pl.Float64, "p_holm": pl.Float64,
    "significant_drop": pl.Boolean,
    "test": pl.String,
}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials.

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at
    0/n or n/n, which matters for pruned models that score near zero.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of b vs c discordant pairs at p = 1/2.

    Computed with integers (exact for any table size); no discordant pairs means no evidence, p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


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


def perplexity(nll_sum: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-weighted perplexity over windows: exp(sum NLL / sum tokens), as the papers report it."""
    return math.exp(float(np.asarray(nll_sum, dtype=float).sum()) / float(np.asarray(tokens, dtype=float).sum()))


def bootstrap_perplexity_interval(
    nll_sum: Sequence[float], tokens: Sequence[int], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
) -> tuple[float, float]:
    """95% percentile bootstrap interval of the perplexity, resampling whole windows."""
    nll, tok = np.asarray(nll_sum, dtype=float), np.asarray(tokens, dtype=float)
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(samples, nll.size))
    values = np.exp(nll[idx].sum(axis=1) / tok[idx].sum(axis=1))
    low, high = np.quantile(values, [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def paired_bootstrap_p_value(
    base_nll: Sequence[float], other_nll: Sequence[float], tokens: Sequence[int],
    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
) -> float:
    """Two-sided bootstrap p-value for "the perplexities differ", resampling the same windows for both.

    p = 2 x the smaller share of resamples on either side of zero (floored at 1/samples); windows
    are shared, so the window-to-window variation that both models see cancels out.
    """
    base, other = np.asarray(base_nll, dtype=float), np.asarray(other_nll, dtype=float)
    tok = np.asarray(tokens, dtype=float)
    idx = np.random.default_rng(seed).integers(0, base.size, size=(samples, base.size))
    # log-perplexity difference; same sign as the perplexity difference
    delta = (other[idx].sum(axis=1) - base[idx].sum(axis=1)) / tok[idx].sum(axis=1)
    share = min(np.mean(delta <= 0), np.mean(delta >= 0))
    return float(min(1.0, max(2 * share, 1 / samples)))


def summarize(items: pl.DataFrame, *, bootstrap_samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> pl.DataFrame:
    """The per-variant x task x metric summary of a per-item table (see ``SUMMARY_SCHEMA``).

    The dense variant (strategy ``"dense"``) of the same task and metric is the baseline; pairs are
    matched by ``item_id`` so a partially finished variant is compared on the items it has. Rows keep
    the order in which variants first appear, dense first within each task and metric.
    """
    check_items(items)
    rows = []
    for _, group in items.group_by(["task", "metric"], maintain_order=True):
        dense = group.filter(pl.col("strategy") == DENSE)
        if dense.select(pl.col("variant").n_unique()).item() > 1:
            raise PrunelabError(f"more than one dense variant for task {group['task'][0]}: "
                                f"{sorted(set(dense['variant']))}")
        ordered = pl.concat([dense, group.filter(pl.col("strategy") != DENSE)])
        for _, variant in ordered.group_by("variant", maintain_order=True):
            rows.append(_summary_row(variant, dense if dense.height else None, bootstrap_samples, seed))
    schema = {k: v for k, v in SUMMARY_SCHEMA.items() if k != "p_holm"}
    return _with_holm(pl.DataFrame(rows, schema=schema, orient="row")).select(SUMMARY_SCHEMA.keys())


def _with_holm(summary: pl.DataFrame) -> pl.DataFrame:
    """Add ``p_holm`` over the pruned variants of each task and metric (dense vs itself is no test)."""
    tested = summary.with_row_index("_row").filter((pl.col("strategy") != DENSE) & pl.col("p_value").is_not_null())
    adjusted = [
        pl.DataFrame({"_row": group["_row"], "p_holm": holm_adjust(group["p_value"].to_list())},
                     schema={"_row": pl.UInt32, "p_holm": pl.Float64})
        for _, group in tested.group_by(["task", "metric"], maintain_order=True)
    ]
    joined = pl.concat(adjusted) if adjusted else pl.DataFrame(schema={"_row": pl.UInt32, "p_holm": pl.Float64})
    return summary.with_row_index("_row").join(joined, on="_row", how="left", maintain_order="left").drop("_row")


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


def _summary_row(variant: pl.DataFrame, dense: pl.DataFrame | None, samples: int, seed: int) -> tuple:
    first = variant.row(0, named=True)
    key = (first["variant"], first["strategy"], first["params"], first["task"], first["metric"])
    if variant["correct"].null_count() == 0:
        return key + _accuracy_stats(variant, dense)
    if variant["correct"].null_count() == variant.height and _has_perplexity(variant):
        return key + _perplexity_stats(variant, dense, samples, seed)
    raise PrunelabError(f"{' / '.join(key[i] for i in (0, 3, 4))}: rows mix correct/incorrect with "
                        "missing values; accuracy rows need `correct`, perplexity rows `nll_sum` and `tokens`")


def _has_perplexity(frame: pl.DataFrame) -> bool:
    return all(c in frame.columns and frame[c].null_count() == 0 for c in PERPLEXITY_COLUMNS)


def _paired(variant: pl.DataFrame, dense: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """The items both have, dense columns suffixed ``_dense``, in item order."""
    return (variant.select("item_id", *columns)
            .join(dense.select("item_id", *columns), on="item_id", how="inner", suffix="_dense")
            .sort("item_id"))


def _accuracy_stats(variant: pl.DataFrame, dense: pl.DataFrame | None) -> tuple:
    n = variant.height
    k = int(variant["correct"].sum())
    low, high = wilson_interval(k, n)
    stats: tuple = ("accuracy", n, k, k / n, None, low, high)
    pairs = _paired(variant, dense, ["correct"]) if dense is not None else None
    if pairs is None or pairs.height == 0:
        return stats + (0, None, None, None, None, None, None, None)
    cmp = paired_comparison(pairs["correct_dense"].to_numpy(), pairs["correct"].to_numpy())
    return stats + (cmp.n, cmp.base_accuracy, cmp.difference, cmp.lost, cmp.gained, cmp.p_value,
                    cmp.significant_drop, "exact McNemar")


def _perplexity_stats(variant: pl.DataFrame, dense: pl.DataFrame | None, samples: int, seed: int) -> tuple:
    value = perplexity(variant["nll_sum"], variant["tokens"])
    low, high = bootstrap_perplexity_interval(variant["nll_sum"], variant["tokens"], samples, seed)
    stats: tuple = ("perplexity", variant.height, None, None, value, low, high)
    pairs = _paired(variant, dense, ["nll_sum", "tokens"]) if dense is not None else None
    if pairs is None or pairs.height == 0:
        return stats + (0, None, None, None, None, None, None, None)
    if (pairs["tokens"] != pairs["tokens_dense"]).any():
        raise PrunelabError(f"{variant['variant'][0]} / {variant['task'][0]}: windows differ in token "
                            "count from the dense run's; the evaluation settings do not match")
    dense_ppl = perplexity(pairs["nll_sum_dense"], pairs["tokens_dense"])
    diff = perplexity(pairs["nll_sum"], pairs["tokens"]) - dense_ppl
    p = paired_bootstrap_p_value(pairs["nll_sum_dense"], pairs["nll_sum"], pairs["tokens"], samples, seed)
    # higher perplexity is worse
    return stats + (pairs.height, dense_ppl, diff, None, None, p, bool(p < ALPHA and diff > 0),
                    f"paired bootstrap over windows (B={samples})")
