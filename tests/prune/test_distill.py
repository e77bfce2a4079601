"""Healing by distillation (``distill``) and masks held during training, for every recovery method.

The references are independent of the code under test: the KD loss against
``torch.nn.functional.kl_div`` / ``cross_entropy`` on the full logits of ``model(ids).logits`` (one
table, no chunks, no shared helper), its gradient against autograd through that hand loss, and the
masks against the keep-masks of the pruning itself, checked after every optimizer step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prunelab.cli import main
from prunelab.errors import PrunelabError
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.prune.api import prune
from prunelab.prune.masks import resolve_parameter
from prunelab.prune.recovery import (
    RecoveryContext,
    TeacherSource,
    check_teacher,
    heal,
    masked_nonzeros,
    training_windows,
)
from prunelab_plugins.distill import KDSettings, batch_loss, lr_factor
from prunelab_plugins.lora import lora_options, merge_lora, wrap_lora

from ..conftest import DATA, QWEN3_TOKENIZER, random_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
VALID = DATA / "calibration" / "wikitext-2-valid.tokens.txt"


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    """(healing text, held-out text): two disjoint stretches of the WikiText-2 validation file."""
    lines = VALID.read_text(encoding="utf-8").splitlines(keepends=True)
    root = tmp_path_factory.mktemp("distill")
    (root / "heal.txt").write_text("".join(lines[:120]), encoding="utf-8")
    (root / "held-out.txt").write_text("".join(lines[400:520]), encoding="utf-8")
    return root / "heal.txt", root / "held-out.txt"


def kd(data: Path, **extra) -> dict:
    return {"tokens": 2 * 2 * 32, "batch": 2, "seqlen": 32, "lr": 1e-2, "warmup": 0.0, "data": str(data), **extra}


def pair(path: Path):
    """(student, teacher): two loads of the same dense model (the student is then pruned)."""
    return (load_model(str(path), dtype="float32", device="cpu"), load_model(str(path), dtype="float32", device="cpu"))


def random_loaded(seed: int) -> SimpleNamespace:
    """A tiny random Qwen2 (5,000-token vocabulary) with the handles ``batch_loss`` and ``hand_loss`` use."""
    model = random_model(tiny_config("qwen2", vocab_size=5000), seed)
    return SimpleNamespace(model=model, adapter=adapt(model))


def hand_loss(student, teacher, ids: torch.Tensor, settings: KDSettings) -> torch.Tensor:
    """(1 - alpha) T^2 KL(teacher^T || student^T) + alpha CE, over the full logits at once."""
    temperature = settings.temperature
    logits = student.model(input_ids=ids).logits[:, :-1].float().reshape(-1, student.model.config.vocab_size)
    with torch.no_grad():
        target = teacher.model(input_ids=ids).logits[:, :-1].float().reshape(-1, logits.shape[-1])
    kl = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(target / temperature, -1),
                  log_target=True, reduction="batchmean")
    ce = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    return (1 - settings.alpha) * temperature ** 2 * kl + settings.alpha * ce


@pytest.mark.parametrize("options", [{"pattern": "2:4"}, {"sparsity": 50}], ids=["2:4", "unstructured-50"])
def test_full_kd_keeps_every_zero_at_every_step_and_changes_the_kept_weights(tiny_models, texts, options):
    student, teacher = pair(tiny_models["llama"])
    pruned = prune(student, "magnitude", **options)
    before = {name: resolve_parameter(student.adapter, name).detach().clone() for name in pruned.masks}
    left_after_step = []

    def after_step(step: int, loss: float, rate: float | None) -> None:  # called after the optimizer step
        left_after_step.append(masked_nonzeros(pruned.masks, student.adapter))

    report = heal(student, "distill", masks=pruned.masks, teacher=teacher, progress=after_step, **kd(texts[0]))
    assert report["steps"] == 2 and left_after_step == [0, 0]
    embedding = student.adapter.embedding.weight
    assert report["trainable_parameters"] == sum(p.numel() for p in student.model.parameters()) - embedding.numel()
    assert all(p.requires_grad for p in student.model.parameters())  # given back as they were
    for name, keep in pruned.masks.items():
        weight = resolve_parameter(student.adapter, name).detach()
        assert torch.equal(weight == 0, ~keep), name
        changed = (weight[keep] != before[name][keep]).float().mean()
        assert changed > 0.99, f"{name}: only {changed:.2%} of the kept weights changed"
    if "pattern" in options:
        for name in pruned.masks:
            weight = resolve_parameter(student.adapter, name).detach()
            assert bool(((weight != 0).reshape(-1, 4).sum(1) <= 2).all())


def test_masks_are_held_by_the_gradient_too(tiny_qwen3):
    """The gradient of a pruned weight is zero as it is computed: AdamW never moves it, whatever re-masking does."""
    student, teacher = pair(tiny_qwen3)
    pruned = prune(student, "magnitude", sparsity=50)
    context = RecoveryContext(adapter=student.adapter, tokenizer=student.tokenizer, masks=pruned.masks)
    hold = context.hold_masks()
    ids = torch.randint(0, 1000, (2, 16))
    batch_loss(student.adapter, teacher.adapter, ids, KDSettings())
    for name, keep in pruned.masks.items():
        grad = resolve_parameter(student.adapter, name).grad
        assert grad is not None and bool((grad[~keep] == 0).all()) and bool((grad[keep] != 0).any()), name
    hold.remove()


@pytest.mark.parametrize("settings", [KDSettings(), KDSettings(temperature=2.0, alpha=0.3, kl_chunk=7)],
                         ids=["T1", "T2-alpha0.3-chunk7"])
def test_kd_loss_and_its_gradient_equal_a_hand_computation(settings):
    student, teacher = random_loaded(seed=1), random_loaded(seed=2)
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    parts = batch_loss(student.adapter, teacher.adapter, ids, settings)  # backward into .grad
    chunked = {n: p.grad.clone() for n, p in student.model.named_parameters()}
    student.model.zero_grad(set_to_none=True)
    expected = hand_loss(student, teacher, ids, settings)
    expected.backward()
    assert parts.positions == 2 * 23
    assert parts.total == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    for name, param in student.model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_student_that_is_the_teacher_has_zero_loss(tiny_qwen3, texts):
    student, teacher = pair(tiny_qwen3)
    """Zero up to the float32 rounding of a 152k-token softmax (~1e-6 nats, see ``kl_from_logits``)."""
    ids = training_windows(student.tokenizer, str(texts[1]), 32, 2)[:2]
    parts = batch_loss(student.adapter, teacher.adapter, ids, KDSettings(temperature=3.0), backward=False)
    assert parts.kl < 1e-5 and parts.total == pytest.approx(9 * parts.kl) and parts.ce > 1
    report = heal(student, "distill", teacher=teacher, **kd(texts[0], lr=1e-3))
    assert max(report["loss"]) < 1e-5 and max(report["kl"]) < 1e-5


def held_out_kl(student, teacher, text: Path) -> float:
    ids = training_windows(student.tokenizer, str(text), 32, 4)[:8]
    return batch_loss(student.adapter, teacher.adapter, ids, KDSettings(), backward=False).kl


@pytest.mark.parametrize("train", ["full", "lora"])
def test_a_few_kd_steps_bring_a_pruned_student_closer_to_the_teacher_on_held_out_text(tiny_qwen3, texts, train):
    student, teacher = pair(tiny_qwen3)
    prune(student, "drop-layers", layers="1")
    before = held_out_kl(student, teacher, texts[1])
    lr = 3e-3 if train == "full" else 1e-2
    report = heal(student, "distill", teacher=teacher, layer_map=[0, 2, 3], seed=0,
                  **kd(texts[0], tokens=8 * 2 * 32, lr=lr, train=train, hidden_weight=0.1))
    after = held_out_kl(student, teacher, texts[1])
    assert report["layer_map"] == [0, 2, 3] and len(report["hidden"]) == 8 and report["hidden"][0] > 0
    assert after < 0.95 * before and report["loss"][-1] < report["loss"][0], (before, after)


def test_lora_trains_the_masked_model_and_merges_exactly_it(tiny_models):
    """The forward that trains (masked update) is the model that is saved: merged, then re-masked."""
    loaded = load_model(str(tiny_models["llama"]), dtype="float32", device="cpu")
    pruned = prune(loaded, "magnitude", sparsity=50)
    context = RecoveryContext(adapter=loaded.adapter, tokenizer=loaded.tokenizer, masks=pruned.masks)
    options = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ""}
    model = loaded.model
    peft_model, _ = wrap_lora(model, context, lora_options(options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero: make the update real
    peft_model.eval()
    ids = torch.randint(0, 5000, (1, 20))
    with torch.no_grad():
        trained = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model, model, "lora")
    pruned.masks.apply(loaded.adapter)
    with torch.no_grad():
        saved = merged(input_ids=ids).logits
    torch.testing.assert_close(trained, saved, rtol=1e-4, atol=1e-4)
    unmasked = copy.deepcopy(merged)
    assert masked_nonzeros(pruned.masks, loaded.adapter) == 0 and unmasked is not merged


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 10, 2) for step in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False)) and factors[-1] < 0.05


def test_teacher_with_another_vocabulary_or_tokenizer_is_refused(tiny_qwen3):
    student, teacher = pair(tiny_qwen3)
    check_teacher(student, teacher)
    vocab = teacher.tokenizer.get_vocab()
    changed = {**vocab, "zzz-new-token": vocab.pop(next(iter(vocab)))}
    with pytest.raises(PrunelabError, match="tokenizer differs"):
        check_teacher(student, SimpleNamespace(adapter=teacher.adapter, tokenizer=SimpleNamespace(get_vocab=lambda: changed)))


def test_layer_map_composes_recorded_removals():
    assert TeacherSource("m", "x", ((1,),)).layer_map(4) == [0, 2, 3]
    assert TeacherSource("m", "x", ((1,), (0,))).layer_map(4) == [2, 3]  # a pruned model pruned again


def test_cli_distill_learns_from_the_recorded_source_and_records_the_curve(tiny_qwen3, texts, tmp_path, capsys):
    pruned_dir, out = tmp_path / "pruned", tmp_path / "healed"
    assert main(["prune", "--model", str(tiny_qwen3), "--method", "drop-layers", "--layers", "1", "--dtype",
                 "float32", "--out", str(pruned_dir)]) == 0
    assert main(["heal", "--model", str(pruned_dir), "--method", "distill", "--tokens", "192", "--batch", "2",
                 "--seqlen", "32", "--temperature", "2", "--option", "hidden_weight=0.5", "--data", str(texts[0]),
                 "--dtype", "float32", "--out", str(out)]) == 0
    healing = json.loads((out / "prunelab.json").read_text())["healing"]
    assert healing["method"] == "distill" and healing["teacher"]["model"] == str(tiny_qwen3)
    assert healing["layer_map"] == [0, 2, 3] and healing["steps"] == 3 and len(healing["loss"]) == 3
    assert healing["tokens_trained"] == 192 and healing["tokens_per_second"] > 0
    assert len(healing["lr"]) == 3 and healing["options"]["temperature"] == 2.0


@pytest.mark.parametrize(("args", "fragment"), [
    (["--temperature", "0"], "option 'temperature': must be positive, got 0"),
    (["--temperature", "-1"], "option 'temperature': must be positive"),
    (["--tokens", "63"], "below one optimizer step (batch 2 x seqlen 32 x accumulate 1 = 64 tokens)"),
    (["--teacher", "/no/such/teacher"], "teacher not found: /no/such/teacher"),
    (["DENSE"], "no teacher:"),
    (["MOVED"], "teacher not found:"),
    (["OTHER-VOCAB"], "the teacher's vocabulary has 1000 tokens, the student's 151936"),
])
def test_bad_distill_input_is_one_line_before_training(tiny_qwen3, texts, tmp_path, capsys, args, fragment):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pruned_dir = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_qwen3), "--method", "drop-layers", "--layers", "1", "--dtype",
                 "float32", "--out", str(pruned_dir)]) == 0
    model = str(pruned_dir)
    if args == ["DENSE"]:  # a folder prunelab did not write: nothing records a teacher
        model, args = str(tiny_qwen3), []
    elif args == ["MOVED"]:
        recipe = json.loads((pruned_dir / "prunelab.json").read_text())
        recipe["source"]["model"] = str(tmp_path / "gone")
        (pruned_dir / "prunelab.json").write_text(json.dumps(recipe))
        args = []
    elif args == ["OTHER-VOCAB"]:
        AutoModelForCausalLM.from_config(tiny_config("qwen3", vocab_size=1000)).save_pretrained(tmp_path / "small")
        AutoTokenizer.from_pretrained(QWEN3_TOKENIZER).save_pretrained(tmp_path / "small")
        args = ["--teacher", str(tmp_path / "small")]
    capsys.readouterr()
    status = main(["heal", "--model", model, "--method", "distill", "--tokens", "64", "--batch", "2", "--seqlen",
                   "32", "--data", str(texts[0]), "--dtype", "float32", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert fragment in " ".join(err.split()) and "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "out").exists()


def test_study_distills_from_the_pruned_weights_and_pairs_against_the_healed_dense(tiny_qwen3, small_data, texts,
                                                                                   tmp_path, monkeypatch):
    """Each pruned model is pruned once (the twin loads it), dense+distill is the control, and the report pairs both."""
    import polars as pl

    from prunelab.runner import session as runner
    from prunelab.runner.run import run_study
    from prunelab.runner.studyfile import load_study
    from prunelab.runner.variants import expand_variants

    from ..conftest import study_text

    pruned_calls = []
    real_prune = runner.prune
    monkeypatch.setattr(runner, "prune", lambda loaded, strategy, **kw: pruned_calls.append(strategy)
                        or real_prune(loaded, strategy, **kw))
    strategies = ('[[strategies]]\nname = "drop-layers"\nlayers = [1]\n\n[[strategies]]\nname = "magnitude"\n'
                  f'pattern = "2:4"\n\n[recovery]\nmethod = "distill"\ntokens = 128\nbatch = 2\nseqlen = 32\n'
                  f'lr = 0.003\nalpha = 0.5\nhidden_weight = 0.1\ndata = "{texts[0]}"\n')
    study = tmp_path / "tiny.toml"
    study.write_text(study_text(tiny_qwen3, small_data, strategies=strategies).replace(
        'tasks = ["mmlu", "gsm8k", "wikitext"]', 'tasks = ["wikitext"]').replace("chunk_items = 1", "chunk_items = 8"))
    loaded = load_study(study)
    assert [v.name for v in expand_variants(loaded, 4)] == [
        "dense", "dense+distill", "drop-layers[layers=1]", "drop-layers[layers=1]+distill",
        "magnitude[pattern=2:4]", "magnitude[pattern=2:4]+distill"]
    run = run_study(loaded, tmp_path / "out")
    assert sorted(pruned_calls) == ["drop-layers", "magnitude"]  # once each: the twins load the pruned weights
    manifest = json.loads((run / "manifest.json").read_text())
    twin = manifest["variants"]["drop-layers[layers=1]+distill"]
    assert twin["dropped_layers"] == [1] and twin["recovery"]["layer_map"] == [0, 2, 3]
    assert twin["recovery"]["method"] == "distill" and len(twin["recovery"]["loss"]) == 2
    assert manifest["variants"]["magnitude[pattern=2:4]+distill"]["recovery"]["masks"]["pruned_weights_kept_zero"] > 0
    healing = pl.read_parquet(run / "healing.parquet")
    assert set(healing["variant"]) == {"dense+distill", "drop-layers[layers=1]+distill", "magnitude[pattern=2:4]+distill"}
    twins = healing.filter(pl.col("variant") != "dense+distill")
    assert set(twins["healed_dense"]) == {"dense+distill"} and twins["p_holm_vs_healed_dense"].null_count() == 0
    summary = pl.read_parquet(run / "summary.parquet")
    for row in twins.filter(pl.col("metric") == "perplexity").iter_rows(named=True):
        control = summary.filter((pl.col("variant") == "dense+distill") & (pl.col("metric") == "perplexity"))
        assert row["healed_dense_value"] == pytest.approx(control["value"][0])
    assert "healed dense" in (run / "report.html").read_text()


def test_a_saved_plan_keeps_which_variants_are_healed(tmp_path):
    """A resumed run reads the plan back: a healed twin must still be one (else it is pruned by '<strategy>+<method>')."""
    from prunelab.runner.variants import DENSE_VARIANT, Variant
    from prunelab.runner.workfolder import Plan, WorkFolder

    work = WorkFolder(tmp_path)
    twin = Variant("drop-block[k=2]+distill", "drop-block+distill", {"k": 2}, "distill")
    work.save_plan(Plan([DENSE_VARIANT, Variant("drop-block[k=2]", "drop-block", {"k": 2}), twin], {"wikitext": [(0, 1)]}))
    loaded = work.load_plan()
    assert loaded.variants[2] == twin and loaded.variants[2].pruned_by == "drop-block"
    assert loaded.variants[2].unhealed == "drop-block[k=2]" and loaded.variants[1].recovery is None
