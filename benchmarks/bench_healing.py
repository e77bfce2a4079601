"""Healing after layer removal: WikiText-2 perplexity and KL to dense, before and after a LoRA heal.

For each K: drop the contiguous block of K layers with the smallest angular distance (drop-block,
calibrated on the WikiText-2 *validation* file), score it, heal it with ``prunelab.prune.recovery.heal``
(LoRA on every decoder Linear, trained on the same validation file, never the test split), score it
again. Scoring runs on the same WikiText-2 *test* windows for dense and every variant:

* perplexity = exp(mean NLL over every predicted token of the windows);
* KL(dense || variant) = mean over the same tokens of sum_v p_dense(v) (log p_dense(v) - log p_var(v)),
  from full logits (49k vocabulary for SmolLM2, 152k for Qwen2.5; one window at a time).

Time per healing step is the median of the method's own per-step timings (forward, backward,
optimizer step); peak memory is the process's peak RSS while healing (VmHWM reset at the start,
``prunelab.model.bench.PeakMemory``; on CUDA ``max_memory_allocated``).

Usage (the BENCHMARKS.md runs, CPU):
    OMP_NUM_THREADS=2 python benchmarks/bench_healing.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf \\
        --k 2,4,8 --steps 10 --batch 4 --seqlen 256 --windows 4 --threads 1 --json benchmarks/results/healing_smollm2.json
    OMP_NUM_THREADS=2 python benchmarks/bench_healing.py --model ~/.cache/prunelab-test-models/qwen2.5/*.gguf \
        --k 4 --steps 10 --batch 2 --seqlen 256 --windows 4 --threads 1 --json benchmarks/results/healing_qwen2.5.json
The same on a GPU (bf16, a real budget):
    python benchmarks/bench_healing.py --model Qwen/Qwen3-0.6B --device cuda --dtype bfloat16 \\
        --k 2,4,8 --steps 500 --batch 8 --seqlen 1024 --windows 40 --eval-seqlen 2048 --json healing_qwen3.json
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
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
HEAL_DATA = SHARED / "data" / "calibration" / "wikitext-2-valid.tokens.txt"
TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"


def test_windows(tokenizer, count: int, seqlen: int) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of the WikiText-2 test split (joined as the task does)."""
    from prunelab_plugins.wikitext import lines_from_raw

    text = "\n\n".join(lines_from_raw(TEST.read_text(encoding="utf-8")))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def log_probs(model, window: torch.Tensor) -> torch.Tensor:
    """log p(next token) at every position but the last, float32, (seqlen - 1, vocab)."""
    device = next(model.parameters()).device
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def per_window(model, windows: torch.Tensor, dense: list[torch.Tensor] | None) -> dict[str, list[float]]:
    """Per window: summed NLL, predicted tokens and (with dense log-probs) summed KL(dense || model).

    ``model`` None scores the dense log-probs themselves (no second pass through the dense model).
    """
    rows: dict[str, list[float]] = {"nll": [], "tokens": [], "kl": []}
    for i, window in enumerate(windows):
        logp = dense[i] if model is None else log_probs(model, window)
        targets = window[1:]
        rows["nll"].append(-float(logp.gather(1, targets[:, None]).sum()))
        rows["tokens"].append(targets.numel())
        if dense is not None:
            rows["kl"].append(float((dense[i].exp() * (dense[i] - logp)).sum()))
    return rows


def score(model, windows: torch.Tensor, dense: list[torch.Tensor] | None) -> dict[str, float]:
    """Perplexity on the windows, and the mean per-token KL(dense || model) when dense log-probs are given."""
    rows = per_window(model, windows, dense)
    tokens = sum(rows["tokens"])
    return {"perplexity": math.exp(sum(rows["nll"]) / tokens),
            **({"kl_to_dense": sum(rows["kl"]) / tokens} if dense is not None else {})}


