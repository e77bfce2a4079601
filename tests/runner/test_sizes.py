"""Sizes follow what a variant is, not what its options are called (issues #23, #25).

Test-only strategies play third-party plugins: ``odd-k`` removes k + 1 layers (its ``k = 2`` is
drawn at 3 layers removed), ``fraction-zero`` zeroes a fraction named ``share`` (it gets the
sparsity chart), ``mlp-shrink`` cuts MLP channels and updates the config (a width chart, hand-counted
parameters), ``broken-shrink`` forgets the config (refused before it is scored or saved).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.model import drop_layers, load_model
from prunelab.plugin import Option, SizeAxis, Strategy
from prunelab.prune import prune
from prunelab.registry import KindRegistry, PluginInfo, default_registry
from prunelab.report import artifacts
from prunelab.runner.run import run_study
from prunelab.runner.studyfile import load_study

from ..conftest import cli, study_text

pytestmark = pytest.mark.usefixtures("one_thread")


def _odd_k(model, options: dict[str, Any], context) -> dict[str, Any]:
    return drop_layers(context.adapter, range(options["k"] + 1))  # one more than k: the chart must not trust k


def _fraction_zero(model, options: dict[str, Any], context) -> dict[str, Any]:
    with torch.no_grad():
        for index in range(context.adapter.num_layers):
            for linear in context.adapter.linear_modules(index).values():
                linear.weight[:, : round(options["share"] * linear.weight.shape[1])] = 0
    return {}


def _shrink_mlp(model, options: dict[str, Any], context, update_config: bool = True) -> dict[str, Any]:
    config = context.adapter.text_config
    total = config.intermediate_size
    keep = round(total * (1 - options["cut"]))
    for layer in context.adapter.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, keep, bias=False)
            new.weight = nn.Parameter(old.weight[:keep].detach().clone())
            setattr(mlp, name, new)
        down = nn.Linear(keep, mlp.down_proj.out_features, bias=False)
        down.weight = nn.Parameter(mlp.down_proj.weight[:, :keep].detach().clone())
        mlp.down_proj = down
    if update_config:
        config.intermediate_size = keep
    return {"shrunk": {"channels": [total, keep]}}  # a field of its own: the core reads it only through `achieved`


def _shrunk(report: dict[str, Any]) -> float:
    """``SizeAxis.achieved`` of mlp-shrink: the fraction it reports it removed (whole channels)."""
    total, keep = report["shrunk"]["channels"]
    return 1 - keep / total


def _fraction(name: str) -> Option:
    return Option(name, float, None, "fraction to remove", required=True,
                  check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")


TEST_STRATEGIES = [
    Strategy("odd-k", "removes k + 1 layers", _odd_k, (Option("k", int, None, "k", required=True),),
             size=(SizeAxis("layers", option="k", label="layers removed"),)),
    Strategy("fraction-zero", "zeroes the first columns", _fraction_zero, (_fraction("share"),),
             size=(SizeAxis("weights", option="share", label="sparsity"),)),
    Strategy("mlp-shrink", "cuts MLP channels", _shrink_mlp, (_fraction("cut"),),
             size=(SizeAxis("width", option="cut", label="MLP channels", achieved=_shrunk),)),
    Strategy("broken-shrink", "cuts MLP channels, forgets the config",
             lambda m, o, c: _shrink_mlp(m, o, c, update_config=False), (_fraction("cut"),),
             size=(SizeAxis("width", option="cut", label="MLP channels"),)),
    Strategy("lying-depth", "declares layer 0, removes 0 and 1", lambda m, o, c: drop_layers(c.adapter, [0, 1]),
             (Option("layers", str, "0", "ignored"),), removes_layers=lambda o: [0]),
]


@pytest.fixture(scope="module")
def test_strategies():
    """The test strategies in the registry, as if installed (removed again after the module)."""
    with pytest.MonkeyPatch.context() as patch:
        installed(patch)
        yield patch


def installed(patch: pytest.MonkeyPatch) -> None:
    registry = default_registry()
    added = {s.name: (s, PluginInfo(s.name, "tests", "tests", "0")) for s in TEST_STRATEGIES}
    patch.setattr(registry, "strategies", KindRegistry("strategy", {**registry.strategies, **added}))


STRATEGIES = """
[[strategies]]
name = "drop-layers"
layers = "each"

