"""Recovery ``distill``: heal a pruned model by knowledge distillation from the dense model it came from.

The recipe of the pruning papers that heal towards the original rather than towards a corpus
(Minitron: logit KD from the unpruned teacher; Sheared-LLaMA: continued pretraining): the student
(the pruned model) is trained to match the teacher's next-token distribution,

    loss = (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T) + alpha * CE(student, next token)
           + hidden_weight * mean_i ||h_student_i - h_teacher_map(i)||^2 / ||h_teacher_map(i)||^2

with ``p^T = softmax(logits / T)`` over the **full vocabulary** (no top-k), the KL computed from the
final hidden states in chunks of ``kl_chunk`` positions exactly as the fidelity metric is
(``prunelab.evaluate.engine.kl_from_logits``): only one chunk's ``rows x vocab`` tables exist at a
time, in the forward and in the backward (each chunk's loss is back-propagated into the hidden
states at once, then the hidden states into the network). ``T^2`` keeps the gradient scale of the
soft targets independent of T (Hinton et al. 2015). The hidden-state term compares the output of
each student layer with the teacher layer it was (``context.layer_map``: a depth-pruned student's
kept layers by their original index), relative to the teacher's norm so deep layers with large
activations do not dominate.

It trains every parameter of the decoder (``train = "full"``, the default: the recipe for depth and
width pruning) or LoRA adapters (``train = "lora"``, through the ``lora`` plugin's masked adapters).
The input embeddings and output head stay frozen unless ``embeddings = true``: pruning does not
change them, and a study computes KL to dense from the dense model's stored final hidden states
through the variant's own head (``DenseReference``), which refuses a changed head. The
budget is in tokens: ``tokens // (batch * seqlen * accumulate)`` optimizer steps, AdamW with a
linear warm-up then cosine decay to zero, gradient norm clipped. Pruned weights stay exactly zero at
every step (``RecoveryContext.hold_masks`` for full training; the masked LoRA update otherwise), so
every logged loss is the pruned model's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.evaluate import KL_ROWS, kl_from_logits
from prunelab.model import Adapter, layer_output
from prunelab.plugin import Option, Recovery, at_least, hookimpl
from prunelab.prune import RecoveryContext
from prunelab_plugins.lora import (
    fraction,
    lora_options,
    masked_modules,
    merge_lora,
    positive,
    seeded,
    wrap_lora,
)

DEFAULT_LR = {"full": 5e-5, "lora": 2e-4}
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KDSettings:
    """What the loss needs from the options."""

    temperature: float = 1.0
    alpha: float = 0.0  # weight of the cross-entropy term
    hidden_weight: float = 0.0
    kl_chunk: int = KL_ROWS

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> KDSettings:
        return cls(options["temperature"], options["alpha"], options["hidden_weight"], options["kl_chunk"])


@dataclass
class LossParts:
    """One batch's loss and its terms (each already weighted and averaged over predicted positions)."""

    total: float
    kl: float  # mean KL(teacher^T || student^T) per position, unweighted, nats
    ce: float  # mean next-token cross-entropy, nats
    hidden: float  # mean relative hidden-state error over the matched layers (0 when not asked)
    positions: int


def tokens_per_step(options: Mapping[str, Any]) -> int:
    return options["batch"] * options["seqlen"] * options["accumulate"]


def planned_steps(options: Mapping[str, Any]) -> int:
    """Optimizer steps of the token budget: whole steps, so the budget is never exceeded."""
    return options["tokens"] // tokens_per_step(options)


def check_options(options: Mapping[str, Any]) -> str | None:
    if planned_steps(options) < 1:
        return (f"option 'tokens': a budget of {options['tokens']:,} tokens is below one optimizer step "
                f"(batch {options['batch']} x seqlen {options['seqlen']} x accumulate {options['accumulate']} "
                f"= {tokens_per_step(options):,} tokens)")
    return None


