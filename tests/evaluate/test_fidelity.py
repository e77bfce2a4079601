"""Fidelity to the dense model (KL, top-1 agreement) and perplexity windows that start like the tokenizer's texts.

References are independent of the engine: full-vocabulary KL from Hugging Face logits in float64,
scipy's entropy on hand-made distributions, HF's own loss on BOS-prefixed windows cut by hand.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import entropy

from prunelab.errors import PrunelabError
from prunelab.evaluate import engine as engine_module
from prunelab.evaluate.data import DataSource, Subset
from prunelab.evaluate.engine import DenseHead, DenseReference, Engine, head_fingerprint, kl_from_logits
from prunelab.evaluate.reference import ReferenceStore
from prunelab.evaluate.run import prepare_tasks, run_task
from prunelab.model.loading import load_model
from prunelab.model.surgery import drop_layers
from prunelab.model.windows import window_bos
from prunelab_plugins.wikitext import METRICS as WIKITEXT_METRICS

from ..conftest import DATA, QWEN3_TOKENIZER, random_model, tiny_config

SEQLEN = 48


@pytest.fixture(scope="module")
def wikitext_data(tmp_path_factory) -> Path:
    """WikiText-2's first 200 lines: enough for a few windows of 48 tokens, tokenized in a blink."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    lines = (DATA / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "wikitext-2" / "wiki.test.raw").write_text("".join(lines[:200]), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tiny_bos(tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer (Qwen3's, with BOS set) puts BOS in front of every text it encodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bos")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(QWEN3_TOKENIZER, bos_token="<|endoftext|>", add_bos_token=True).save_pretrained(path)
    return path


def wikitext(data: Path, limit: int = 3):
    (task,) = prepare_tasks(["wikitext"], DataSource.resolve(data), Subset(limit=limit, sample="first"),
                            {"seqlen": SEQLEN})
    return task


