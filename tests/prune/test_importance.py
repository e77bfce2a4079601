"""Layer importance (BI, angular distance, perplexity without a layer), Spearman, and `prunelab importance`."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import polars as pl
import pytest
import torch
from torch import nn

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.prune.layer_scores import (
    best_block,
    calibration_perplexity,
    importance_samples,
    importance_spec,
    layer_importance,
    removal_perplexities,
    representation_stats,
    score_layers,
)
from prunelab.report.importance import spearman, sweep_correlations
from prunelab.report.pages import LIBRARIES_ID
from tests.conftest import DATA, make_identity

WIKITEXT = DATA / "calibration" / "wikitext-2-valid.tokens.txt"



pytestmark = pytest.mark.usefixtures("one_thread")






@pytest.fixture(scope="module")
def tiny_loaded(tiny_qwen3):
    return load_model(str(tiny_qwen3), dtype="float32")


@pytest.fixture
def tiny(tiny_loaded):
    """A fresh copy of the tiny Qwen3 for each test (tests change its weights)."""
    model = copy.deepcopy(tiny_loaded.model)
    return dataclasses.replace(tiny_loaded, model=model, adapter=adapt(model))


@pytest.fixture
def samples(tiny_loaded, calibration_file) -> torch.Tensor:
    spec = importance_spec({"source": calibration_file, "samples": 2, "seqlen": 32})
    return importance_samples(tiny_loaded.adapter, tiny_loaded.tokenizer, spec, seed=0)


def reference_representations(loaded, tokens: torch.Tensor) -> list[torch.Tensor]:
    """x^0..x^L from Hugging Face's output_hidden_states with the final norm switched off (independent of hooks)."""
    decoder = loaded.adapter.decoder
    norm = decoder.norm
    decoder.norm = nn.Identity()
    try:
        with torch.no_grad():
            hidden = loaded.model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        decoder.norm = norm
    return [h[0].double() for h in hidden]


def test_bi_and_angular_match_a_direct_computation(tiny, samples):
    with torch.no_grad():  # a final norm that is not all ones (as in trained models) rescales each channel
        tiny.adapter.decoder.norm.weight.copy_(torch.linspace(0.2, 3.0, tiny.adapter.decoder.norm.weight.numel()))
    stats = representation_stats(tiny.adapter, samples)
    count = tiny.adapter.num_layers
    cos_sum = torch.zeros(count, dtype=torch.float64)
    angle_sum = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    for row in range(samples.shape[0]):
        x = reference_representations(tiny, samples[row : row + 1])
        assert len(x) == count + 1
        for i in range(count):
            cos_sum[i] += torch.nn.functional.cosine_similarity(x[i], x[i + 1], dim=-1).sum()
        for a in range(count + 1):
            for b in range(count + 1):
                cos = torch.nn.functional.cosine_similarity(x[a], x[b], dim=-1).clamp(-1, 1)
                angle_sum[a, b] += (torch.arccos(cos) / math.pi).sum()
    tokens = samples.numel()
    assert stats.tokens == tokens
    assert stats.block_influence == pytest.approx((1 - cos_sum / tokens).tolist(), abs=1e-9)
    assert torch.allclose(stats.angular, angle_sum / tokens, atol=1e-7)
    assert all(0 < b < 2 for b in stats.block_influence)
    # The last representation is the last layer's output BEFORE the final norm: with the norm (what
    # output_hidden_states returns as its last entry) the last layer's BI would differ.
    with torch.no_grad():
        normed = tiny.model(input_ids=samples[:1], output_hidden_states=True, use_cache=False).hidden_states
    cos_normed = torch.nn.functional.cosine_similarity(normed[count - 1][0].double(), normed[count][0].double(), dim=-1)
    x = reference_representations(tiny, samples[:1])
    cos_plain = torch.nn.functional.cosine_similarity(x[count - 1], x[count], dim=-1)
    assert not torch.allclose(cos_normed, cos_plain, atol=1e-3)


