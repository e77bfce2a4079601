"""Pruning quality and cost: WikiText-2 perplexity of dense, magnitude, Wanda and SparseGPT models.

Why: the papers report a clear ordering at 50 % unstructured sparsity (Llama-2-7B, WikiText-2,
seqlen 4096: dense 5.12, magnitude 14.89, SparseGPT 6.51, Wanda 6.42) and a larger gap at 2:4.
This script checks that prunelab's implementations reproduce that ordering on the small test
models, and measures what Wanda and SparseGPT cost: wall time of the whole ``prune()`` call
(calibration sampling, the layer-wise passes, mask selection / reconstruction) and the peak memory
added while pruning (resident memory sampled every 10 ms on CPU, above the loaded model with its
mmapped weights faulted in; ``max_memory_allocated`` on CUDA).

Every variant runs in its own process from a freshly loaded model (the GGUF is dequantized once and
cached), so one variant's freed memory cannot hide the next one's peak. The
perplexity follows the ``wikitext`` evaluator exactly (WikiText-2 test lines joined with "\\n\\n",
tokenized without special tokens, non-overlapping windows of ``--seqlen`` tokens, exp of the mean
token NLL); with ``--windows N`` only the first N windows are scored, the same ones for every
variant. Calibration: ``--samples`` x ``--calibration-seqlen`` tokens from a local text file, the
same seed (so the same samples) for every method.

Usage (the BENCHMARKS.md run):
    python benchmarks/pruning_quality.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf \\
        --samples 32 --calibration-seqlen 512 --seqlen 512 --windows 32 --threads 1 --json smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
PAPER = "Llama-2-7B, 50% (Wanda paper, Table 3): dense 5.12, magnitude 14.89, SparseGPT 6.51, Wanda 6.42"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict that gets 'peak_extra_mb': the most memory above the starting level meanwhile."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        result["peak_extra_mb"] = (peak[0] - base) / 2**20


def perplexity(lm, windows: torch.Tensor) -> tuple[float, float]:
    from prunelab.evaluate.engine import Engine

    engine = Engine(lm.model, lm.tokenizer, lm.adapter)
    start = time.perf_counter()
    sums, counts = engine.window_nll(windows)
    return float(torch.tensor(sum(sums) / sum(counts)).exp()), time.perf_counter() - start


def wikitext_windows(tokenizer, seqlen: int, count: int | None) -> tuple[torch.Tensor, int]:
    """The first ``count`` windows of the wikitext evaluator's token stream, and how many exist."""
    from prunelab_plugins.wikitext import lines_from_raw

    raw = (SHARED / "data" / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    text = "\n\n".join(lines_from_raw(raw))
    from prunelab.model.windows import consecutive_windows, window_bos, window_count

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    bos = window_bos(tokenizer)  # the evaluator's windows: BOS first where the tokenizer adds it
    total = window_count(ids.numel(), seqlen, bos)
    n = total if count is None else min(count, total)
    return consecutive_windows(ids, range(n), seqlen, bos), total


def run_variant(args, method: str, pattern: str) -> dict[str, Any]:
    """Load, prune and score one variant (in its own process, so memory baselines are clean)."""
    from prunelab.model.loading import load_model
    from prunelab.prune.api import prune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load_model(args.model, dtype=args.dtype, device=args.device)
    with torch.no_grad():  # fault in the lazily mmapped weights, so the memory baseline includes them
        for param in lm.model.parameters():
            param.mul_(1)
    row: dict[str, Any] = {"method": method, "pattern": pattern if method != "dense" else "-"}
    if method != "dense":
        options: dict[str, Any] = {"sparsity": args.sparsity} if pattern == "unstructured" else {"pattern": pattern}
        calibration = {"source": args.calibration, "samples": args.samples, "seqlen": args.calibration_seqlen}
        row["load_before"] = os.getloadavg()[0]
        with peak_memory(lm.device) as memory:
            start = time.perf_counter()
            report = prune(lm, method, seed=args.seed, calibration=calibration, **options)
            row["prune_s"] = time.perf_counter() - start
        row["load_after"] = os.getloadavg()[0]
        row["prune_peak_extra_mb"] = memory["peak_extra_mb"]
        row["achieved_sparsity_pct"] = report["sparsity"]["total"]["sparsity_pct"]
    if not args.no_eval:
        windows, _ = wikitext_windows(lm.tokenizer, args.seqlen, args.windows)
        row["perplexity"], row["eval_s"] = perplexity(lm, windows)
    return row


def run_isolated(method: str, pattern: str) -> dict[str, Any]:
    """Run one variant in a fresh Python process and return its row."""
    command = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{method}={pattern}"]
    result = subprocess.run(command, capture_output=True, text=True)
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode != 0 or not rows:
        raise SystemExit(f"variant {method} {pattern} failed:\n{result.stderr[-3000:]}")
    row = json.loads(rows[-1])
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | pattern | achieved sparsity | WikiText-2 ppl | prune time (s) | prune peak extra memory (MiB) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        sparsity = f"{r['achieved_sparsity_pct']:.2f}%" if "achieved_sparsity_pct" in r else "0%"
        timing = f"{r['prune_s']:.1f}" if "prune_s" in r else "-"
        memory = f"{r['prune_peak_extra_mb']:.0f}" if "prune_peak_extra_mb" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['method']} | {r['pattern']} | {sparsity} | {ppl} | {timing} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GGUF file or HF folder")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=50)
    parser.add_argument("--calibration", default=str(SHARED / "data" / "calibration" / "wikitext-2-valid.tokens.txt"))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--calibration-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window")
    parser.add_argument("--windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the rows and settings here")
    parser.add_argument("--no-eval", action="store_true", help="only prune (time and memory), no perplexity")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # method=pattern, in a child process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        method, pattern = args.variant.split("=")
        print("ROW " + json.dumps(run_variant(args, method, pattern)), flush=True)
        return

    from prunelab.model.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = load_model(args.model, dtype=args.dtype, device=args.device).tokenizer
    windows, total = wikitext_windows(tokenizer, args.seqlen, args.windows)
    settings = {
        "model": args.model, "seqlen": args.seqlen, "windows": 0 if args.no_eval else len(windows),
        "windows_available": total,
        "calibration": args.calibration, "samples": args.samples, "calibration_seqlen": args.calibration_seqlen,
        "seed": args.seed, "sparsity": args.sparsity, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(json.dumps(settings), flush=True)
    rows = [] if args.no_eval else [run_isolated("dense", "-")]
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            rows.append(run_isolated(method, pattern))
    print(markdown(rows))
    print(f"reference: {PAPER}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