@contextlib.contextmanager
def layer_outputs(adapter: Adapter, wanted: bool) -> Iterator[list[torch.Tensor]]:
    """The output of every decoder layer of the next forward (nothing recorded when not ``wanted``)."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(layer_output(out)))
               for layer in adapter.layers] if wanted else []
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], layer_map: list[int]) -> torch.Tensor:
    """Mean over student layers of ||h_s - h_t||^2 / ||h_t||^2 against the teacher layer each one was."""
    terms = []
    for index, mine in enumerate(student):
        theirs = teacher[layer_map[index]].to(mine.dtype)
        if mine.shape != theirs.shape:
            raise PrunelabError(f"recovery 'distill': hidden states of student layer {index} are {tuple(mine.shape)}, "
                                f"the teacher's layer {layer_map[index]} {tuple(theirs.shape)} (hidden_weight needs "
                                "the same width; set hidden_weight = 0)")
        terms.append((mine - theirs).pow(2).sum() / theirs.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def batch_loss(student: Adapter, teacher: Adapter, ids: torch.Tensor, settings: KDSettings,
               layer_map: list[int] | None = None, *, backward: bool = True, scale: float = 1.0) -> LossParts:
    """The distillation loss of one batch of windows; with ``backward``, its gradient (times ``scale``) too.

    The teacher and the student run their decoders once; the heads then run ``kl_chunk`` positions
    at a time, and each chunk's loss is back-propagated into the (detached) final hidden states at
    once, so no full ``positions x vocab`` logit table ever exists. ``scale`` divides the gradient
    over accumulated micro-batches.
    """
    grad = torch.enable_grad() if backward else torch.no_grad()
    want_hidden = settings.hidden_weight > 0
    with grad:
        with torch.no_grad(), layer_outputs(teacher, want_hidden) as teacher_layers:
            teacher_final = teacher.decoder(input_ids=ids, use_cache=False).last_hidden_state
        with layer_outputs(student, want_hidden) as student_layers:
            student_final = student.decoder(input_ids=ids, use_cache=False).last_hidden_state
        width = student_final.shape[-1]
        student_rows = student_final[:, :-1].reshape(-1, width)
        teacher_rows = teacher_final[:, :-1].reshape(-1, teacher_final.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        positions = targets.numel()
        leaf = student_rows.detach().requires_grad_(backward)
        temperature = settings.temperature
        kl_sum = ce_sum = 0.0
        for start in range(0, positions, settings.kl_chunk):
            rows = slice(start, start + settings.kl_chunk)
            logits = student.head_logits(leaf[rows]).float()
            with torch.no_grad():
                teacher_logp = torch.log_softmax(teacher.head_logits(teacher_rows[rows]).float() / temperature, -1)
            kl = kl_from_logits(teacher_logp, logits / temperature).sum()
            ce = torch.nn.functional.cross_entropy(logits, targets[rows], reduction="sum")
            part = ((1 - settings.alpha) * temperature ** 2 * kl + settings.alpha * ce) / positions
            if backward:
                (part * scale).backward()
            kl_sum += float(kl.detach())
            ce_sum += float(ce.detach())
        hidden = (hidden_loss(student_layers, teacher_layers, layer_map or list(range(len(student_layers))))
                  if want_hidden else None)
        if backward:
            outputs, grads = [student_rows], [leaf.grad]
            if hidden is not None:
                outputs.append(hidden * settings.hidden_weight * scale)
                grads.append(None)
            torch.autograd.backward(outputs, grads)
    kl_mean, ce_mean = kl_sum / positions, ce_sum / positions
    hidden_value = float(hidden.detach()) if hidden is not None else 0.0
    total = ((1 - settings.alpha) * temperature ** 2 * kl_mean + settings.alpha * ce_mean
             + settings.hidden_weight * hidden_value)
    return LossParts(total, kl_mean, ce_mean, hidden_value, positions)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps`` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _layer_map(context: RecoveryContext, student: Adapter, teacher: Adapter, needed: bool) -> list[int] | None:
    """The teacher layer of each student layer: the context's, else the identity for equal depths."""
    if context.layer_map is not None:
        return context.layer_map
    if student.num_layers == teacher.num_layers:
        return list(range(student.num_layers))
    if needed:
        raise PrunelabError(f"recovery 'distill': hidden_weight needs to know which teacher layer each of the "
                            f"student's {student.num_layers} layers was (the teacher has {teacher.num_layers}); "
                            "the pruned folder's prunelab.json records it, or set hidden_weight = 0")
    return None


def embedding_parameters(adapter: Adapter) -> list[nn.Parameter]:
    """The input embedding's and output head's parameters (one tensor when tied)."""
    return list({id(p): p for module in (adapter.embedding, adapter.head) for p in module.parameters()}.values())


def _autocast(dtype: str, device: torch.device):
    if dtype == "model":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST[dtype])