def test_last_token_averages_one_position_per_sample(tiny, samples):
    stats = representation_stats(tiny.adapter, samples, last_token=True)
    assert stats.tokens == samples.shape[0]
    totals = [0.0] * tiny.adapter.num_layers
    for row in range(samples.shape[0]):
        x = reference_representations(tiny, samples[row : row + 1])
        for i in range(len(totals)):
            totals[i] += float(torch.nn.functional.cosine_similarity(x[i][-1], x[i + 1][-1], dim=0))
    assert stats.block_influence == pytest.approx([1 - t / samples.shape[0] for t in totals], abs=1e-9)


def test_an_identity_layer_is_least_important_by_every_metric(tiny, samples):
    make_identity(tiny.adapter.layers[2])
    stats = representation_stats(tiny.adapter, samples)
    bi = score_layers(tiny.adapter, samples, "bi", stats)
    angular = score_layers(tiny.adapter, samples, "angular", stats)
    ppl = score_layers(tiny.adapter, samples, "ppl")
    assert abs(bi.scores[2]) < 1e-9 and abs(angular.scores[2]) < 1e-6
    assert min(s for i, s in enumerate(bi.scores) if i != 2) > 0.01
    baseline = ppl.extra["baseline_perplexity"]
    assert ppl.extra["perplexity"][2] == pytest.approx(baseline, rel=1e-5)  # removing it changes nothing
    assert all(abs(s) > 1e-3 * baseline for i, s in enumerate(ppl.scores) if i != 2)
    for scores in (bi, angular):
        assert scores.least_important(1) == [2]
    # ppl: skipping a random layer may even help a random model, so only "no change" is certain here
    assert calibration_perplexity(tiny.adapter, samples, skip=[2]) == pytest.approx(baseline, rel=1e-5)


def test_best_block_finds_two_identity_layers(tiny, samples):
    for index in (1, 2):
        make_identity(tiny.adapter.layers[index])
    stats = representation_stats(tiny.adapter, samples)
    start, distance = best_block(stats, 2)
    assert (start, distance) == (1, pytest.approx(0, abs=1e-6))
    assert best_block(stats, 1)[0] in (1, 2)
    with pytest.raises(PrunelabError, match="between 1 and 3"):
        best_block(stats, 4)


def test_skipping_equals_removing_the_layer(tiny, samples):
    """The ppl proxy (skip a layer) gives the perplexity of the model with the layer really removed."""
    from prunelab.model.surgery import drop_layers

    skipped = calibration_perplexity(tiny.adapter, samples, skip=[1])
    swept = removal_perplexities(tiny.adapter, samples)  # the layer sweep, every layer at once
    assert swept == pytest.approx({i: calibration_perplexity(tiny.adapter, samples, skip=[i]) for i in range(4)},
                                  rel=1e-5)
    drop_layers(tiny, [1])
    assert skipped == pytest.approx(calibration_perplexity(tiny.adapter, samples), rel=1e-6)


def test_layer_importance_table_and_summary(tiny, calibration_file):
    calibration = {"source": calibration_file, "samples": 2, "seqlen": 32}
    result = layer_importance(tiny, ["bi", "angular"], n=2, calibration=calibration)
    table = result.table()
    layers = tiny.adapter.num_layers
    assert table.filter(pl.col("n") == 1).height == 2 * layers
    # angular: every block size n of every start, ranked within (metric, n)
    assert table.filter(pl.col("metric") == "angular").height == sum(layers - n + 1 for n in range(1, layers + 1))
    for (_, _), group in table.group_by(["metric", "n"]):
        assert sorted(group["rank"].to_list()) == list(range(1, group.height + 1))
    best = result.best_block()
    two = table.filter((pl.col("metric") == "angular") & (pl.col("n") == 2)).sort("rank")
    assert best["layers"] == [two["layer"][0], two["layer"][0] + 1]
    assert result.calibration == {**calibration, "seed": 0}