[[strategies]]
name = "odd-k"
k = [0, 2]

[[strategies]]
name = "fraction-zero"
share = [0.5]

[[strategies]]
name = "mlp-shrink"
cut = [0.25, 0.3]

[[strategies]]
name = "magnitude"
sparsity = [50]

[[strategies]]
name = "width"
mlp = [0.5]
importance = "magnitude"

[[strategies]]
name = "width"
mlp = [0.5]
heads = [0.5]
importance = "magnitude"

[[strategies]]
name = "width"
mlp = [0.3]
round_to = 32
importance = "magnitude"
"""
WIDTH_MLP = "width[mlp=0.5,importance=magnitude]"
WIDTH_COMBINED = "width[mlp=0.5,heads=0.5,importance=magnitude]"
WIDTH_ROUNDED = "width[mlp=0.3,round_to=32,importance=magnitude]"


def hand_count(config) -> dict[str, int]:
    """Parameters of a tied Qwen3 from its config alone: the reference the recorded counts must equal."""
    h, heads, kv, hd, inter = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                               config.head_dim, config.intermediate_size)
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd  # q, k, v, o, q_norm, k_norm
    layer = attention + 3 * h * inter + 2 * h  # gate, up, down, two norms
    embedding = config.vocab_size * h  # tied: the head is the embedding
    return {"layer": layer, "mlp_channel": 3 * h, "embedding": embedding,
            "total": embedding + config.num_hidden_layers * layer + h}


@pytest.fixture(scope="module")
def run(test_strategies, tiny_qwen3, small_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sizes")
    study = root / "sizes.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=STRATEGIES).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]'))
    torch.set_num_threads(1)
    return run_study(load_study(study), root / "out")


def chart_values(run: Path, name: str) -> list[dict[str, Any]]:
    """Every data row of one chart of a run, as its page embeds it."""
    from tests.report.test_artifacts import inline_values

    page = (run / "charts" / f"{name}.html").read_text()
    return inline_values(json.loads(re.search(r'id="prunelab-chart-specs">(.*?)</script>', page, re.S).group(1)))


def test_recorded_sizes_equal_the_hand_count_and_what_each_variant_did(run, tiny_qwen3):
    sizes = json.loads((run / "manifest.json").read_text())["sizes"]
    config = load_model(str(tiny_qwen3), dtype="float32").model.config
    count = hand_count(config)
    dense = sizes["dense"]
    assert dense["parameters"] == count["total"] and dense["removed_layers"] == []
    assert dense["non_embedding_parameters"] == count["total"] - count["embedding"]
    for i in range(4):  # the layer sweep never builds these: dense less the layer
        swept = sizes[f"drop-layers[layers={i}]"]
        assert swept["removed_layers"] == [i] and swept["parameters"] == count["total"] - count["layer"]
    for k in (0, 2):
        plan = sizes[f"odd-k[k={k}]"]
        assert plan["removed_layers"] == list(range(k + 1))  # read from the model, not from k
        assert plan["parameters"] == count["total"] - (k + 1) * count["layer"]
        assert plan["axes"] == [{"kind": "layers", "option": "k", "label": "layers removed", "amount": k + 1,
                                 "requested": None}]
    for cut, kept in ((0.25, 96), (0.3, 90)):  # by hand: 128 x 0.75 = 96; round(128 x 0.7 = 89.6) = 90
        width = sizes[f"mlp-shrink[cut={cut}]"]
        removed = (config.intermediate_size - kept) * 4 * count["mlp_channel"]
        assert width["parameters"] == count["total"] - removed and width["removed_layers"] == []
        # drawn at what its own report says it removed (its declared `achieved`), the option beside it
        assert width["axes"][0]["amount"] == 1 - kept / 128 and width["axes"][0]["requested"] == cut
    zeroed = sizes["fraction-zero[share=0.5]"]
    assert zeroed["parameters"] == count["total"]  # zeros are stored
    assert zeroed["zero_parameters"] - dense["zero_parameters"] == 4 * (count["layer"] - 2 * 64 - 2 * 32) // 2
    assert sizes["magnitude[sparsity=50]"]["axes"][0]["amount"] == 0.5
    # the built-in width strategy: half the MLP channels; with heads = 0.5 also one query head of each
    # of the 2 KV groups (q rows and o columns of head_dim each)
    mlp_gone = 4 * (config.intermediate_size // 2) * count["mlp_channel"]
    heads_gone = 4 * 2 * config.head_dim * 2 * config.hidden_size
    assert sizes[WIDTH_MLP]["parameters"] == count["total"] - mlp_gone
    assert sizes[WIDTH_COMBINED]["parameters"] == count["total"] - mlp_gone - heads_gone
    assert [a["amount"] for a in sizes[WIDTH_COMBINED]["axes"]] == [0.5, 0.5, 0.0]
    # round_to = 32: 128 - round(38.4) = 90 channels to keep -> 96 (6 away; 64 is 26): 0.25 achieved of 0.3 asked
    rounded = sizes[WIDTH_ROUNDED]
    assert rounded["parameters"] == count["total"] - 4 * 32 * count["mlp_channel"]
    assert [(a["amount"], a["requested"]) for a in rounded["axes"]] == [(1 - 96 / 128, 0.3), (0.0, 0.0), (0.0, 0.0)]


def test_charts_follow_the_declarations_and_what_was_done(run):
    plans = [r for r in chart_values(run, "removal_plans") if r.get("strategy") == "odd-k"]
    assert sorted({(r["variant"], r["layers_removed"]) for r in plans}) == [("odd-k[k=0]", 1), ("odd-k[k=2]", 3)]
    assert {r["series"] for r in plans} == {"odd-k"}
    sparsity = {(r["series"], r["sparsity"]) for r in chart_values(run, "sparsity_sweep") if r.get("strategy") not in (None, "dense")}
    assert sparsity == {("fraction-zero", 50.0), ("magnitude", 50.0)}  # a fraction not named `sparsity` is charted
    width = {(r["variant"], r["width"]) for r in chart_values(run, "width_sweep_mlp_channels") if r.get("strategy") not in (None, "dense")}
    assert width == {("mlp-shrink[cut=0.25]", 25.0), ("mlp-shrink[cut=0.3]", 100 * (1 - 90 / 128)), (WIDTH_MLP, 50.0),
                     (WIDTH_ROUNDED, 25.0)}  # not combined; at the achieved fraction, not the option's
    layers = {r["layer"] for r in chart_values(run, "layer_sweep") if r.get("strategy") not in (None, "dense")}
    assert layers == {0, 1, 2, 3}  # only the one-layer sweep: not odd-k[k=0], which also removes one layer
    comparison = [r for r in chart_values(run, "size_comparison") if r.get("strategy") not in (None, "dense")]
    kept = {r["variant"]: r["kept"] for r in comparison}
    assert "drop-layers[layers=1]" not in kept and kept["fraction-zero[share=0.5]"] < 100
    assert {r["method"] for r in comparison} == {"odd-k", "mlp-shrink", "width mlp", "width mlp+heads",
                                                 "fraction-zero (non-zero weights, reference)",
                                                 "magnitude (non-zero weights, reference)"}
    table = pl.read_parquet(run / "equal_size.parquet")  # every variant keeps > 95 %: one bin per metric
    # four methods shrink the model and are ranked; the two weight-pruning ones are references beside them
    assert set(table["kept_low"]) == {95.0} and (table["methods"] == 4).all()
    assert set(table["reference_method"]) <= {"fraction-zero (non-zero weights, reference)",
                                              "magnitude (non-zero weights, reference)"}
    assert table["reference_variant"].null_count() == 0
    assert not set(table["best_method"]) & {"fraction-zero (non-zero weights, reference)",
                                            "magnitude (non-zero weights, reference)"}
    assert "At equal size" in (run / "report.html").read_text()


def test_report_of_an_archived_run_needs_no_plugin(run, test_strategies):
    before = {p.name: p.read_bytes() for p in (run / "charts").glob("*.html")}
    test_strategies.undo()  # the test strategies are gone, as if uninstalled
    try:
        assert "odd-k" not in default_registry().strategies
        artifacts.rebuild_run(run)
    finally:
        installed(test_strategies)
    after = {p.name: p.read_bytes() for p in (run / "charts").glob("*.html")}
    assert after == before


def test_older_records_are_drawn_at_what_they_recorded_and_an_older_run_reads_its_reports():
    """A size record made before ``requested`` existed: its amount was the options', so that is its
    requested amount too. A run made before size records: the achieved fraction comes from the prune
    report its manifest kept, through the strategy's declaration; without one the option stands."""
    from prunelab.report.sizes import VariantSize, legacy_size, run_sizes

    old = VariantSize.from_json({"removed_layers": [], "axes": [
        {"kind": "width", "option": "mlp", "label": "MLP channels", "amount": 0.3},
        {"kind": "layers", "option": "k", "label": "layers removed", "amount": 2.0}]})
    assert [(a.amount, a.requested) for a in old.axes] == [(0.3, 0.3), (2.0, None)]
    assert old.width_axes[0].percent == 30.0
    report = {"strategy": "width", "width": {"axes": {"mlp": {"before": 200, "after": 160, "removed_fraction": 0.2},
                                                      "heads": {"before": 4, "after": 4, "removed_fraction": 0.0},
                                                      "hidden": {"before": 96, "after": 96, "removed_fraction": 0.0}}}}
    params = {"mlp": 0.25, "round_to": 32, "importance": "magnitude"}
    manifest = {"variants": {"w": report}}
    sizes = run_sizes(manifest, [("w", "width", json.dumps(params)), ("v", "width", json.dumps(params))])
    assert (sizes["w"].width_axes[0].amount, sizes["w"].width_axes[0].requested) == (0.2, 0.25)
    assert (sizes["v"].width_axes[0].amount, sizes["v"].width_axes[0].requested) == (0.25, 0.25)  # no report kept
    assert legacy_size("width", params, {"width": {"axes": {}}}).width_axes[0].amount == 0.25  # not in the report


