"""Memory of the fidelity metrics (KL to dense, top-1 agreement) on WikiText windows.

The dense reference is the dense model's final hidden states (windows x seqlen x hidden), not its
logits (windows x seqlen x vocab): variants recompute the exact dense distribution from them one head
chunk at a time. This measures, for ``--windows`` windows of ``--seqlen`` tokens on a real model:

* the reference's size, next to what full dense logits would take;
* the peak resident memory (VmHWM, reset through /proc/self/clear_refs) above the loaded model while
  the dense pass keeps its hidden states, and while a variant (one layer removed) is scored against
  the reference with KL and top-1;
* the seconds of both passes, and a variant pass without fidelity for the ratio.

    python benchmarks/bench_fidelity_memory.py --model ~/.cache/prunelab-test-models/qwen2.5/*.gguf --windows 8 64

``--layers N`` keeps only the first N decoder layers (dense and variant alike): the fidelity path's
memory depends on the vocabulary, the hidden size and the window count, not on depth, and on a
shared 2-core machine 64 full-depth windows take too long. ``--no-baseline`` skips the pass without
fidelity (the time ratio).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

from prunelab.evaluate.engine import DenseReference, Engine, head_fingerprint
from prunelab.model.adapter import adapt
from prunelab.model.loading import load_model
from prunelab.model.surgery import drop_layers
from prunelab.model.windows import consecutive_windows, window_bos

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("PRUNELAB_SHARED", HERE.parent.parent / "shared"))


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def measure(label: str, run, base: float) -> tuple[object, dict[str, float]]:
    """Run, returning its result, seconds and peak resident memory above ``base`` (the loaded models)."""
    reset_peak()
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    return result, {f"{label}_s": round(seconds, 2), f"{label}_peak_above_models_mib": round(rss_mib("VmHWM") - base, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--drop", type=int, default=12, help="the variant: this layer removed")
    parser.add_argument("--data", default=str(SHARED / "data" / "wikitext-2" / "wiki.test.raw"))
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0: all)")
    parser.add_argument("--variant-windows", type=int, default=0,
                        help="score only the first K windows of the variant (the whole reference stays in memory)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the variant pass without fidelity")
    parser.add_argument("--out", default=str(HERE / "results" / "fidelity-memory.json"))
    args = parser.parse_args()

    loaded = load_model(args.model, dtype="float32")
    if args.layers:
        drop_layers(loaded.model, range(args.layers, loaded.adapter.num_layers))
        loaded = dataclasses.replace(loaded, adapter=adapt(loaded.model))
    text = "\n\n".join(line if line.strip() else "" for line in Path(args.data).read_text().splitlines(keepends=True))
    ids = torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = window_bos(loaded.tokenizer, loaded.adapter)
    variant = copy.deepcopy(loaded.model)
    drop_layers(variant, [args.drop])
    dense_engine = Engine(loaded.model, loaded.tokenizer, loaded.adapter)
    variant_engine = Engine(variant, loaded.tokenizer, adapt(variant))
    config = loaded.adapter.text_config
    results = []
    gc.collect()
    model_rss = rss_mib("VmRSS")
    for count in args.windows:
        windows = consecutive_windows(ids, range(count), args.seqlen, bos)
        row = {"windows": count, "seqlen": args.seqlen, "vocab": int(config.vocab_size),
               "hidden_size": int(config.hidden_size), "decoder_layers": loaded.adapter.num_layers,
               "models_rss_mib": round(model_rss, 1)}
        scores, stats = measure("dense_keep_hidden", lambda w=windows: dense_engine.window_scores(w, keep_hidden=True),
                               model_rss)
        row.update(stats)
        hidden = torch.stack(scores.hidden)
        del scores
        scored = args.variant_windows or count
        # a view of the first windows: the whole reference stays allocated, as in a study's chunk
        reference = DenseReference(hidden[:scored], windows[:scored], head_fingerprint(loaded.adapter))
        windows = windows[:scored]
        row["variant_windows"] = scored
        row["reference_mib"] = round(hidden.numel() * hidden.element_size() / 2**20, 1)
        row["full_dense_logits_mib"] = round(count * (args.seqlen - 1) * config.vocab_size * 4 / 2**20, 1)
        compared, stats = measure("variant_with_kl",
                                  lambda w=windows, r=reference: variant_engine.window_scores(w, reference=r),
                                  model_rss)
        row.update(stats)
        if not args.no_baseline:
            _, stats = measure("variant_nll_only", lambda w=windows: variant_engine.window_scores(w),
                               model_rss)
            row.update(stats)
            row["kl_cost_ratio"] = round(row["variant_with_kl_s"] / row["variant_nll_only_s"], 2)
        row["kl_mean"] = float(torch.cat(compared.kl).double().mean())
        row["top1_agree"] = float(torch.cat(compared.agree).double().mean())
        print(json.dumps(row), flush=True)
        results.append(row)
        del reference, hidden, compared
    doc = {"model": Path(args.model).name, "variant": f"layer {args.drop} removed",
           "command": "python benchmarks/bench_fidelity_memory.py " + " ".join(__import__("sys").argv[1:]), "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
