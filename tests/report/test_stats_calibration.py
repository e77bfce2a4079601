"""The paired tests hold their level and the intervals their coverage at the sample sizes studies use.

Simulated null data (a variant no different from dense): the false-positive rate at alpha = 0.05
must stay <= 0.06, and 95% intervals must cover the true value in 93-97% of simulations. Vectorised
(one matrix product per sample size) so the whole file runs in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunelab.report.stats import (
    ALPHA,
    mcnemar_exact,
    newcombe_paired_interval,
    sign_flip_test,
    t_interval,
    wilson_interval,
)

SIMULATIONS = 4000


def windows(rng: np.random.Generator, n: int, shift: float, noise: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-window mean NLL per token of dense and a variant, (SIMULATIONS, n) each.

    Windows differ in difficulty (shared by both models, as on real text); each model adds its own
    per-window noise, normal or heavy-tailed (t with 3 degrees of freedom); the variant is worse by
    ``shift`` nats per token (log of the perplexity ratio).
    """
    difficulty = rng.normal(2.5, 0.4, size=(SIMULATIONS, n))
    draw = (lambda: rng.normal(0, 0.05, size=(SIMULATIONS, n))) if noise == "normal" else (
        lambda: 0.05 * rng.standard_t(3, size=(SIMULATIONS, n)))
    return difficulty + draw(), difficulty + shift + draw()


@pytest.mark.parametrize("noise", ["normal", "heavy-tailed"])
@pytest.mark.parametrize("n", [8, 24, 140])
def test_sign_flip_test_holds_its_level_and_t_interval_covers(n, noise):
    rng = np.random.default_rng(n)
    dense, variant = windows(rng, n, 0.0, noise)
    p, exact = sign_flip_test(variant - dense, resamples=999)
    assert exact == (n <= 20)
    assert np.mean(p < ALPHA) <= 0.06

    shift = 0.1  # the variant's perplexity is e^0.1 = 1.105 x dense
    dense, variant = windows(rng, n, shift, noise)
    differences = variant - dense
    covered = 0
    for row in differences:
        low, high = t_interval(row)
        covered += math.expm1(low) <= math.expm1(shift) <= math.expm1(high)  # the relative change's interval
    assert 0.93 <= covered / SIMULATIONS <= 0.97


@pytest.mark.parametrize(("n", "accuracy"), [(57, 0.25), (57, 0.6), (1404, 0.25), (1404, 0.6)])
def test_mcnemar_holds_its_level_and_accuracy_intervals_cover(n, accuracy):
    """Paired items of varying difficulty; dense and the variant answer independently with the same
    per-item chance, so neither is better (MMLU-sized: 57 questions, or 1404)."""
    rng = np.random.default_rng(n)
    sims = 2000
    difficulty = rng.beta(2 * accuracy / (1 - accuracy), 2, size=(sims, n))  # mean = accuracy
    dense = rng.random((sims, n)) < difficulty
    variant = rng.random((sims, n)) < difficulty
    lost = np.sum(dense & ~variant, axis=1)
    gained = np.sum(~dense & variant, axis=1)
    assert np.mean(mcnemar_exact(lost, gained) < ALPHA) <= 0.06

    # Wilson covers the true accuracy of i.i.d. items; Newcombe's paired interval the true difference 0
    low, high = wilson_interval(rng.binomial(n, accuracy, size=sims), n)
    assert 0.93 <= np.mean((low <= accuracy) & (accuracy <= high)) <= 0.97
    both = np.sum(dense & variant, axis=1)
    low, high = newcombe_paired_interval(both, lost, gained, n - both - lost - gained)
    assert 0.93 <= np.mean((low <= 0) & (high >= 0)) <= 0.97