def text_ids(tokenizer, data: Path) -> torch.Tensor:
    text = "\n\n".join(line if line.strip() else "" for line in
                       (data / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def hf_loss(model, window: torch.Tensor) -> float:
    with torch.no_grad():
        return model(window[None], labels=window[None]).loss.item()


# ------------------------------------------------------------------------------------- BOS windows
def test_windows_start_with_bos_where_the_tokenizer_adds_it(tiny_bos, wikitext_data):
    lm = load_model(str(tiny_bos), dtype="float32")
    bos = lm.tokenizer.bos_token_id
    assert lm.tokenizer("x")["input_ids"][0] == bos and window_bos(lm.tokenizer, lm.adapter) == bos
    result = run_task(Engine(lm.model, lm.tokenizer, lm.adapter), wikitext(wikitext_data))
    ids = text_ids(lm.tokenizer, wikitext_data)
    assert result.metrics["bos"] is True
    for k, record in enumerate(result.records):
        # BOS, then the next SEQLEN - 1 text tokens: every text token is scored, SEQLEN - 1 per window
        window = torch.cat([torch.tensor([bos]), ids[k * (SEQLEN - 1):(k + 1) * (SEQLEN - 1)]])
        assert record["item_id"] == f"window/{k}" and record["tokens"] == SEQLEN - 1
        assert record["nll_sum"] / record["tokens"] == pytest.approx(hf_loss(lm.model, window), rel=1e-4)


def test_windows_without_bos_are_unchanged_for_qwen(tiny_qwen3, wikitext_data):
    lm = load_model(str(tiny_qwen3), dtype="float32")
    assert window_bos(lm.tokenizer, lm.adapter) is None
    result = run_task(Engine(lm.model, lm.tokenizer, lm.adapter), wikitext(wikitext_data))
    ids = text_ids(lm.tokenizer, wikitext_data)
    assert result.metrics["bos"] is False
    for k, record in enumerate(result.records):
        window = ids[k * SEQLEN:(k + 1) * SEQLEN]
        assert record["tokens"] == SEQLEN - 1
        assert record["nll_sum"] / record["tokens"] == pytest.approx(hf_loss(lm.model, window), rel=1e-4)


def test_calibration_windows_share_the_bos_rule(tiny_bos):
    from prunelab.prune.calibration import CalibrationSpec, calibration_samples

    lm = load_model(str(tiny_bos), dtype="float32")
    source = str(DATA / "calibration" / "wikitext-2-valid.tokens.txt")
    spec = CalibrationSpec.from_mapping({"source": source, "samples": 3, "seqlen": 32})
    samples = calibration_samples(lm.tokenizer, spec, 0, window_bos(lm.tokenizer, lm.adapter))
    assert samples.shape == (3, 32) and (samples[:, 0] == lm.tokenizer.bos_token_id).all()
    assert (samples[:, 1:] != lm.tokenizer.bos_token_id).all()


# ------------------------------------------------------------------------------------- KL to dense
def test_kl_from_logits_matches_scipy_with_zero_probabilities():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    logits = torch.log(q).float() + torch.tensor([[3.7], [-12.0]])  # logits: log q up to a constant per row
    got = kl_from_logits(torch.log(p).float(), logits)
    assert got.tolist() == pytest.approx([entropy(p[0], q[0]), entropy(p[1], q[1])], rel=1e-5)
    same = kl_from_logits(torch.log(q).float(), torch.log(q).float() + 5.0)
    assert same.abs().max().item() < 1e-6  # no divergence from itself, up to float32 rounding


def test_window_kl_and_top1_equal_full_vocab_hf_computation(tiny_qwen3, monkeypatch):
    """The KL recomputed from stored dense hidden states equals KL from both models' full HF logits."""
    monkeypatch.setattr(engine_module, "KL_ROWS", 5)  # several KL steps per head chunk
    dense = load_model(str(tiny_qwen3), dtype="float32")
    variant_model = copy.deepcopy(dense.model)
    drop_layers(variant_model, [2])
    from prunelab.model.adapter import adapt

    windows = torch.randint(0, 5000, (3, 33), generator=torch.Generator().manual_seed(3))
    dense_engine = Engine(dense.model, dense.tokenizer, dense.adapter)
    scores = dense_engine.window_scores(windows, keep_hidden=True, head_chunk=16)
    reference = DenseReference(torch.stack(scores.hidden), windows, head_fingerprint(dense.adapter))
    variant_engine = Engine(variant_model, dense.tokenizer, adapt(variant_model))
    compared = variant_engine.window_scores(windows, reference=reference, head_chunk=16)
    assert compared.nll_sums == pytest.approx(variant_engine.window_nll(windows)[0], rel=1e-6)
    with torch.no_grad():
        p = torch.log_softmax(dense.model(windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(variant_model(windows).logits[:, :-1].double(), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    agree = p.argmax(-1) == q.argmax(-1)
    for w in range(3):
        assert compared.kl[w].shape == (32,)
        assert compared.kl[w].double().tolist() == pytest.approx(exact[w].tolist(), rel=1e-3, abs=1e-6)
        assert compared.agree[w].tolist() == agree[w].tolist()
    assert float(exact.mean()) > 0 and not agree.all(), "the variant must differ from dense"
    # against itself the dense model has zero divergence and full agreement
    # (float32 recomputation: reduction order, which follows batch shape and thread count, moves the
    # 151,936-way log-softmax by ~1e-5 nats; the variant's divergence above is orders larger)
    itself = dense_engine.window_scores(windows, reference=reference)
    assert max(float(k.max()) for k in itself.kl) < 1e-4 and all(a.all() for a in itself.agree)


def test_another_head_needs_the_dense_head_and_other_windows_are_refused(tiny_qwen3):
    dense = load_model(str(tiny_qwen3), dtype="float32")
    windows = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))
    reference = DenseReference(torch.zeros(1, 9, 64), windows, head_fingerprint(dense.adapter))
    variant = copy.deepcopy(dense.model)
    from prunelab.model.adapter import adapt

    adapter = adapt(variant)
    with torch.no_grad():
        adapter.head.weight[:10] = 0
    engine = Engine(variant, dense.tokenizer, adapter)
    with pytest.raises(PrunelabError, match="output head differs .* dense head was not kept"):
        engine.window_scores(windows, reference=reference)
    stale = DenseHead.of(adapter)  # a head other than the one the hidden states were made with
    with pytest.raises(PrunelabError, match="dense head kept with this reference is another model's"):
        engine.window_scores(windows, reference=dataclasses.replace(reference, dense_head=stale))
    kept = dataclasses.replace(reference, dense_head=DenseHead.of(dense.adapter))
    assert len(engine.window_scores(windows, reference=kept).kl) == 1
    with pytest.raises(PrunelabError, match="other windows"):
        Engine(dense.model, dense.tokenizer, dense.adapter).window_scores(windows + 1, reference=reference)


# ------------------------------------------------------------------ variants whose output head differs
HEAD_VOCAB = 384  # prunelab.testing's offline tokenizer


@pytest.fixture(scope="module")
def offline_tokenizer():
    from prunelab.testing import tiny_tokenizer

    return tiny_tokenizer()


def head_case_model(case: str) -> torch.nn.Module:
    """A tiny random model whose head is of one kind: tied (Llama), untied with a bias (Phi's
    ``lm_head``), or soft-capped (Gemma3 with ``final_logit_softcapping``)."""
    from transformers import PhiConfig

    from prunelab.testing import random_model, tiny_config

    if case == "bias":
        config = PhiConfig(vocab_size=HEAD_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256)
    else:
        config = tiny_config("llama" if case == "tied" else "gemma3", vocab_size=HEAD_VOCAB)
    if case == "softcap":
        config.final_logit_softcapping = 3.0  # logits here reach a few units: the cap bends them
    model = random_model(config, seed=5).eval()
    if case == "bias":
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 1.0)  # random_model leaves vectors at their init (zero)
    return model


def hf_kl_and_agreement(dense: torch.nn.Module, variant: torch.nn.Module, windows: torch.Tensor):
    """Per window: mean KL(dense || variant) and top-1 agreement from both models' plain HF logits, float64."""
    with torch.no_grad():
        p = torch.log_softmax(dense(windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(variant(windows).logits[:, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return kl, (p.argmax(-1) == q.argmax(-1)).double()


def pruned_copy(model: torch.nn.Module, strategy: str, options: dict) -> torch.nn.Module:
    import warnings

    from prunelab.model.adapter import adapt
    from prunelab.model.loading import LoadedModel
    from prunelab.prune import prune

    variant = copy.deepcopy(model)
    loaded = LoadedModel(variant, None, adapt(variant), "tiny", "dir", torch.device("cpu"), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # include_head warns that it damages the model: that is the point
        prune(loaded, strategy, **options)
    return variant


WIDTH_HIDDEN = ("width", {"hidden": 0.25, "importance": "magnitude"})
INCLUDE_HEAD = ("magnitude", {"sparsity": 50, "include_head": True})


# width has no rule for Phi (its parallel block): include_head covers the biased head
@pytest.mark.parametrize(("case", "strategy", "options"),
                         [("tied", *WIDTH_HIDDEN), ("softcap", *WIDTH_HIDDEN),
                          ("tied", *INCLUDE_HEAD), ("bias", *INCLUDE_HEAD), ("softcap", *INCLUDE_HEAD)],
                         ids=["width-hidden-tied", "width-hidden-softcap", "include-head-tied", "include-head-bias",
                              "include-head-softcap"])
def test_a_variant_whose_head_differs_gets_kl_to_dense_from_the_kept_dense_head(
        case, strategy, options, offline_tokenizer, wikitext_data, tmp_path):
    """Width's hidden axis and include_head change the head: KL per window still equals KL from both
    models' own full logits (head bias and soft-capping included), through the stored dense head."""
    from prunelab.evaluate.reference import DENSE_HEAD_FILE
    from prunelab.model.adapter import adapt

    dense = head_case_model(case)
    task = wikitext(wikitext_data)
    path = tmp_path / "wikitext-0000.safetensors"
    run_task(Engine(dense, offline_tokenizer, adapt(dense)), task, reference=ReferenceStore(path, is_dense=True))
    assert (tmp_path / DENSE_HEAD_FILE).is_file()
    variant = pruned_copy(dense, strategy, options)
    assert head_fingerprint(adapt(variant)) != head_fingerprint(adapt(dense)), "the head must differ"
    result = run_task(Engine(variant, offline_tokenizer, adapt(variant)), task,
                      reference=ReferenceStore(path, is_dense=False))
    assert result.metrics["fidelity"] == "compared"
    windows = ReferenceStore(path, is_dense=False).load()[0]["windows"]
    kl, agree = hf_kl_and_agreement(dense, variant, windows)
    assert float(kl.mean()) > 1e-3, "the variant must differ from dense"
    for w, record in enumerate(result.records):
        assert record["kl_mean"] == pytest.approx(float(kl[w].mean()), rel=1e-5, abs=1e-7)
        assert record["top1_agree"] == pytest.approx(float(agree[w].mean()))
        assert sorted(record["kl_tokens"]) == pytest.approx(sorted(kl[w].tolist()), rel=1e-3, abs=1e-6)


def test_the_dense_head_is_kept_once_and_a_stale_one_is_never_used(offline_tokenizer, wikitext_data, tmp_path):
    from prunelab.evaluate.reference import DENSE_HEAD_FILE
    from prunelab.model.adapter import adapt

    dense, other = head_case_model("tied"), random_model(tiny_config("llama", vocab_size=HEAD_VOCAB), seed=9)
    task = wikitext(wikitext_data)
    first, second = tmp_path / "wikitext-0000.safetensors", tmp_path / "wikitext-0001.safetensors"
    for path in (first, second):
        run_task(Engine(dense, offline_tokenizer, adapt(dense)), task, reference=ReferenceStore(path, is_dense=True))
    head_file = tmp_path / DENSE_HEAD_FILE
    kept = head_file.stat()
    run_task(Engine(dense, offline_tokenizer, adapt(dense)), task, reference=ReferenceStore(first, is_dense=True))
    assert (head_file.stat().st_ino, head_file.stat().st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # once per run
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left
    variant = adapt(pruned_copy(dense, *WIDTH_HIDDEN))
    engine = Engine(variant.model, offline_tokenizer, variant)

    def fidelity() -> tuple[str, bool]:
        result = run_task(engine, task, reference=ReferenceStore(first, is_dense=False))
        return result.metrics["fidelity"], "kl_mean" in result.records[0]

    assert fidelity() == ("compared", True)
    ReferenceStore(tmp_path / "other-0000.safetensors", is_dense=True).save_head(adapt(other))  # another model's head
    assert ReferenceStore(first, is_dense=False).load_head(head_fingerprint(adapt(dense))) is None
    assert fidelity() == ("no reference (no dense head)", False)
    head_file.unlink()
    assert fidelity() == ("no reference (no dense head)", False)
    run_task(Engine(dense, offline_tokenizer, adapt(dense)), task, reference=ReferenceStore(first, is_dense=True))
    assert fidelity() == ("compared", True)  # the dense evaluation keeps its head again


def test_wikitext_records_fidelity_through_the_reference_store(tiny_qwen3, wikitext_data, tmp_path):
    """The dense evaluation stores its reference; a variant's evaluation of the same windows reads it."""
    dense = load_model(str(tiny_qwen3), dtype="float32")
    task = wikitext(wikitext_data)
    path = tmp_path / "ref" / "wikitext-0000.safetensors"
    dense_result = run_task(Engine(dense.model, dense.tokenizer, dense.adapter), task,
                            reference=ReferenceStore(path, is_dense=True))
    assert path.is_file() and dense_result.metrics["fidelity"] == "dense"
    assert all(r["kl_mean"] == 0.0 and r["top1_agree"] == 1.0 for r in dense_result.records)
    variant_model = copy.deepcopy(dense.model)
    drop_layers(variant_model, [1])
    from prunelab.model.adapter import adapt

    engine = Engine(variant_model, dense.tokenizer, adapt(variant_model))
    result = run_task(engine, task, reference=ReferenceStore(path, is_dense=False))
    assert result.metrics["fidelity"] == "compared"
    (store_copy := tmp_path / "copy.safetensors").write_bytes(path.read_bytes())
    tensors, _ = ReferenceStore(store_copy, False).load()
    windows = tensors["windows"]
    with torch.no_grad():
        p = torch.log_softmax(dense.model(windows).logits[:, :-1].double(), -1)
        q = torch.log_softmax(variant_model(windows).logits[:, :-1].double(), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    for w, record in enumerate(result.records):
        assert record["kl_mean"] == pytest.approx(float(exact[w].mean()), rel=1e-3)
        assert record["top1_agree"] == pytest.approx(float((p[w].argmax(-1) == q[w].argmax(-1)).double().mean()))
        assert len(record["kl_tokens"]) == record["tokens"]
        assert sorted(record["kl_tokens"]) == pytest.approx(sorted(exact[w].tolist()), rel=1e-3, abs=1e-6)
    missing = run_task(engine, task, reference=ReferenceStore(tmp_path / "none.safetensors", is_dense=False))
    assert missing.metrics["fidelity"] == "no reference" and "kl_mean" not in missing.records[0]
    shutil.rmtree(tmp_path / "ref")


def test_writers_of_one_shared_file_each_stage_their_own(tmp_path):
    """Two Ray workers keeping the dense head at once: the second starts while the first is writing.
    With one staging name the second would unlink the first's file and the first's rename would fail."""
    from prunelab.readers import atomic_write

    target = tmp_path / "dense-head.safetensors"

    def first(staging: Path) -> None:
        staging.write_text("first")
        atomic_write(target, lambda other: other.write_text("second"), shared=True)  # meanwhile, another worker

    atomic_write(target, first, shared=True)
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == [target.name]
    with pytest.raises(FileNotFoundError):  # what one staging name does
        atomic_write(target, lambda staging: atomic_write(target, lambda other: other.write_text("x")))


# ------------------------------------------------------------------------------------- per-variant tables
def test_gold_probability_is_the_softmax_over_the_four_letters(tiny_qwen3):
    import math

    from prunelab_plugins.mmlu import letter_probabilities

    assert letter_probabilities([math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]) == pytest.approx(
        [0.1, 0.2, 0.3, 0.4], rel=1e-12)
    assert letter_probabilities([-1000.0, -1000.0, -1001.0, -2000.0])[0] == pytest.approx(
        1 / (2 + math.exp(-1)), rel=1e-12)  # no underflow for very unlikely letters
    lm = load_model(str(tiny_qwen3), dtype="float32")
    (task,) = prepare_tasks(["mmlu"], DataSource.resolve(DATA), Subset(limit=1, sample="first"), {"num_fewshot": 0})
    task.items = task.items[:6]
    for record in run_task(Engine(lm.model, lm.tokenizer, lm.adapter), task).records:
        weights = [math.exp(x) for x in record["loglikelihoods"]]
        assert record["gold_prob"] == pytest.approx(weights[record["target_index"]] / sum(weights), rel=1e-9)


# The evaluators' declarations as a run's manifest stores them (``Evaluator.answers``, ``MetricSpec``)
METRICS = {("mmlu", "acc"): {"kind": "accuracy", "prediction": "prediction", "label": "accuracy"},
           ("mmlu", "gold_prob"): {"kind": "mean", "label": "gold probability"},
           **{("wikitext", m.name): dataclasses.asdict(m) for m in WIKITEXT_METRICS}}
ANSWERS = {"mmlu": {"target": "target", "category": "category", "choices": "loglikelihoods", "chance": None}}


def items_table() -> pl.DataFrame:
    """A per-item table as a study writes it: WikiText records through the runner's ``item_rows``
    (one row per window and declared metric), MMLU rows by hand."""
    from prunelab.plugin import TaskResult
    from prunelab.runner.chunks import item_rows
    from prunelab.runner.variants import Variant

    rng = np.random.default_rng(0)
    frames, rows = [], []
    for variant, strategy, scale in (("dense", "dense", 0.0), ("v", "magnitude", 1.0)):
        records = []
        for w in range(6):
            kl = (rng.exponential(scale, 20) if scale else np.zeros(20)).round(4)
            records.append({"item_id": f"window/{w}", "nll_sum": 60.0, "tokens": 20, "correct": None,
                            "kl_mean": float(kl.mean()), "kl_tokens": kl.tolist(),
                            "top1_agree": 1.0 if not scale else float(rng.uniform(0.5, 0.9))})
        frames.append(item_rows(Variant(variant, strategy, {}), "wikitext", TaskResult("wikitext", {}, records),
                                WIKITEXT_METRICS))
        for q, (pred, gold) in enumerate([("B", "A"), ("B", "B"), ("C", "D"), ("B", "C")]):
            record = {"variant": variant, "strategy": strategy, "params": "{}", "task": "mmlu", "item_id": f"s/{q}",
                      "prediction": pred if variant == "dense" else "C", "target": gold,
                      "category": "stem" if q < 2 else "other",
                      "loglikelihoods": json.dumps([-1.0, -2.0, -3.0, -4.0])}
            rows.append({**record, "metric": "acc", "correct": record["prediction"] == gold})
            rows.append({**record, "metric": "gold_prob", "value": 0.1 * (q + 1)})
    return pl.concat([*frames, pl.DataFrame(rows, infer_schema_length=None)], how="diagonal_relaxed")


def window_values(items: pl.DataFrame, variant: str, metric: str) -> np.ndarray:
    return items.filter(pl.col("variant") == variant, pl.col("metric") == metric)["value"].to_numpy()


def test_fidelity_table_against_numpy():
    from prunelab.report.fidelity import chance_levels, choice_metrics, fidelity_table
    from prunelab.report.stats import median_interval

    items = items_table()
    table = {r["variant"]: r for r in fidelity_table(items, METRICS).to_dicts()}
    assert table["dense"]["kl_mean"] == 0 and table["dense"]["kl_p99"] == 0 and table["dense"]["top1_agree"] == 1
    v = items.filter(pl.col("variant") == "v", pl.col("metric") == "kl_mean")
    means = window_values(items, "v", "kl_mean")
    assert table["v"]["windows"] == 6 and table["v"]["tokens"] == 6 * 20
    assert table["v"]["kl_mean"] == pytest.approx(means.mean(), rel=1e-12)
    assert table["v"]["kl_median"] == pytest.approx(np.median(means), rel=1e-12)
    assert (table["v"]["kl_median_low"], table["v"]["kl_median_high"]) == pytest.approx(median_interval(means))
    ordered = np.sort(means)  # the interval lies between order statistics, around the median
    assert ordered[0] <= table["v"]["kl_median_low"] <= np.median(means) <= table["v"]["kl_median_high"] <= ordered[-1]
    top1 = window_values(items, "v", "top1_agree")
    assert table["v"]["top1_agree"] == pytest.approx(top1.mean()) and table["v"]["top1_median"] == pytest.approx(np.median(top1))
    pooled = np.concatenate([json.loads(x) for x in v["kl_tokens"]])
    assert table["v"]["kl_p99"] == pytest.approx(np.quantile(pooled, 0.99), rel=1e-12)
    assert "kl_p99_low" not in table["v"]  # no interval that could not cover (docs/statistics.md)
    assert chance_levels(choice_metrics(items, METRICS, ANSWERS)) == {"mmlu": 0.25}
    fixed = {"mmlu": {**ANSWERS["mmlu"], "choices": None, "chance": 0.2}}  # a declared level wins
    assert chance_levels(choice_metrics(items, METRICS, fixed)) == {"mmlu": 0.2}


def test_answer_letters_categories_and_gold_probability_tables():
    from prunelab.report.fidelity import answer_letters, category_accuracy, choice_metrics, mean_metric_table

    items = items_table()
    choices = choice_metrics(items, METRICS, ANSWERS)
    letters = {r["variant"]: r for r in answer_letters(choices).to_dicts()}
    assert {k: letters["gold answers"][k] for k in "ABCD"} == {"A": 1, "B": 1, "C": 1, "D": 1}
    assert {k: letters["dense"][k] for k in "ABCD"} == {"A": 0, "B": 3, "C": 1, "D": 0}
    assert letters["v"]["C"] == 4 and letters["v"]["n"] == 4 and letters["v"]["metric"] == "acc"
    categories = {(r["variant"], r["category"]): r["accuracy"] for r in category_accuracy(choices).to_dicts()}
    assert categories == {("dense", "stem"): 0.5, ("dense", "other"): 0.0, ("v", "stem"): 0.0, ("v", "other"): 0.5}
    gold = {r["variant"]: r for r in mean_metric_table(items, METRICS, ANSWERS).to_dicts()}
    assert gold["dense"]["mean"] == pytest.approx(0.25) and gold["dense"]["n"] == 4
    assert gold["dense"]["label"] == "gold probability"


def test_no_declaration_no_multiple_choice_tables():
    """The same records without the evaluator's declarations get no answer tables: nothing is read by key name."""
    from prunelab.report.fidelity import summary_records

    records = summary_records(items_table(), {k: {**v, "prediction": None} for k, v in METRICS.items()}, {})
    assert set(records) == {"fidelity"}
    undeclared = {k: {**v, "fidelity": None} for k, v in METRICS.items()}  # the same rows, no fidelity roles
    assert "fidelity" not in summary_records(items_table(), undeclared, ANSWERS)
    records = summary_records(items_table(), {k: {**v, "prediction": None} for k, v in METRICS.items()}, ANSWERS)
    assert "answer_letters" not in records and records["chance"] == {"mmlu": 0.25}  # no prediction declared


def test_two_accuracy_metrics_get_their_own_answer_and_category_tables():
    """A task with acc and acc_norm (different predictions): labelled blocks per metric, never pooled.

    Expected numbers counted by hand from the rows below.
    """
    from prunelab.report.fidelity import answer_letters, category_accuracy, choice_metrics

    metrics = {("mc", "acc"): {"kind": "accuracy", "prediction": "pred"},
               ("mc", "acc_norm"): {"kind": "accuracy", "prediction": "pred_norm"}}
    answers = {"mc": {"target": "gold", "category": "topic", "choices": None, "chance": None}}
    # item: gold, pred, pred_norm, topic
    table = [("A", "A", "B", "bio"), ("B", "B", "B", "bio"), ("C", "A", "C", "bio"), ("A", "B", "B", "chem")]
    rows = []
    for i, (gold, pred, norm, topic) in enumerate(table):
        record = {"variant": "dense", "strategy": "dense", "task": "mc", "item_id": str(i), "gold": gold,
                  "pred": pred, "pred_norm": norm, "topic": topic}
        rows += [{**record, "metric": "acc", "correct": pred == gold},
                 {**record, "metric": "acc_norm", "correct": norm == gold}]
    choices = choice_metrics(pl.DataFrame(rows), metrics, answers)
    letters = {(r["metric"], r["variant"]): r for r in answer_letters(choices).to_dicts()}
    assert {k: letters[("acc", "dense")][k] for k in "ABC"} == {"A": 2, "B": 2, "C": 0}
    assert {k: letters[("acc_norm", "dense")][k] for k in "ABC"} == {"A": 0, "B": 3, "C": 1}
    assert {k: letters[("acc", "gold answers")][k] for k in "ABC"} == {"A": 2, "B": 1, "C": 1}
    accuracy = {(r["metric"], r["category"]): (r["accuracy"], r["n"]) for r in category_accuracy(choices).to_dicts()}
    # acc: bio 2 of 3 right (items 0, 1), chem 0 of 1; acc_norm: bio 2 of 3 (items 1, 2), chem 0 of 1
    assert accuracy == {("acc", "bio"): (pytest.approx(2 / 3), 3), ("acc", "chem"): (0.0, 1),
                        ("acc_norm", "bio"): (pytest.approx(2 / 3), 3), ("acc_norm", "chem"): (0.0, 1)}


def test_report_shows_fidelity_answers_and_the_chance_line(tmp_path):
    from prunelab.report import artifacts

    items = items_table().with_columns(pl.lit("{}").alias("params"), pl.lit(None, pl.Float64).alias("nll_sum"))
    items = items.with_columns(pl.when(pl.col("task") == "wikitext").then(pl.col("tokens") * 3.0)
                               .otherwise(None).alias("nll_sum"),
                               pl.when(pl.col("task") == "wikitext").then(None).otherwise(pl.col("correct"))
                               .alias("correct"))
    metrics = [{"task": t, "name": m, **spec} for (t, m), spec in METRICS.items()]
    run = artifacts.write_run(tmp_path, "synthetic", items, {"config": {"x": 1}, "metrics": metrics, "answers": ANSWERS})
    chart = (run / "charts" / "dense_vs_pruned.html").read_text()
    assert "chance 0.25" in chart and "chance 0.25" not in (run / "charts" / "fidelity.html").read_text()
    report = (run / "report.html").read_text()
    for heading in ("Fidelity to the dense model", "Answer letters", "Per-item means", "Accuracy per category"):
        assert heading in report
    for chart in ("fidelity", "answer_letters"):
        assert (run / "charts" / f"{chart}.png").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    fidelity = {r["variant"]: r for r in manifest["sensitive_metrics"]["fidelity"]}
    assert fidelity["v"]["kl_p99"] > 0 and fidelity["dense"]["kl_mean"] == 0


def test_rebuilding_a_run_from_before_the_declarations_asks_the_installed_evaluator(tmp_path):
    """A stored mmlu run whose manifest predates AnswerFields and MetricSpec.prediction: written as it
    was, it has no answer tables; `prunelab report` (rebuild_run) fills both from the installed mmlu."""
    from prunelab.report import artifacts

    items = items_table().filter(pl.col("task") == "mmlu").with_columns(pl.lit("{}").alias("params"))
    old_metrics = [{"task": "mmlu", "name": "acc", "kind": "accuracy", "field": "correct", "label": "accuracy",
                    "higher_is_better": True, "tolerance": None},
                   {"task": "mmlu", "name": "gold_prob", "kind": "mean", "field": "gold_prob", "label": "gold",
                    "higher_is_better": True, "tolerance": None}]
    run = artifacts.write_run(tmp_path, "old", items, {"config": {"x": 2}, "metrics": old_metrics})
    assert "answer_letters" not in json.loads((run / "manifest.json").read_text()).get("sensitive_metrics", {})
    artifacts.rebuild_run(run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["answers"]["mmlu"]["target"] == "target"
    letters = {r["variant"]: r for r in manifest["sensitive_metrics"]["answer_letters"]}
    assert {k: letters["dense"][k] for k in "ABCD"} == {"A": 0, "B": 3, "C": 1, "D": 0}
