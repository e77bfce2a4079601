"""The vocabulary of a run's records, defined once for every stage.

The runner writes one row per (variant, task, metric, item); the report reads those rows back, also
from an archived run years later. Both spell the names through this module: the dense baseline's
variant (and strategy) name, and the per-item table's columns with their types; and both name a
JSON record by the same digest (``json_digest``). A module in any stage may import it
(``tests/test_layout.py``: it sits at the bottom with ``errors`` and ``readers``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

#: The unpruned model's variant name and strategy: every comparison is against it.
DENSE = "dense"

# ---- the per-item table's columns (``items.parquet``), in the order the runner writes them
VARIANT = "variant"  # the variant's name: its strategy and grid point, e.g. ``magnitude[sparsity=0.5]``
STRATEGY = "strategy"  # the strategy that made it (``dense`` for the baseline, ``<strategy>+<method>`` healed)
PARAMS = "params"  # the grid point's options as JSON
TASK = "task"
METRIC = "metric"  # a ``MetricSpec.name`` the task declares
ITEM_ID = "item_id"
CORRECT = "correct"  # an accuracy metric's per-item outcome (None for other kinds)
VALUE = "value"  # a mean metric's per-item value
NLL_SUM = "nll_sum"  # a perplexity metric's summed negative log-likelihood of one window
TOKENS = "tokens"  # ... and the number of tokens it sums over

# ---- the bench table's columns (``bench.parquet``, a study's ``[bench]``: ``prunelab.model.bench.bench_rows``)
PREFILL_RATE = "prefill_tokens_per_s_len"  # + a prompt length: prefill tokens/s of one prompt (batch 1)
DECODE_RATE = "decode_tokens_per_s_batch"  # + a batch size: decode tokens/s
PREFILL_SPEEDUP = "prefill_speedup"  # prefill tokens/s at the longest prompt over dense's
DECODE_SPEEDUP = "decode_speedup"  # decode tokens/s at the first batch size over dense's

#: Every row has these columns, of these types; a task's own record fields follow them.
ITEM_SCHEMA: dict[str, pl.DataType] = {
    VARIANT: pl.String, STRATEGY: pl.String, PARAMS: pl.String, TASK: pl.String, METRIC: pl.String,
    ITEM_ID: pl.String, CORRECT: pl.Boolean, VALUE: pl.Float64, NLL_SUM: pl.Float64, TOKENS: pl.Int64,
}
#: What identifies a row and its accuracy outcome: the columns the statistics need of every table.
ITEM_COLUMNS = (VARIANT, STRATEGY, PARAMS, TASK, METRIC, ITEM_ID, CORRECT)
#: What a perplexity metric's rows carry instead of ``correct``.
PERPLEXITY_COLUMNS = (NLL_SUM, TOKENS)


def json_digest(document: Any) -> str:
    """SHA-256 of a JSON document in canonical form (sorted keys, no spacing): key order and
    spacing do not matter. A run's configuration hash (``prunelab.runner.identity``) and an
    importance run's version are this digest."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
