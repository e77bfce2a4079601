"""Recovery ``lora``: heal a pruned model with a short LoRA fine-tune (peft), then merge the adapter.

The recipe of the depth-pruning papers (LLM-Pruner; Gromov et al. with QLoRA): low-rank adapters on
the decoder's Linear layers, a few hundred steps of next-token loss on generic text, merged into
the weights. Targets are found like the pruning targets -- every ``nn.Linear`` inside the decoder
layers, whatever the family calls them -- and can be narrowed by name (``q_proj,v_proj``).

**The masks hold in training.** A LoRA update ``B @ A`` is dense; merged as it is it would fill the
pruned weights back in, and the core (``prunelab.prune.recovery.heal``) re-masks after the merge. So
that the model being trained -- and the loss logged -- is that masked model, every adapted Linear
with a mask computes ``x @ (W + mask * s B A)^T`` in training (``masked_lora``): the base weight is
frozen with its zeros, the update is masked before it is applied, and the merged, re-masked weight
is exactly what was trained. ``distill`` trains its LoRA mode through the same functions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.plugin import Option, Recovery, at_least, hookimpl
from prunelab.prune import RecoveryContext


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value:g}"


def fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value:g}"


def target_names(model: nn.Module, adapter, wanted: str = "") -> list[str]:
    """Full module names of the decoder layers' Linear modules, optionally only those whose name ends so.

    ``wanted`` is comma-separated (``q_proj,v_proj`` or ``self_attn.o_proj``); empty = all of them.
    """
    names = {id(module): name for name, module in model.named_modules()}
    linears = [names[id(m)] for i in range(adapter.num_layers) for m in adapter.linear_modules(i).values()
               if id(m) in names]
    suffixes = [w.strip() for w in wanted.split(",") if w.strip()]
    chosen = [n for n in linears if not suffixes or any(n == s or n.endswith("." + s) for s in suffixes)]
    if not chosen:
        detail = f"named {', '.join(suffixes)} " if suffixes else ""
        found = sorted({n.split(".")[-1] for n in linears})
        raise PrunelabError(f"recovery 'lora': no Linear module {detail}in the decoder layers to train "
                            f"(found: {', '.join(found) or 'none'})")
    return chosen


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """LoRA's random A init and dropout from ``seed``, without touching the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def lora_options(options: dict[str, Any], alpha_key: str = "alpha", dropout_key: str = "dropout") -> dict[str, Any]:
    """The peft settings of a method's options (``distill`` names its LoRA alpha ``lora_alpha``)."""
    return {"r": options["rank"], "lora_alpha": options[alpha_key], "lora_dropout": options[dropout_key],
            "target_modules": options["target_modules"]}


def wrap_lora(model: nn.Module, context: RecoveryContext, settings: dict[str, Any]) -> tuple[nn.Module, list[str]]:
    """(the peft model, its targets) with every masked target's update masked in the forward.

    Call inside ``seeded`` so the adapters' random init follows the seed.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_names(model, context.adapter, settings["target_modules"])
    config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    module_masks = context.module_masks()  # before wrapping: the Linear modules become peft's base layers
    peft_model = get_peft_model(model, config)
    for module in peft_model.modules():
        keep = module_masks.get(getattr(module, "base_layer", None))
        if keep is not None and hasattr(module, "lora_A"):
            module.forward = masked_lora(module, keep)
    return peft_model, targets


def masked_lora(layer: nn.Module, keep: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The forward of a peft LoRA Linear whose update is masked: ``base(x) + dropout(x) @ (keep * s B A)^T``.

    peft adds ``s B (A x)`` without forming ``B A``; a mask needs the matrix, formed once per call
    (out x in, the size of the weight it updates).
    """
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            update = (b @ a) * layer.scaling[name]
            dropped = layer.lora_dropout[name](x.to(a.dtype))
            result = result + torch.nn.functional.linear(dropped, update.masked_fill(~keep, 0)).to(result.dtype)
        return result
    return forward


def masked_modules(peft_model: nn.Module) -> int:
    """How many LoRA layers train a masked update (``masked_lora`` forwards)."""
    return sum("forward" in vars(module) for module in peft_model.modules())


def merge_lora(peft_model: nn.Module, model: nn.Module, method: str) -> nn.Module:
    """Merge the adapters into the weights (the masked forwards removed first) and return the plain model."""
    for module in peft_model.modules():
        if "forward" in vars(module):  # our masked forward: peft's own merge path takes over
            del module.forward
    merged = peft_model.merge_and_unload()
    if merged is not model:  # the core keeps working on the caller's model object
        raise PrunelabError(f"recovery '{method}': peft returned a different model object after merging")
    return merged


def recover(model: nn.Module, options: dict[str, Any], context: RecoveryContext) -> dict[str, Any]:
    """Train LoRA adapters for ``steps`` AdamW steps (constant learning rate, grad-norm clip 1), merge them."""
    batches = context.batches(options["data"], options["seqlen"], options["batch"], options["steps"])
    device = next(model.parameters()).device
    if options["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses, seconds = [], []
    tokens_per_step = options["batch"] * options["seqlen"]
    with seeded(context.seed, device):
        peft_model, targets = wrap_lora(model, context, lora_options(options))
        masked = masked_modules(peft_model)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=options["lr"], weight_decay=0.0)
        peft_model.train()
        context.start_clock()
        for step, batch in enumerate(batches, 1):
            started = time.perf_counter()
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
            seconds.append(round(time.perf_counter() - started, 4))
            context.report_step(step, losses[-1], step * tokens_per_step)
    if context.adapter_dir is not None:
        peft_model.save_pretrained(context.adapter_dir)
    merged = merge_lora(peft_model, model, "lora")
    if options["gradient_checkpointing"]:
        merged.gradient_checkpointing_disable()
    merged.eval()
    return {"loss": losses, "step_seconds": seconds, "target_modules": len(targets),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "tokens_trained": options["steps"] * tokens_per_step,
            "masked_update_modules": masked}


@hookimpl
def prunelab_recoveries() -> list[Recovery]:
    return [Recovery(
        name="lora",
        description="heal with LoRA adapters on the decoder Linear layers (peft), merged; masks kept",
        recover=recover,
        planned_steps=lambda options: options["steps"],
        options=(
            Option("rank", int, 8, "LoRA rank r", check=at_least(1)),
            Option("alpha", float, 16.0, "LoRA alpha (the update is scaled by alpha / rank)", check=positive),
            Option("dropout", float, 0.05, "dropout on the LoRA input", check=fraction),
            Option("target_modules", str, "",
                   "comma-separated Linear names to adapt (e.g. q_proj,v_proj); empty = every decoder Linear"),
            Option("steps", int, 100, "optimizer steps", check=at_least(1)),
            Option("lr", float, 2e-4, "AdamW learning rate (constant)", check=positive),
            Option("batch", int, 4, "windows per step", check=at_least(1)),
            Option("seqlen", int, 512, "tokens per window",
                   check=at_least(2)),
            Option("data", str, "wikitext2",
                   "wikitext2 (Hub train split), c4 (Hub), or a local text / .jsonl file"),
            Option("gradient_checkpointing", bool, False, "recompute activations in backward (less memory)"),
        ),
    )]
