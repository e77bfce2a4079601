"""Healing by distillation vs cross-entropy at the same token budget: does KD recover fidelity better?

For each base -- drop-block removing K layers (``--k``) and each ``width`` setting (``--width``), both
calibrated on the WikiText-2 *validation* file -- three heals of copies of the same pruned model, all through the ``distill`` trainer so that only the loss
and what is trained differ (same windows, seed, AdamW, warm-up + cosine schedule, token budget):

* ``lora-ce``: LoRA, next-token cross-entropy only (``alpha = 1``; the teacher's forward is computed
  and unused, so its tokens/s is a lower bound of a CE-only trainer's);
* ``lora-kd``: LoRA, KL(dense || student) over the full vocabulary (``alpha = 0``, T = 1);
* ``full-kd``: every parameter, the same KL;

and ``full-kd`` again at smaller budgets (KL vs budget). Healing text: the validation file; scoring:
WikiText-2 *test* windows (``bench_healing.test_windows``/``per_window``), never trained on. Per
window the log-perplexity and the KL per token are paired across methods and tested with the
exact sign test (``prunelab.report.stats.sign_test``, the study reports' test for window metrics).
Time per step and tokens/s are the trainer's own step timings (forward of teacher and student,
backward, optimizer); peak memory the process's peak RSS while healing (``PeakMemory``; on CUDA
``max_memory_allocated``), dense teacher and the scored log-probs included.

Usage (the BENCHMARKS.md run, 2 shared vCPUs):
    OMP_NUM_THREADS=2 nohup python benchmarks/bench_distill.py \\
        --model ~/.cache/prunelab-test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --k 4 --tokens 1024 \\
        --batch 2 --seqlen 128 --windows 8 --eval-seqlen 128 --calibration-samples 4 --threads 2 \\
        --json benchmarks/results/distill_smollm2.json &
The same on a GPU (Qwen3-0.6B, a 100M-token budget, bf16 autocast):
    python benchmarks/bench_distill.py --model Qwen/Qwen3-0.6B --device cuda --dtype float32 --autocast bfloat16 --k 4,8 \\
        --tokens 100000000 --batch 16 --seqlen 2048 --accumulate 4 --data c4 --windows 64 --eval-seqlen 2048 \\
        --json distill_qwen3.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_healing import HEAL_DATA, add_common_arguments, load_scoring, per_window


def methods(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The heals compared, as ``distill`` options (only the loss and what is trained differ)."""
    lora = {"train": "lora", "lr": args.lr_lora, "rank": args.rank, "lora_alpha": args.lora_alpha}
    return {"lora-ce": {**lora, "alpha": 1.0}, "lora-kd": {**lora, "alpha": 0.0},
            "full-kd": {"train": "full", "lr": args.lr_full, "alpha": 0.0}}


