"""The evaluate stage: task data, the one batched scoring engine, the layer sweep that shares the dense
layers between single-layer removals, the dense reference for fidelity, and running tasks.

Public names (what plugins and scripts may import from ``prunelab.evaluate``) are listed in ``__all__``.
"""

from prunelab.evaluate.data import DataSource, Subset, load_hub_split, read_csv_rows, read_jsonl
from prunelab.evaluate.engine import (
    KL_ROWS,
    DenseHead,
    DenseReference,
    Engine,
    GenerationRequest,
    LoglikelihoodRequest,
    WindowScores,
    head_fingerprint,
    kl_from_logits,
)
from prunelab.evaluate.run import PreparedTask, evaluate, prepare_tasks, run_task

__all__ = [
    "KL_ROWS", "DataSource", "DenseHead", "DenseReference", "Engine", "GenerationRequest", "LoglikelihoodRequest", "PreparedTask",
    "Subset", "WindowScores", "evaluate", "head_fingerprint", "kl_from_logits", "load_hub_split", "prepare_tasks",
    "read_csv_rows", "read_jsonl", "run_task",
]