def recover(model: nn.Module, options: dict[str, Any], context: RecoveryContext) -> dict[str, Any]:
    """Distill the teacher into the model for ``tokens`` tokens (see the module doc)."""
    teacher = context.teacher
    if teacher is None:  # the core hands one to a method that declares uses_teacher
        raise PrunelabError("recovery 'distill' needs a teacher (the dense model)")
    settings = KDSettings.of(options)
    layer_map = _layer_map(context, context.adapter, teacher, settings.hidden_weight > 0)
    steps, accumulate = planned_steps(options), options["accumulate"]
    batches = context.batches(options["data"], options["seqlen"], options["batch"], steps * accumulate)
    device = next(model.parameters()).device
    lr = options["lr"] if options["lr"] is not None else DEFAULT_LR[options["train"]]
    teacher.model.eval()
    frozen = [p for p in teacher.model.parameters() if p.requires_grad]
    for param in frozen:  # no gradient into the teacher; given back in the end (a study's dense model)
        param.requires_grad_(False)
    if options["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    curve: dict[str, list[float]] = {"loss": [], "kl": [], "ce": [], "hidden": [], "lr": [], "step_seconds": []}
    with seeded(context.seed, device):
        if options["train"] == "lora":
            trained, targets = wrap_lora(model, context, lora_options(options, "lora_alpha"))
        else:
            trained, targets = model, []
            for param in model.parameters():
                param.requires_grad_(True)
            for param in ([] if options["embeddings"] else embedding_parameters(context.adapter)):
                param.requires_grad_(False)
        masked = masked_modules(trained)
        trainable = [p for p in trained.parameters() if p.requires_grad]
        hold = context.hold_masks()
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=options["weight_decay"])
        warmup = round(options["warmup"] * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
        trained.train()
        context.start_clock()
        rate = None
        try:
            for step in range(1, steps + 1):
                started = time.perf_counter()
                parts = []
                for _ in range(accumulate):
                    with _autocast(options["dtype"], device):
                        parts.append(batch_loss(context.adapter, teacher, next(batches), settings, layer_map,
                                                scale=1 / accumulate))
                torch.nn.utils.clip_grad_norm_(trainable, options["max_grad_norm"])
                curve["lr"].append(scheduler.get_last_lr()[0])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                hold.after_step()
                for key in ("total", "kl", "ce", "hidden"):
                    curve["loss" if key == "total" else key].append(
                        round(sum(getattr(p, key) for p in parts) / accumulate, 6))
                curve["step_seconds"].append(round(time.perf_counter() - started, 4))
                rate = context.report_step(step, curve["loss"][-1], step * tokens_per_step(options))
        finally:
            hold.remove()
            for param in [*frozen, *embedding_parameters(context.adapter)]:
                param.requires_grad_(True)
    if options["train"] == "lora":
        if context.adapter_dir is not None:
            trained.save_pretrained(context.adapter_dir)
        model = merge_lora(trained, model, "distill")
    if options["gradient_checkpointing"]:
        model.gradient_checkpointing_disable()
    model.eval()
    del optimizer
    return {**curve, "steps": steps, "tokens_trained": steps * tokens_per_step(options), "lr_peak": lr,
            "warmup_steps": warmup, "tokens_per_second": round(rate, 1) if rate else None,
            "trainable_parameters": sum(p.numel() for p in trainable), "target_modules": len(targets),
            "masked_update_modules": masked, "teacher_layers": teacher.num_layers, "layer_map": layer_map}


@hookimpl
def prunelab_recoveries() -> list[Recovery]:
    return [Recovery(
        name="distill",
        description="heal by distillation from the dense teacher (full-vocabulary KL, all parameters or LoRA); "
                    "masks kept at every step",
        recover=recover,
        uses_teacher=True,
        check=check_options,
        planned_steps=planned_steps,
        options=(
            Option("tokens", int, 2_000_000, "training budget in tokens (whole optimizer steps of it)",
                   check=at_least(1)),
            Option("temperature", float, 1.0, "softmax temperature T of teacher and student (loss scaled by T^2)",
                   check=positive),
            Option("alpha", float, 0.0, "weight of next-token cross-entropy (1 - alpha on the KL term)",
                   check=lambda v: None if 0 <= v <= 1 else f"must be in [0, 1], got {v:g}"),
            Option("hidden_weight", float, 0.0, "weight of the hidden-state loss on matching layers (0: off)",
                   check=lambda v: None if v >= 0 else f"must be >= 0, got {v:g}"),
            Option("train", str, "full", "full: every parameter; lora: LoRA adapters (peft), merged",
                   choices=("full", "lora")),
            Option("embeddings", bool, False,
                   "train = full: also train the input embeddings and output head (a changed head cannot be "
                   "compared with dense from a study's stored hidden states)"),
            Option("lr", float, None, "peak AdamW learning rate (default 5e-5 full, 2e-4 lora)", check=positive),
            Option("warmup", float, 0.05, "fraction of the steps with a linear warm-up (then cosine to 0)",
                   check=fraction),
            Option("weight_decay", float, 0.0, "AdamW weight decay",
                   check=lambda v: None if v >= 0 else f"must be >= 0, got {v:g}"),
            Option("max_grad_norm", float, 1.0, "gradient norm clip", check=positive),
            Option("batch", int, 4, "windows per micro-batch", check=at_least(1)),
            Option("accumulate", int, 1, "micro-batches per optimizer step (gradient accumulation)",
                   check=at_least(1)),
            Option("seqlen", int, 512, "tokens per window", check=at_least(2)),
            Option("kl_chunk", int, KL_ROWS, "positions per chunk of the full-vocabulary KL", check=at_least(1)),
            Option("dtype", str, "model", "compute dtype: model (the weights' own) or autocast to bfloat16/float16",
                   choices=("model", "bfloat16", "float16")),
            Option("data", str, "wikitext2", "wikitext2 (Hub train split), c4 (Hub), or a local text / .jsonl file"),
            Option("rank", int, 8, "LoRA rank r (train = lora)", check=at_least(1)),
            Option("lora_alpha", float, 16.0, "LoRA alpha (train = lora)", check=positive),
            Option("dropout", float, 0.05, "LoRA dropout (train = lora)", check=fraction),
            Option("target_modules", str, "", "Linear names to adapt (train = lora); empty = every decoder Linear"),
            Option("gradient_checkpointing", bool, False, "recompute activations in backward (less memory)"),
        ),
    )]
