"""SparseGPT: the blocked Cholesky sweep equals naive OBS; it reconstructs better than magnitude/Wanda."""

from __future__ import annotations

import warnings

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.masks import mask_from_scores, nm_mask
from prunelab_plugins.sparsegpt import Hessian, sparsegpt_prune_weight
from prunelab_plugins.wanda import wanda_keep_mask
from tests.conftest import DATA

CALIBRATION = {"source": str(DATA / "calibration" / "wikitext-2-valid.tokens.txt"), "samples": 4, "seqlen": 32}


def correlated_inputs(samples: int = 4, tokens: int = 64, features: int = 32, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features of very different scales, like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / features ** 0.5 + torch.eye(features)
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=gen)]
    return (torch.randn(samples, tokens, features, generator=gen) @ mixing) * scales


def hessian_of(X: torch.Tensor) -> Hessian:
    module = torch.nn.Linear(X.shape[-1], 1)
    stat = Hessian(module)
    for sample in X:
        stat.update(sample)
    return stat


def naive_obs(W: torch.Tensor, H: torch.Tensor, sparsity: float, blocksize: int, damp: float, nm=None) -> torch.Tensor:
    """SparseGPT written directly from the paper: explicit inverses of H restricted to the remaining columns.

    Column j is pruned with OBS: the row's error (w - q) / [H_F^-1]_jj times row j of H_F^-1 is
    subtracted from the columns F = {j, j+1, ...} not yet fixed. The mask of each block is chosen at
    the block's start from w^2 / [H_F^-1]_jj (or per group of M columns when they are reached).
    """
    W = W.double().clone()
    H = H.double() + damp * H.diagonal().mean() * torch.eye(len(H), dtype=torch.float64)
    rows, cols = W.shape
    prune = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        inverse = torch.linalg.inv(H[j:, j:])
        if nm is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            saliency = torch.stack([W[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, end)], dim=1)
            prune[:, j:end] = ~mask_from_scores(saliency.float(), sparsity, scope="layer")
        if nm is not None and j % nm[1] == 0:
            saliency = torch.stack([W[:, c] ** 2 / torch.linalg.inv(H[c:, c:])[0, 0] for c in range(j, j + nm[1])], 1)
            prune[:, j : j + nm[1]] = ~nm_mask(saliency.float(), *nm)
        error = torch.where(prune[:, j], W[:, j], torch.zeros_like(W[:, j])) / inverse[0, 0]
        W[:, j:] -= error[:, None] * inverse[0][None, :]
        W[prune[:, j], j] = 0
    return W.float()


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_blocked_cholesky_sweep_equals_naive_obs(nm):
    X = correlated_inputs(features=24)
    stat = hessian_of(X)
    W = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    expected = naive_obs(W, stat.H, 0.5, blocksize=8, damp=0.01, nm=nm)
    pruned = W.clone()
    keep = sparsegpt_prune_weight(pruned, stat, 0.5, nm, blocksize=8, damp=0.01)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(keep, expected != 0)
    assert int((~keep).sum()) == W.numel() // 2


def reconstruction_error(W: torch.Tensor, pruned: torch.Tensor, X: torch.Tensor) -> float:
    flat = X.reshape(-1, X.shape[-1])
    return float((flat @ W.T - flat @ pruned.T).norm())


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    X = correlated_inputs(features=64, tokens=128)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    norms = X.reshape(-1, 64).norm(dim=0)
    magnitude = W * (mask_from_scores(W.abs(), 0.5, scope="row") if nm is None else nm_mask(W.abs(), *nm))
    wanda = W * wanda_keep_mask(W, norms, 0.5, nm)
    sparsegpt = W.clone()
    sparsegpt_prune_weight(sparsegpt, hessian_of(X), 0.5, nm)
    errors = {name: reconstruction_error(W, p, X) for name, p in
              [("magnitude", magnitude), ("wanda", wanda), ("sparsegpt", sparsegpt)]}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    for pruned in (magnitude, wanda, sparsegpt):
        assert int((pruned == 0).sum()) == W.numel() // 2


def test_dead_inputs_are_pruned_and_damping_rescues_a_singular_hessian():
    X = correlated_inputs(features=16)
    X[..., 3] = 0  # an input feature that is never active: its Hessian row/column is zero
    stat = hessian_of(X)
    W = torch.randn(4, 16)
    keep = sparsegpt_prune_weight(W, stat, 0.25, damp=0.0)
    assert not keep[:, 3].any() and (W[:, 3] == 0).all()
    assert torch.isfinite(W).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_on_a_tiny_model(tiny_qwen3, pattern):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(tiny_qwen3), dtype="float32")
    embedding = lm.adapter.embedding.weight.clone()
    report = prune(lm, "sparsegpt", sparsity=50, pattern=pattern, calibration=CALIBRATION)
    assert report["sparsity"]["total"]["sparsity_pct"] == 50.0
    assert all(v["sparsity_pct"] == 50.0 for v in report["sparsity"]["per_layer"].values())
    assert report["blocksize"] == 128 and report["damp"] == 0.01
    assert torch.equal(lm.adapter.embedding.weight, embedding)  # tied embedding/head untouched
    for name, keep in report.masks.items():
        weight = lm.adapter.layers[int(name.split(".")[1])].get_parameter(name.split(".", 2)[2])
        assert torch.equal(keep, weight != 0)
        if pattern == "2:4":
            assert ((weight.reshape(-1, 4) != 0).sum(dim=1) == 2).all(), name


def test_sparsegpt_bad_options(tiny_qwen3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(str(tiny_qwen3), dtype="float32")
    with pytest.raises(PrunelabError, match="blocksize"):
        prune(lm, "sparsegpt", blocksize=0, calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="damp"):
        prune(lm, "sparsegpt", damp=2, calibration=CALIBRATION)
    with pytest.raises(PrunelabError, match="multiple of M"):
        prune(lm, "sparsegpt", pattern="4:8", blocksize=12, calibration=CALIBRATION)