def test_a_shrunk_tensor_without_its_config_is_refused_naming_it(test_strategies, tiny_qwen3, tmp_path, capsys):
    status, err = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "broken-shrink", "--option", "cut=0.5",
                      "--out", str(tmp_path / "out"), "--dtype", "float32")
    assert status == 2
    assert "model.layers.0.mlp.gate_proj.weight has shape (64, 64)" in err and "(128, 64)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    status, err = cli(capsys, "prune", "--model", str(tiny_qwen3), "--method", "mlp-shrink", "--option", "cut=0.5",
                      "--out", str(tmp_path / "good"), "--dtype", "float32")
    assert status == 0, err
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "good")  # plain transformers loads what was saved
    assert reloaded.config.intermediate_size == 64
    assert json.loads((tmp_path / "good" / "prunelab.json").read_text())["removed_layers"] == []


def test_a_depth_strategy_must_remove_the_layers_it_declares(test_strategies, tiny_qwen3):
    loaded = load_model(str(tiny_qwen3), dtype="float32")
    with pytest.raises(PrunelabError, match=r"declares it removes layers \[0\] but removed \[0, 1\]"):
        prune(loaded, "lying-depth")
    report = prune(load_model(str(tiny_qwen3), dtype="float32"), "odd-k", k=1)
    assert report["removed_layers"] == [0, 1]


def test_a_study_with_a_broken_structural_strategy_stops_before_scoring_it(test_strategies, tiny_qwen3, small_data,
                                                                          tmp_path):
    study = tmp_path / "broken.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies='[[strategies]]\nname = "broken-shrink"\ncut = [0.5]\n')
                     .replace('tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]'))
    with pytest.raises(PrunelabError, match="down_proj|gate_proj"):
        run_study(load_study(study), tmp_path / "out")
    kept = pl.concat([pl.read_parquet(p) for p in (tmp_path / "out" / "tiny" / ".work").rglob("*.parquet")])
    assert set(kept["variant"]) == {"dense"}  # dense's finished chunks are kept for the fixed rerun
