"""Recovery ``lora``: heal a pruned model with a short LoRA fine-tune (peft), then merge the adapter.

The recipe of the depth-pruning papers (LLM-Pruner; Gromov et al. with QLoRA): low-rank adapters on
the decoder's Linear layers, a few hundred steps of next-token loss on generic text, merged into
the weights. Targets are found like the pruning targets -- every ``nn.Linear`` inside the decoder
layers, whatever the family calls them -- and can be narrowed by name (``q_proj,v_proj``). The core
(``prunelab.prune.recovery.heal``) re-applies the pruning masks after the merge.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from prunelab.errors import PrunelabError
from prunelab.plugin import Option, Recovery, hookimpl
from prunelab.prune import RecoveryContext


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value:g}"


def _fraction(value: float) -> str | None:
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
def _seeded(seed: int, device: torch.device):
    """LoRA's random A init and dropout from ``seed``, without touching the caller's RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def recover(model: nn.Module, options: dict[str, Any], context: RecoveryContext) -> dict[str, Any]:
    """Train LoRA adapters for ``steps`` AdamW steps (constant learning rate, grad-norm clip 1), merge them."""
    from peft import LoraConfig, get_peft_model

    targets = target_names(model, context.adapter, options["target_modules"])
    batches = context.batches(options["data"], options["seqlen"], options["batch"], options["steps"])
    device = next(model.parameters()).device
    config = LoraConfig(r=options["rank"], lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if options["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses, seconds = [], []
    with _seeded(context.seed, device):
        peft_model = get_peft_model(model, config)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=options["lr"], weight_decay=0.0)
        peft_model.train()
        for step, batch in enumerate(batches, 1):
            started = time.perf_counter()
            loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
            seconds.append(round(time.perf_counter() - started, 4))
            context.report_step(step, losses[-1])
    if context.adapter_dir is not None:
        peft_model.save_pretrained(context.adapter_dir)
    merged = peft_model.merge_and_unload()
    if options["gradient_checkpointing"]:
        merged.gradient_checkpointing_disable()
    if merged is not model:  # the core keeps working on the caller's model object
        raise PrunelabError("recovery 'lora': peft returned a different model object after merging")
    merged.eval()
    return {"loss": losses, "step_seconds": seconds, "target_modules": len(targets),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "tokens_trained": options["steps"] * options["batch"] * options["seqlen"]}


@hookimpl
def prunelab_recoveries() -> list[Recovery]:
    return [Recovery(
        name="lora",
        description="heal with LoRA adapters on the decoder Linear layers (peft), merged; masks kept",
        recover=recover,
        options=(
            Option("rank", int, 8, "LoRA rank r", check=lambda v: None if v >= 1 else f"must be >= 1, got {v}"),
            Option("alpha", float, 16.0, "LoRA alpha (the update is scaled by alpha / rank)", check=_positive),
            Option("dropout", float, 0.05, "dropout on the LoRA input", check=_fraction),
            Option("target_modules", str, "",
                   "comma-separated Linear names to adapt (e.g. q_proj,v_proj); empty = every decoder Linear"),
            Option("steps", int, 100, "optimizer steps", check=lambda v: None if v >= 1 else f"must be >= 1, got {v}"),
            Option("lr", float, 2e-4, "AdamW learning rate (constant)", check=_positive),
            Option("batch", int, 4, "windows per step", check=lambda v: None if v >= 1 else f"must be >= 1, got {v}"),
            Option("seqlen", int, 512, "tokens per window",
                   check=lambda v: None if v >= 2 else f"must be >= 2, got {v}"),
            Option("data", str, "wikitext2",
                   "wikitext2 (Hub train split), c4 (Hub), or a local text / .jsonl file"),
            Option("gradient_checkpointing", bool, False, "recompute activations in backward (less memory)"),
        ),
    )]
