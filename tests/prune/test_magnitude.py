"""Magnitude pruning and the shared mask core: exact sparsity per scope and order (ties included),
N:M group by group, only the targets change, masks re-apply, and bad options fail clearly."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.masks import (
    MaskSet,
    Percentage,
    PruningTargetWarning,
    count_to_prune,
    mask_from_scores,
    nm_mask,
    select_targets,
)

# ---------------------------------------------------------------- hand-made tensors


def test_layer_scope_prunes_the_smallest_or_the_largest():
    scores = torch.tensor([[4.0, 1.0, 3.0], [2.0, 6.0, 5.0]])
    assert mask_from_scores(scores, 0.5, "layer").tolist() == [[True, False, False], [False, True, True]]
    assert mask_from_scores(scores, 0.5, "layer", "largest").tolist() == [[False, True, True], [True, False, False]]


def test_row_scope_prunes_within_each_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [10.0, 60.0, 50.0, 70.0]])
    assert mask_from_scores(scores, 0.5, "row").tolist() == [[True, False, True, False], [False, True, False, True]]
    # per layer the whole first row would go instead
    assert mask_from_scores(scores, 0.5, "layer").tolist() == [[False, False, False, False], [True, True, True, True]]


def test_global_scope_ranks_all_tensors_together():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 0.5])}
    masks = mask_from_scores(scores, 0.5, "global")
    assert masks["a"].tolist() == [False, False, False, True]
    assert masks["b"].tolist() == [True, True, True, False]


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
def test_ties_at_the_threshold_neither_over_nor_under_prune(scope):
    """All scores equal: a `<= threshold` rule would prune everything; exactly round(p*n) must go."""
    scores = {"a": torch.ones(4, 10), "b": torch.ones(6, 10)}
    masks = mask_from_scores(scores, 0.3, scope)
    if scope == "global":
        assert sum(int((~m).sum()) for m in masks.values()) == 30
    elif scope == "layer":
        assert [int((~m).sum()) for m in masks.values()] == [12, 18]
    else:
        assert all(int((~row).sum()) == 3 for m in masks.values() for row in m)


def _groups(masks: dict, scores: dict, scope: str):
    """(keep, scores) pairs of every group the scope ranks within."""
    if scope == "global":
        yield torch.cat([m.flatten() for m in masks.values()]), torch.cat([s.flatten() for s in scores.values()])
    elif scope == "layer":
        yield from ((masks[n].flatten(), scores[n].flatten()) for n in masks)
    else:
        yield from ((km, sm) for n in masks for km, sm in zip(masks[n], scores[n], strict=True))


@pytest.mark.parametrize("scope", ["global", "layer", "row"])
@pytest.mark.parametrize("order", ["smallest", "largest"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_exact_count_and_ordering_with_many_ties(scope, order, sparsity):
    """Scores drawn from 4 values (ties everywhere): exact count per group, and no kept score
    ranks below a pruned one (checked directly, not through the implementation's threshold)."""
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.randint(0, 4, (6, 13), generator=g).float(), "b": torch.randint(0, 4, (5, 13), generator=g).float()}
    masks = mask_from_scores(scores, sparsity, scope, order)
    for keep, group_scores in _groups(masks, scores, scope):
        assert int((~keep).sum()) == count_to_prune(keep.numel(), sparsity)
        kept, pruned = group_scores[keep], group_scores[~keep]
        if len(kept) and len(pruned):
            if order == "smallest":
                assert kept.min() >= pruned.max()
            else:
                assert kept.max() <= pruned.min()


def test_count_to_prune_rounds_to_the_nearest_weight():
    assert count_to_prune(10, 0.25) == 3  # 2.5 rounds half up: within one weight of the request
    assert count_to_prune(7, 0.5) == 4
    assert count_to_prune(1000, 0.333) == 333
    with pytest.raises(ValueError, match="fraction"):
        count_to_prune(10, 50)  # a percentage passed to a primitive is refused, never clipped


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("order", ["smallest", "largest"])
def test_nm_mask_group_by_group(n, m, order):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (5, 4 * m), generator=g).float()  # many ties inside groups
    keep = nm_mask(scores, n, m, order)
    for row_keep, row_scores in zip(keep, scores, strict=True):
        for k, s in zip(row_keep.split(m), row_scores.split(m), strict=True):
            assert int(k.sum()) == n
            if order == "smallest":
                assert s[k].min() >= s[~k].max()
            else:
                assert s[k].max() <= s[~k].min()


