"""Model cost of layer removal and of (dense-stored) sparsity: measured vs expected speedup.

Variants of one model, all in memory and measured side by side:

* ``dense``;
* ``drop-block k=K`` for each K: the contiguous block of K layers with the smallest angular
  distance on a few calibration samples (which layers go does not change the speed, only how many);
* ``magnitude 50%`` (unstructured) and ``magnitude 2:4``: zeros stored in dense tensors.

Every configuration (prefill at each prompt length, batch 1; decode at each batch size after a
prompt of the shortest length) is measured in rounds: one warm-up round, then ``--repeats`` rounds,
and in each round every variant runs once in turn. Interleaving matters on a shared machine: load
that comes and goes hits all variants alike instead of whichever happened to run at the time.
The order of the variants rotates from round to round (with as many rounds as variants, each
variant runs once in every position), because in a first run the variant measured first in every
round decoded ~20% slower than the others for no reason of its own. The reported figure is the
median over rounds; the speedup is the median over rounds of the paired
ratio dense seconds / variant seconds of the same round, with its range over rounds.

Expected speedup for K of N layers: N/(N-K) for the decoder layers alone, and the per-token matmul
bound with the output head (``prunelab.model.bench.expected_speedup``); zeros in dense tensors:
1.0 (the same dense matmuls run).

Usage (the BENCHMARKS.md run):
    python benchmarks/bench_layer_removal.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf \\
        --k 4,8 --repeats 5 --threads 1 --json benchmarks/results/layer_removal_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
CALIBRATION = SHARED / "data" / "calibration" / "wikitext-2-valid.tokens.txt"


def build_variants(dense, ks: list[int], calibration: dict[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (loaded model, prune report or {}); the dense model itself is never changed."""
    from prunelab.model.adapter import adapt
    from prunelab.prune.api import prune

    def copy_of():
        model = copy.deepcopy(dense.model)
        return dataclasses.replace(dense, model=model, adapter=adapt(model))

    # dense is a copy too, so every variant's weights were allocated the same way (the loaded
    # model's tensors come from the checkpoint loader, the others from deepcopy)
    variants: dict[str, tuple[Any, dict[str, Any]]] = {"dense": (copy_of(), {})}
    for k in ks:
        loaded = copy_of()
        variants[f"drop-block k={k}"] = (loaded, dict(prune(loaded, "drop-block", k=k, calibration=calibration)))
    for name, options in (("magnitude 50%", {"sparsity": 50}), ("magnitude 2:4", {"pattern": "2:4"})):
        loaded = copy_of()
        report = prune(loaded, "magnitude", **options)
        variants[name] = (loaded, {"sparsity_pct": report["sparsity"]["total"]["sparsity_pct"]})
    return variants