def drop_block(dense, k: int, calibration: dict[str, Any]):
    from prunelab.model.adapter import adapt
    from prunelab.prune.api import prune

    model = copy.deepcopy(dense.model)
    loaded = dataclasses.replace(dense, model=model, adapter=adapt(model))
    if k == 0:  # the control: heal the dense model itself (how much is domain adaptation?)
        return loaded, {"dropped_layers": []}
    report = prune(loaded, "drop-block", seed=0, calibration=calibration, k=k)
    return loaded, report


def heal_timed(loaded, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from prunelab.model.bench import PeakMemory
    from prunelab.prune.recovery import heal

    with PeakMemory(loaded.device) as peak:
        report = heal(loaded, "lora", seed=0, progress=lambda step, loss, rate: print(f"  step {step} loss {loss:.4f}",
                                                                                 flush=True), **options)
    seconds = report["step_seconds"]
    cost = {"step_s_median": statistics.median(seconds), "step_s_first": seconds[0],
            "step_s_rest_median": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
            "heal_s": report["seconds"], "peak_memory_bytes": peak.peak_bytes(), "peak_memory_kind": peak.kind,
            "trainable_parameters": report["trainable_parameters"], "tokens_trained": report["tokens_trained"]}
    return report, cost


def add_common_arguments(parser: argparse.ArgumentParser, windows: int, eval_seqlen: int) -> None:
    """The model, scoring and machine arguments every healing benchmark shares (``bench_distill`` too)."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, default=windows, help="WikiText-2 test windows to score")
    parser.add_argument("--eval-seqlen", type=int, default=eval_seqlen)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", required=True)


@dataclasses.dataclass
class Scoring:
    """The dense model, the scored test windows and the dense log-probs every variant is compared with."""

    dense: Any
    windows: torch.Tensor
    dense_logp: list[torch.Tensor]


def load_scoring(args: argparse.Namespace) -> Scoring:
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    from prunelab.model.loading import load_model

    dense = load_model(args.model, device=args.device, dtype=args.dtype)
    windows = test_windows(dense.tokenizer, args.windows, args.eval_seqlen)
    return Scoring(dense, windows, [log_probs(dense.model, w) for w in windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser, windows=8, eval_seqlen=512)
    parser.add_argument("--k", default="2,4,8", help="block sizes to remove (0: heal the dense model, a control)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256, help="healing window length")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    started = time.perf_counter()
    scoring = load_scoring(args)
    dense, windows, dense_logp = scoring.dense, scoring.windows, scoring.dense_logp
    dense_score = score(None, windows, dense_logp)
    dense_score.pop("kl_to_dense")
    print(f"dense: {dense_score} ({time.perf_counter() - started:.0f} s)", flush=True)
    calibration = {"source": str(HEAL_DATA), "samples": args.calibration_samples, "seqlen": 256}
    options = {"steps": args.steps, "batch": args.batch, "seqlen": args.seqlen, "rank": args.rank,
               "alpha": args.alpha, "lr": args.lr, "data": str(HEAL_DATA)}
    rows = []
    for k in [int(x) for x in args.k.split(",")]:
        loaded, report = drop_block(dense, k, calibration)
        before = score(loaded.model, windows, dense_logp)
        print(f"K={k} layers {report.get('dropped_layers')}: before {before}", flush=True)
        healed, cost = heal_timed(loaded, options)
        after = score(loaded.model, windows, dense_logp)
        print(f"K={k}: after {after}; {cost}", flush=True)
        rows.append({"k": k, "dropped_layers": report.get("dropped_layers"), "before": before, "after": after,
                     "loss_first": healed["loss"][0], "loss_last": healed["loss"][-1], "loss": healed["loss"], **cost})
        del loaded
    result = {
        "model": Path(args.model).name, "layers": dense.adapter.num_layers, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "heal": options, "eval": {"windows": args.windows, "seqlen": args.eval_seqlen,
                                                          "split": "WikiText-2 test (first windows)"},
        "dense": dense_score, "rows": rows, "wall_s": round(time.perf_counter() - started, 1),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
