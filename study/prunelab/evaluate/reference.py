"""What the dense model's evaluation leaves for its variants to be compared against.

Fidelity metrics (KL divergence to the dense model, top-1 agreement) need the dense model's output
on the very same inputs. The runner evaluates the dense model first; an evaluator that declares
``compares_with_dense`` saves it through the ``ReferenceStore`` it is handed (``options["reference"]``), one
safetensors file per task chunk in the run's work folder, written atomically before the chunk's rows
(a finished dense chunk always has its reference, also for a resumed run). A variant's evaluation
of the same chunk loads it. Other evaluators are handed no store (None).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prunelab.readers import atomic_write


class ReferenceStore:
    """The reference file of one task chunk: written by the dense model's evaluation, read by the others'."""

    def __init__(self, path: Path, is_dense: bool) -> None:
        self.path = path
        self.is_dense = is_dense

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Write the tensors atomically (a reader never sees half a file)."""
        if not self.is_dense:
            raise RuntimeError("only the dense model's evaluation writes the reference")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda staging: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                          str(staging), metadata=metadata or {}))

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The dense model's tensors and metadata for this chunk, or None when it left none."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(self.path)), metadata