def file_bytes(loaded) -> int:
    """Size of the weights ``save_pretrained`` writes for this variant (saved to a temporary folder)."""
    from prunelab.model.bench import weight_file_bytes

    folder = Path(tempfile.mkdtemp(prefix="prunelab-bench-"))
    try:
        loaded.model.save_pretrained(folder)
        return weight_file_bytes(folder) or 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_rounds(variants, lengths: list[int], batches: list[int], new_tokens: int, repeats: int) -> dict:
    """seconds[variant][config] over ``repeats`` interleaved rounds (after one warm-up round)."""
    from prunelab.model.bench import random_prompts, time_decode, time_prefill

    configs = [("prefill", length, 1) for length in lengths] + [("decode", min(lengths), b) for b in batches]
    seconds: dict[str, dict[tuple, list[float]]] = {name: {c: [] for c in configs} for name in variants}
    names = list(variants)
    for round_index in range(repeats + 1):
        started = time.perf_counter()
        shift = round_index % len(names)  # rotate the order: no variant is always first
        for name in names[shift:] + names[:shift]:
            loaded = variants[name][0]
            for kind, length, batch in configs:
                tokens = random_prompts(loaded.adapter, batch, length, seed=0)
                if kind == "prefill":
                    spent = time_prefill(loaded.adapter, tokens)
                else:
                    spent = time_decode(loaded.adapter, tokens, new_tokens)
                if round_index > 0:
                    seconds[name][(kind, length, batch)].append(spent)
        label = "warm-up" if round_index == 0 else f"round {round_index}/{repeats}"
        print(f"{label}: {time.perf_counter() - started:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GGUF file, model folder or Hub id")
    parser.add_argument("--k", default="4,8", help="numbers of layers to remove")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--calibration", default=str(CALIBRATION), help="text file for choosing the block")
    parser.add_argument("--json", default=None, help="write all numbers here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from prunelab.model.bench import expected_speedup, parameter_count, parse_int_list
    from prunelab.model.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    ks = parse_int_list(args.k, "--k")
    lengths = parse_int_list(args.prompt_lengths, "--prompt-lengths")
    batches = parse_int_list(args.batch, "--batch")
    dense = load_model(args.model, device="cpu", dtype="float32")
    calibration = {"source": args.calibration, "samples": 4, "seqlen": 256}
    variants = build_variants(dense, ks, calibration)
    seconds = measure_rounds(variants, lengths, batches, args.new_tokens, args.repeats)

    adapter = dense.adapter
    n = adapter.num_layers
    layer_params = sum(p.numel() for p in adapter.layers[0].parameters())
    head_params = adapter.head.weight.numel()
    rows = []
    for name, (loaded, report) in variants.items():
        removed = n - loaded.adapter.num_layers
        bounds = expected_speedup(n, removed, layer_params, head_params) if removed else {"decoder_only": 1.0, "with_head": 1.0}
        row = {"variant": name, "layers": loaded.adapter.num_layers, "removed_layers": report.get("dropped_layers", []),
               "parameters": parameter_count(loaded.model), "file_bytes": file_bytes(loaded),
               "sparsity_pct": report.get("sparsity_pct"), "expected": bounds, "configs": []}
        for (kind, length, batch), runs in seconds[name].items():
            tokens = length * batch if kind == "prefill" else batch * args.new_tokens
            median = statistics.median(runs)
            dense_median = statistics.median(seconds["dense"][(kind, length, batch)])
            paired = [d / v for d, v in zip(seconds["dense"][(kind, length, batch)], runs, strict=True)]
            row["configs"].append({"kind": kind, "prompt_length": length, "batch": batch, "runs": runs,
                                   "seconds": median, "tokens_per_s": tokens / median,
                                   "speedup": dense_median / median, "paired_speedups": paired,
                                   "paired_speedup_median": statistics.median(paired)})
        rows.append(row)

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average": os.getloadavg()}
    print_markdown(rows, args, machine)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "machine": machine, "args": vars(args),
                                               "variants": rows}, indent=2) + "\n")


def print_markdown(rows, args, machine) -> None:
    configs = rows[0]["configs"]
    header = ["variant", "layers", "params (M)", "file (MB)"]
    header += [f"{c['kind']} {c['prompt_length'] if c['kind'] == 'prefill' else 'b' + str(c['batch'])} tok/s (x, range)"
               for c in configs]
    header += ["expected x (layers only / with head)"]
    print(f"\nthreads {machine['torch_threads']}, load average at the end {machine['load_average']}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["variant"], str(row["layers"]), f"{row['parameters'] / 1e6:.1f}", f"{row['file_bytes'] / 1e6:.0f}"]
        cells += [f"{c['tokens_per_s']:.1f} ({c['paired_speedup_median']:.2f}, {min(c['paired_speedups']):.2f}-"
                  f"{max(c['paired_speedups']):.2f})" for c in row["configs"]]
        exp = row["expected"]
        cells.append(f"{exp['decoder_only']:.2f} / {exp['with_head']:.2f}")
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        if row["removed_layers"]:
            print(f"{row['variant']}: removed layers {row['removed_layers']}")


if __name__ == "__main__":
    main()