# ------------------------------------------------------------------------------------ Spearman
def test_spearman_against_hand_computations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # monotone but non-linear: rank correlation is exactly 1 where Pearson is not
    assert spearman([1, 2, 3, 4, 5], [1, 8, 27, 64, 1000]) == pytest.approx(1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def sweep_summary(harm_by_layer: dict[int, float]) -> pl.DataFrame:
    """A summary table as the runner writes it: dense plus single-layer drop-layers variants."""
    rows = [{"variant": "dense", "strategy": "dense", "params": "{}", "task": "mmlu", "metric": "acc",
             "kind": "accuracy", "diff_vs_dense": None}]
    for layer, harm in harm_by_layer.items():
        rows.append({"variant": f"drop-layers[layers={layer}]", "strategy": "drop-layers",
                     "params": json.dumps({"layers": layer}), "task": "mmlu", "metric": "acc",
                     "kind": "accuracy", "diff_vs_dense": -harm})
        rows.append({"variant": f"drop-layers[layers={layer}]", "strategy": "drop-layers",
                     "params": json.dumps({"layers": str(layer)}), "task": "wikitext", "metric": "word_perplexity",
                     "kind": "perplexity", "diff_vs_dense": 10 * harm})
    return pl.DataFrame(rows)


def test_sweep_correlations_read_accuracy_drops_and_perplexity_increases():
    from prunelab.prune.layer_scores import LayerScores

    scores = {"bi": LayerScores("bi", [0.9, 0.1, 0.3, 0.2]), "ppl": LayerScores("ppl", [1.0, 2.0, 3.0, 4.0])}
    summary = sweep_summary({0: 0.30, 1: 0.01, 2: 0.05, 3: 0.02})
    table = sweep_correlations(scores, summary)
    rho = {(r["importance_metric"], r["task"]): r["spearman"] for r in table.iter_rows(named=True)}
    assert rho[("bi", "mmlu")] == pytest.approx(1.0)  # bigger BI <-> bigger accuracy drop
    assert rho[("bi", "wikitext")] == pytest.approx(1.0)  # bigger BI <-> bigger perplexity increase
    assert rho[("ppl", "mmlu")] == pytest.approx(spearman([1, 2, 3, 4], [0.30, 0.01, 0.05, 0.02]))
    assert set(table["layers"].to_list()) == {4}
    with pytest.raises(PrunelabError, match="different model"):
        sweep_correlations({"bi": LayerScores("bi", [0.1, 0.2])}, summary)
    with pytest.raises(PrunelabError, match="lacks columns"):
        sweep_correlations(scores, summary.drop("diff_vs_dense"))


# ------------------------------------------------------------------------------------ CLI
def test_importance_cli_writes_table_chart_and_correlation(tiny_qwen3, calibration_file, tmp_path, capsys):
    sweep = tmp_path / "summary.parquet"
    sweep_summary({0: 0.3, 1: 0.1, 2: 0.05, 3: 0.2}).write_parquet(sweep)
    out = tmp_path / "importance"
    args = ["importance", "--model", str(tiny_qwen3), "--dtype", "float32", "--metric", "bi,angular",
            "--n", "2", "--samples", "2", "--seqlen", "32", "--calibration", calibration_file,
            "--sweep", str(sweep), "--out", str(out)]
    assert main(args) == 0
    table = pl.read_parquet(out / "importance.parquet")
    assert set(table["metric"]) == {"bi", "angular"}
    assert pl.read_csv(out / "importance.csv").height == table.height
    summary = json.loads((out / "importance.json").read_text())
    assert summary["best_block"]["n"] == 2 and len(summary["order"]["bi"]) == 4
    assert {r["task"] for r in summary["spearman_vs_sweep"]} == {"mmlu", "wikitext"}
    html = (out / "importance.html").read_text()
    assert html.count(f'id="{LIBRARIES_ID}"') == 1 and "vegaEmbed" in html
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(args) == 2  # earlier results are never overwritten silently
    assert "already has importance.parquet" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--metric", "bi,foo"], "unknown importance metric"),
    (["--samples", "0"], "calibration samples must be a positive integer"),
    (["--sweep", "/no/such/summary.parquet"], "sweep summary not found"),
])
def test_importance_cli_bad_input_is_one_line(args, fragment, tmp_path, capsys):
    code = main(["importance", "--model", "/no/such/model", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
