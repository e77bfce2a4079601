"""What the dense model's evaluation leaves for its variants to be compared against.

Fidelity metrics (KL divergence to the dense model, top-1 agreement) need the dense model's output
on the very same inputs. The runner evaluates the dense model first; an evaluator that declares
``compares_with_dense`` saves it through the ``ReferenceStore`` it is handed (``options["reference"]``), one
safetensors file per task chunk in the run's work folder, written atomically before the chunk's rows
(a finished dense chunk always has its reference, also for a resumed run). A variant's evaluation
of the same chunk loads it. Other evaluators are handed no store (None).

Beside the chunk files, once per run, the dense model's output head (``DENSE_HEAD_FILE``: weight,
bias if any, soft-capping, keyed by the head's fingerprint): a variant whose own head differs
(width's ``hidden`` axis, ``include_head`` pruning) turns the stored hidden states into the dense
logits with it. It is written before the first chunk reference, so every chunk reference has it; it
lives in the same folder, so it reaches Ray workers the way the chunk references do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prunelab.evaluate.engine import DenseHead
from prunelab.model.adapter import Adapter
from prunelab.readers import atomic_write

#: the dense output head, beside the chunk references (a chunk's file is ``<task>-<index:04d>.safetensors``)
DENSE_HEAD_FILE = "dense-head.safetensors"


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
        return load_file(str(self.path)), _metadata(self.path)

    @property
    def head_path(self) -> Path:
        """The run's one dense-head file, beside every chunk's reference."""
        return self.path.with_name(DENSE_HEAD_FILE)

    def save_head(self, adapter: Adapter) -> None:
        """Keep the dense model's output head for variants whose head differs: once per run (a file with
        this head's fingerprint is left as it is), atomically, in the model's dtype.

        Dense chunks may be evaluated at once by several Ray workers: each stages its own file.
        A head that is not a plain Linear is not kept (its variants get no KL where their head differs).
        """
        if not self.is_dense:
            raise RuntimeError("only the dense model's evaluation writes the dense head")
        head = DenseHead.of(adapter)
        if head is None or (self.head_path.is_file() and _metadata(self.head_path).get("head") == head.fingerprint):
            return
        tensors = {"weight": head.weight.contiguous().cpu()}
        if head.bias is not None:
            tensors["bias"] = head.bias.contiguous().cpu()
        metadata = {"head": head.fingerprint, "softcap": repr(head.softcap)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.head_path, lambda staging: save_file(tensors, str(staging), metadata=metadata), shared=True)

    def load_head(self, fingerprint: str) -> DenseHead | None:
        """The kept dense head if it is the one with ``fingerprint`` (the chunk reference's); None when
        there is none or it is another head's (a stale file is never used). Key and tensors are read
        through one open file, so they belong together."""
        if not self.head_path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.head_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("head") != fingerprint:
                return None
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
        softcap = metadata.get("softcap", "None")
        return DenseHead(tensors["weight"], tensors.get("bias"), None if softcap == "None" else float(softcap),
                         fingerprint)


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}