def test_nm_mask_needs_a_multiple_of_m():
    with pytest.raises(PrunelabError, match="multiple of 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_percentage_reads_percent_fraction_and_percent_sign():
    assert Percentage(50) == 50 and Percentage("50") == 50 and Percentage("50%") == 50
    assert Percentage(0.5) == 50 and Percentage("0.25") == 25
    assert Percentage("0.5%") == 0.5 and Percentage(1) == 1 and Percentage(0) == 0
    assert Percentage(50).fraction == 0.5
    for bad in ("abc", True, "nan"):
        with pytest.raises((TypeError, ValueError)):
            Percentage(bad)


# ---------------------------------------------------------------- on tiny models


@pytest.fixture(scope="module")
def loaded_once(tiny_models):
    return {arch: load_model(str(tiny_models[arch]), dtype="float32") for arch in ("qwen3", "qwen2")}


def fresh(loaded):
    """A private copy of a loaded tiny model (loading takes seconds, copying milliseconds)."""
    model = copy.deepcopy(loaded.model)
    return dataclasses.replace(loaded, model=model, adapter=adapt(model))


@pytest.fixture
def qwen3(loaded_once):
    return fresh(loaded_once["qwen3"])


@pytest.fixture
def qwen2(loaded_once):
    return fresh(loaded_once["qwen2"])


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_default_targets_are_the_decoder_linear_weights(qwen3):
    targets = select_targets(qwen3.adapter)
    linears = [(i, name) for i in range(qwen3.adapter.num_layers) for name in qwen3.adapter.linear_modules(i)]
    assert set(targets) == {f"layers.{i}.{name}.weight" for i, name in linears}
    assert len(linears) == 4 * 7  # q, k, v, o, gate, up, down
    assert not any("norm" in name for name in targets)


def test_magnitude_changes_only_the_targets(qwen2):
    """Qwen2 has q/k/v biases and an untied head: none of them, the norms or the embedding change."""
    before = _snapshot(qwen2.model)
    report = prune(qwen2, "magnitude", sparsity=50)
    target_ids = {id(p) for p in select_targets(qwen2.adapter).values()}
    for name, param in qwen2.model.named_parameters():
        if id(param) in target_ids:
            zeros = param == 0
            assert int(zeros.sum()) == param.numel() // 2, name
            assert torch.equal(param[~zeros], before[name][~zeros]), name  # kept weights untouched
        else:
            assert torch.equal(param, before[name]), name
    assert any(name.endswith("q_proj.bias") for name, _ in qwen2.model.named_parameters())
    assert report["sparsity"]["total"]["sparsity_pct"] == 50.0
    assert set(report["sparsity"]["per_layer"]) == {"0", "1", "2", "3"}


def test_tied_embedding_is_untouched_and_counted_once(qwen3):
    assert qwen3.adapter.tied
    embedding = qwen3.adapter.embedding.weight.detach().clone()
    prune(qwen3, "magnitude", sparsity=70, scope="global")
    assert torch.equal(qwen3.adapter.embedding.weight, embedding)
    assert qwen3.adapter.head.weight is qwen3.adapter.embedding.weight
    with pytest.warns(PruningTargetWarning, match="tied"):
        targets = select_targets(qwen3.adapter, include_embeddings=True, include_head=True)
    assert "embedding.weight" in targets and "head.weight" not in targets
    assert sum(p is qwen3.adapter.embedding.weight for p in targets.values()) == 1


def test_including_norms_and_embeddings_warns_and_prunes_them(qwen3):
    with pytest.warns(PruningTargetWarning, match="original study"):
        report = prune(qwen3, "magnitude", sparsity=50, include_norms=True, include_embeddings=True)
    names = set(report["sparsity"]["per_tensor"])
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight", "decoder.norm.weight",
            "layers.0.input_layernorm.weight", "embedding.weight"} <= names
    embedding = qwen3.adapter.embedding.weight
    assert int((embedding == 0).sum()) == embedding.numel() // 2


