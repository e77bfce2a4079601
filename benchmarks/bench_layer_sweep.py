"""Single-layer sweep: shared-prefix reuse (LayerSweep) against the naive loop, same items, one run.

Naive: for each layer i, a copy of the model without layer i (prunelab.surgery.drop_layers) is
evaluated from scratch. Reuse: one LayerSweep computes the dense model and every variant, running
only layers after the removed one. Reports both wall times, their ratio, and whether every per-item
result (MMLU log-likelihoods and predictions, WikiText window NLLs) is identical.

    python benchmarks/bench_layer_sweep.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from prunelab.adapter import adapt
from prunelab.data import DataSource, Subset
from prunelab.engine import Engine
from prunelab.evaluate import prepare_tasks, run_task
from prunelab.layersweep import LayerSweep
from prunelab.modeling import load_model
from prunelab.surgery import drop_layers


def per_item(result) -> list:
    keys = ("loglikelihoods", "prediction", "nll_sum")
    return [tuple(r.get(k) for k in keys if k in r) for r in result.records]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--limit", type=int, default=2, help="MMLU questions per subject")
    parser.add_argument("--subjects", type=int, default=6, help="first N MMLU subjects")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    lm = load_model(args.model, dtype=args.dtype)
    tasks = prepare_tasks(["mmlu", "wikitext"], DataSource.resolve(args.data_dir), Subset(limit=args.limit, sample="first"),
                          {"num_fewshot": 5, "seqlen": args.seqlen})
    subjects = sorted({i.group for i in tasks[0].items})[: args.subjects]
    tasks[0].items = [i for i in tasks[0].items if i.group in subjects]
    tasks[1].items[0].data["subset"] = Subset(limit=args.windows, sample="first")
    layers = list(range(lm.adapter.num_layers))

    start = time.perf_counter()
    naive = {None: [per_item(run_task(Engine(lm.model, lm.tokenizer, lm.adapter), t)) for t in tasks]}
    for i in layers:
        model = copy.deepcopy(lm.model)
        drop_layers(model, [i])
        engine = Engine(model, lm.tokenizer, adapt(model))
        naive[i] = [per_item(run_task(engine, t)) for t in tasks]
        del model, engine
    naive_s = time.perf_counter() - start

    start = time.perf_counter()
    sweep = LayerSweep(Engine(lm.model, lm.tokenizer, lm.adapter), layers)
    reused = {v: [per_item(run_task(sweep.view(v), t)) for t in tasks] for v in sweep.variants()}
    reuse_s = time.perf_counter() - start

    identical = sum(naive[v] == reused[v] for v in naive)
    report = {
        "model": args.model, "dtype": args.dtype, "layers": len(layers), "variants": len(naive),
        "mmlu_questions": len(tasks[0].items), "wikitext_windows": args.windows, "seqlen": args.seqlen,
        "naive_s": round(naive_s, 1), "reuse_s": round(reuse_s, 1), "ratio": round(reuse_s / naive_s, 3),
        "variants_with_identical_per_item_results": f"{identical}/{len(naive)}",
        "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