def heal_copy(pruned, teacher, layer_map: list[int], options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Heal a deep copy of the pruned model; (the healed model, the cost of healing)."""
    from prunelab.model.adapter import adapt
    from prunelab.model.bench import PeakMemory
    from prunelab.prune.recovery import heal

    model = copy.deepcopy(pruned.model)
    student = dataclasses.replace(pruned, model=model, adapter=adapt(model))

    def progress(step: int, loss: float, rate: float | None) -> None:
        print(f"    step {step} loss {loss:.4f} ({rate or 0:.0f} tokens/s)", flush=True)

    with PeakMemory(student.device) as peak:
        report = heal(student, "distill", seed=0, teacher=teacher, layer_map=layer_map, progress=progress, **options)
    seconds = report["step_seconds"]
    cost = {"steps": report["steps"], "tokens_trained": report["tokens_trained"],
            "step_s_median": statistics.median(seconds), "tokens_per_s": report["tokens_trained"] / sum(seconds),
            "heal_s": report["seconds"], "peak_memory_bytes": peak.peak_bytes(), "peak_memory_kind": peak.kind,
            "trainable_parameters": report["trainable_parameters"], "loss": report["loss"], "kl_train": report["kl"],
            "ce_train": report["ce"]}
    return student, cost


def summary(rows: dict[str, list[float]]) -> dict[str, Any]:
    tokens = np.asarray(rows["tokens"], dtype=float)
    return {"perplexity": math.exp(sum(rows["nll"]) / tokens.sum()), "kl_to_dense": sum(rows["kl"]) / tokens.sum(),
            "log_ppl_per_window": (np.asarray(rows["nll"]) / tokens).tolist(),
            "kl_per_window": (np.asarray(rows["kl"]) / tokens).tolist()}


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a - b per window (mean KL per token, log-perplexity) and the exact sign test's two-sided p."""
    from prunelab.report.stats import sign_counts, sign_test

    out: dict[str, Any] = {}
    for key in ("kl_per_window", "log_ppl_per_window"):
        d = np.asarray(a[key]) - np.asarray(b[key])
        higher, lower = sign_counts(d)
        out[key.removesuffix("_per_window")] = {"mean_diff": float(d.mean()), "median_diff": float(np.median(d)),
                                                "a_lower_in": int(lower), "windows": int(d.size),
                                                "p": float(sign_test(higher, lower)), "test": "exact sign test"}
    return out


@dataclasses.dataclass(frozen=True)
class Base:
    """One pruned model the heals start from: a drop-block K or a width setting."""

    label: str
    strategy: str
    options: dict[str, Any]


def bases(args: argparse.Namespace) -> list[Base]:
    """``--k 4,8`` and ``--width "mlp=0.25;mlp=0.1,hidden=0.1"`` as the list of pruned models to heal."""
    out = [Base(f"drop-block k={k}", "drop-block", {"k": int(k)}) for k in args.k.split(",") if k]
    for spec in (s for s in args.width.split(";") if s):
        options = {key.strip(): float(value) for key, value in (pair.split("=") for pair in spec.split(","))}
        out.append(Base("width " + ", ".join(f"{k}={v:g}" for k, v in options.items()), "width", options))
    return out


def prune_base(dense, base: Base, calibration: dict[str, Any]):
    """A pruned deep copy of the dense model and the strategy's report."""
    from prunelab.model.adapter import adapt
    from prunelab.prune.api import prune

    model = copy.deepcopy(dense.model)
    loaded = dataclasses.replace(dense, model=model, adapter=adapt(model))
    return loaded, prune(loaded, base.strategy, seed=0, calibration=calibration, **base.options)


def budget_curve(row: dict[str, Any]) -> list[dict[str, Any]]:
    """full-kd from the unhealed model up through each budget: each step paired with the one below
    (does a larger budget lower KL on the same windows?)."""
    runs = sorted(((h["tokens_trained"], name, h) for name, h in row["healed"].items() if name.startswith("full-kd")),
                  key=lambda run: run[0])
    steps, below = [], ("unhealed", row["unhealed"])
    for tokens, name, healed in runs:
        steps.append({"from": below[0], "to": name, "tokens": tokens, **paired(healed, below[1])})
        below = (name, healed)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, windows=16, eval_seqlen=256)
    parser.add_argument("--k", default="4", help="block sizes to remove ('' for none)")
    parser.add_argument("--width", default="", help="width settings to heal, ';'-separated (e.g. 'mlp=0.25')")
    parser.add_argument("--tokens", type=int, default=6144, help="token budget of every heal")
    parser.add_argument("--budgets", default="0.25,0.5", help="smaller budgets for full-kd, as fractions of --tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=256, help="healing window length")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lr-lora", type=float, default=5e-4)
    parser.add_argument("--lr-full", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--data", default=str(HEAL_DATA), help="healing text (default: WikiText-2 validation)")
    parser.add_argument("--autocast", default="model", help="distill's dtype option (bfloat16 on a GPU)")
    args = parser.parse_args()
    from prunelab.prune.recovery import kept_layers

    started = time.perf_counter()
    scoring = load_scoring(args)
    dense, windows, dense_logp = scoring.dense, scoring.windows, scoring.dense_logp
    common = {"batch": args.batch, "accumulate": args.accumulate, "seqlen": args.seqlen, "warmup": args.warmup,
              "data": args.data, "dtype": args.autocast}
    result: dict[str, Any] = {
        "model": Path(args.model).name, "layers": dense.adapter.num_layers, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "tokens": args.tokens, "heal": common, "methods": methods(args),
        "eval": {"windows": args.windows, "seqlen": args.eval_seqlen, "split": "WikiText-2 test (first windows)"},
        "dense": {"perplexity": math.exp(sum(per_window(None, windows, dense_logp)["nll"])
                                         / (args.windows * (args.eval_seqlen - 1)))}, "rows": []}

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - started, 1)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    calibration = {"source": str(HEAL_DATA), "samples": args.calibration_samples, "seqlen": 256}
    for base in bases(args):
        pruned, report = prune_base(dense, base, calibration)
        layer_map = kept_layers(report.get("dropped_layers", []), dense.adapter.num_layers)
        row: dict[str, Any] = {"base": base.label, "strategy": base.strategy, "options": base.options,
                               "k": base.options.get("k"), "dropped_layers": report.get("dropped_layers"),
                               "parameters": sum(p.numel() for p in pruned.model.parameters()),
                               "unhealed": summary(per_window(pruned.model, windows, dense_logp)), "healed": {}}
        print(f"{base.label} layers {row['dropped_layers']}: unhealed ppl {row['unhealed']['perplexity']:.2f} "
              f"KL {row['unhealed']['kl_to_dense']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        result["rows"].append(row)
        runs = [(name, args.tokens, options) for name, options in methods(args).items()]
        runs += [(f"full-kd@{float(fraction):g}", int(args.tokens * float(fraction)), methods(args)["full-kd"])
                 for fraction in args.budgets.split(",") if fraction]
        for name, tokens, options in runs:
            print(f"  {name}: {tokens} tokens", flush=True)
            healed, cost = heal_copy(pruned, dense, layer_map, {**common, **options, "tokens": tokens})
            row["healed"][name] = {**cost, **summary(per_window(healed.model, windows, dense_logp))}
            row["healed"][name]["vs_unhealed"] = paired(row["healed"][name], row["unhealed"])
            print(f"  {name}: ppl {row['healed'][name]['perplexity']:.2f} KL {row['healed'][name]['kl_to_dense']:.4f}"
                  f" {cost['tokens_per_s']:.0f} tokens/s ({time.perf_counter() - started:.0f} s)", flush=True)
            del healed
            save()
        healed_runs = row["healed"]
        row["paired"] = {f"{a} vs {b}": paired(healed_runs[a], healed_runs[b])
                         for a, b in (("lora-kd", "lora-ce"), ("full-kd", "lora-ce"), ("full-kd", "lora-kd"))}
        row["budget_curve"] = budget_curve(row)
        save()
        del pruned
    print(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
