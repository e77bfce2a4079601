"""Strategy ``sparsegpt``: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023).

Per Linear, from H = 2 X X^T of its calibration inputs (damped by a fraction of the mean diagonal):
the columns are swept in blocks; inside a block the mask is chosen by w^2 / [H^-1]_jj^2 (adaptive
per block for unstructured sparsity, per group of M columns for N:M), every pruned weight's error is
spread over the not-yet-visited columns of its row through the Cholesky factor of H^-1, and the
block's accumulated error updates the rest of the matrix at once. This follows the reference
``SparseGPT.fasterprune``, except that the k weights to prune are picked by index (exact counts
under ties) instead of ``score <= threshold``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.plugin import Option, Strategy, hookimpl
from prunelab.prune import (
    PruneContext,
    allocation_options,
    calibrated_prune,
    mask_from_scores,
    nm_mask,
    pattern_option,
    sparsity_option,
    weights_axis,
)

DEFAULT_BLOCKSIZE = 128
DEFAULT_DAMP = 0.01


class Hessian:
    """SparseGPT's H = 2/n * sum over samples of X X^T, kept as a running mean in float32.

    ``n`` counts calibration samples (sequences), as in the reference code; the scale does not
    matter to the result (damping is relative to the mean diagonal).
    """

    def __init__(self, module: nn.Linear) -> None:
        self.H = torch.zeros(module.in_features, module.in_features, dtype=torch.float32, device=module.weight.device)
        self.samples = 0
        self._inverse: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, inputs: torch.Tensor) -> None:
        self.H *= self.samples / (self.samples + 1)
        self.samples += 1
        x = inputs.float() * (2 / self.samples) ** 0.5
        self.H.addmm_(x.T, x)

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 up to a common factor (the diagonal), so OWL/Wanda scores work from a Hessian too."""
        return self.H.diagonal().clamp(min=0).sqrt()

    def inverse_cholesky(self, damp_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(upper Cholesky factor of the damped H^-1, dead-column mask), cached: q/k/v share one H."""
        if damp_fraction not in self._inverse:
            H = self.H.clone()
            dead = H.diagonal() == 0
            H[dead, dead] = 1
            damp = damp_fraction * H.diagonal().mean()
            for _ in range(6):  # grow the damping if H is numerically not positive definite
                try:
                    L = torch.linalg.cholesky(H + damp * torch.eye(len(H), device=H.device))
                    break
                except torch.linalg.LinAlgError:
                    damp = damp * 10 if damp > 0 else 1e-6 * H.diagonal().abs().mean().clamp(min=1e-12)
            else:
                raise PrunelabError("SparseGPT: the Hessian is not positive definite even with strong damping")
            inverse = torch.cholesky_inverse(L)
            self._inverse[damp_fraction] = (torch.linalg.cholesky(inverse, upper=True), dead)
        return self._inverse[damp_fraction]


@torch.no_grad()
def sparsegpt_prune_weight(
    weight: torch.Tensor, hessian: Hessian, sparsity: float, nm: tuple[int, int] | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE, damp: float = DEFAULT_DAMP,
) -> torch.Tensor:
    """Prune ``weight`` (out x in) in place with reconstruction; return its keep-mask (True = kept)."""
    if nm is not None and blocksize % nm[1]:
        raise PrunelabError(f"SparseGPT block size {blocksize} must be a multiple of M={nm[1]} for {nm[0]}:{nm[1]}")
    W = weight.detach().float().clone()
    Hinv, dead = hessian.inverse_cholesky(damp)
    W[:, dead] = 0  # inputs that were always zero carry no information
    rows, columns = W.shape
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        # The block is processed transposed (columns as contiguous rows): much faster on CPU.
        T1 = W[:, i1:i2].T.contiguous()
        Err1 = torch.zeros_like(T1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        if nm is None:  # adaptive mask: the block's lowest w^2 / d^2 go, exactly round(sparsity * size)
            prune1 = ~mask_from_scores(T1 ** 2 / d[:, None] ** 2, sparsity, scope="layer")
        else:
            prune1 = torch.zeros_like(T1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose the group's mask on the updated weights
                group = T1[i : i + nm[1]] ** 2 / d[i : i + nm[1], None] ** 2
                prune1[i : i + nm[1]] = ~nm_mask(group.T, *nm).T
            err = T1[i] * prune1[i] / d[i]  # OBS: the pruned weights' error, zero for kept ones
            T1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # spread it over the remaining columns
            Err1[i] = err
        T1.masked_fill_(prune1, 0)  # exact zeros (the update leaves ~1e-8 where w was pruned)
        W[:, i1:i2] = T1.T
        keep[:, i1:i2] = ~prune1.T
        W[:, i2:] -= Err1.T @ Hinv[i1:i2, i2:]
    keep[:, dead] = False
    weight.copy_(W.to(weight.dtype))
    return keep


def prune(model, options: dict[str, Any], context: PruneContext) -> dict[str, Any]:
    blocksize, damp = options["blocksize"], options["damp"]

    def prune_linear(module: nn.Linear, stat: Hessian, sparsity: float, nm) -> torch.Tensor:
        return sparsegpt_prune_weight(module.weight, stat, sparsity, nm, blocksize, damp)

    report = calibrated_prune(model, options, context, Hessian, prune_linear)
    return {**report, "blocksize": blocksize, "damp": damp}


@hookimpl
def prunelab_strategies() -> list[Strategy]:
    return [Strategy(
        name="sparsegpt",
        description="SparseGPT: Hessian-based one-shot pruning with weight reconstruction",
        prune=prune,
        options=(
            sparsity_option(), pattern_option(), *allocation_options(),
            Option("blocksize", int, DEFAULT_BLOCKSIZE, "columns per block of the sweep",
                   check=lambda v: None if v >= 1 else "must be a positive integer"),
            Option("damp", float, DEFAULT_DAMP, "damping as a fraction of the mean Hessian diagonal (0.01 = 1%)",
                   check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        ),
        needs_calibration=True,
        size=(weights_axis(),),
    )]