def test_default_targets_do_not_warn(qwen3):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningTargetWarning)
        prune(qwen3, "magnitude", sparsity=10)


def test_largest_order_keeps_the_small_weights(qwen3):
    before = {n: p.detach().clone() for n, p in select_targets(qwen3.adapter).items()}
    prune(qwen3, "magnitude", sparsity=30, order="largest", scope="row")
    for name, param in select_targets(qwen3.adapter).items():
        for row_before, row_after in zip(before[name], param, strict=True):
            pruned = row_after == 0
            assert int(pruned.sum()) == count_to_prune(row_after.numel(), 0.3)
            assert row_before[~pruned].abs().max() <= row_before[pruned].abs().min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_on_a_model_group_by_group(qwen3, pattern):
    n, m = map(int, pattern.split(":"))
    report = prune(qwen3, "magnitude", pattern=pattern)
    assert report["sparsity"]["total"]["sparsity_pct"] == pytest.approx(100 * (1 - n / m))
    for name, param in select_targets(qwen3.adapter).items():
        kept_per_group = (param != 0).reshape(-1, m).sum(dim=1)
        assert torch.all(kept_per_group == n), name


def test_masks_reapply_after_a_weight_update_and_round_trip(qwen3, tmp_path):
    report = prune(qwen3, "magnitude", sparsity=50, scope="global")
    masks = report.masks
    targets = select_targets(qwen3.adapter)
    assert set(masks) == set(targets)
    assert masks.sparsity() == pytest.approx(0.5)
    with torch.no_grad():  # a later update (fine-tuning step) fills the holes
        for param in targets.values():
            param.add_(1.0)
    assert report["sparsity"]["total"]["zeros"] > 0 and all(int((p == 0).sum()) == 0 for p in targets.values())
    masks.save(tmp_path / "masks.safetensors")
    loaded = MaskSet.load(tmp_path / "masks.safetensors")
    loaded.apply(qwen3.model)
    for name, param in targets.items():
        assert torch.equal(param == 0, ~masks[name])


def test_prune_accepts_a_bare_model(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    report = prune(model, "magnitude", sparsity="25%")
    assert report["sparsity"]["total"]["sparsity_pct"] == 25.0
    assert report["options"]["sparsity"] == 25.0 and report["strategy"] == "magnitude"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 150}, "percentage in [0, 100]"),
    ({"sparsity": -5}, "percentage in [0, 100]"),
    ({"sparsity": "half"}, "option 'sparsity' expects"),
    ({"pattern": "2:4", "sparsity": 60}, "contradicts sparsity 60%"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"pattern": "2-4"}, "unstructured' or N:M"),
    ({"scope": "block"}, "must be one of global, layer, row"),
    ({"order": "random"}, "must be one of smallest, largest"),
    ({"include_norms": "maybe"}, "option 'include_norms' expects bool"),
    ({"sparsity_pct": 50}, "unknown option(s) sparsity_pct"),
])
def test_bad_options_fail_before_touching_the_model(qwen3, options, message):
    before = _snapshot(qwen3.model)
    with pytest.raises(PrunelabError) as error:
        prune(qwen3, "magnitude", **options)
    assert message in str(error.value)
    assert all(torch.equal(p, before[n]) for n, p in qwen3.model.named_parameters())


def test_nm_pattern_with_its_own_sparsity_is_fine(qwen3):
    report = prune(qwen3, "magnitude", pattern="2:4", sparsity=50)
    assert report["sparsity"]["total"]["sparsity_pct"] == 50.0


def test_unknown_strategy(qwen3):
    with pytest.raises(PrunelabError, match="unknown strategy 'magnitud'.*magnitude"):
        prune(qwen3, "magnitud", sparsity=50)
