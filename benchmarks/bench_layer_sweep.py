"""Single-layer sweep through the study runner: shared-prefix reuse (LayerSweep) vs one pruned model each.

The same study (dense + every single-layer removal, MMLU 5-shot on a few subjects and WikiText-2
windows) is run twice through ``prunelab.runner.run.run_study``: once as users get it (the layer sweep:
layers below the removed one computed once per chunk for all variants) and once with
``layer_sweep=False`` (each variant a pruned copy evaluated from scratch -- the naive loop). Reports
wall and process-CPU seconds of both, their ratio, and how the per-item results compare: identical
MMLU predictions, the largest log-likelihood and window-NLL differences (float rounding only).

    python benchmarks/bench_layer_sweep.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from prunelab.model.loading import load_model
from prunelab.runner.run import run_study
from prunelab.runner.studyfile import load_study

HERE = Path(__file__).resolve().parent


def small_data(source: Path, subjects: int, target: Path) -> Path:
    """The shared data with MMLU cut to its first ``subjects`` subjects (the runner takes every subject)."""
    names = sorted(p.name.removesuffix("_test.csv") for p in (source / "mmlu" / "test").glob("*_test.csv"))[:subjects]
    for split in ("test", "dev"):
        (target / "mmlu" / split).mkdir(parents=True)
        for name in names:
            shutil.copy(source / "mmlu" / split / f"{name}_{split}.csv", target / "mmlu" / split)
    (target / "wikitext-2").symlink_to((source / "wikitext-2").resolve())
    return target


def study_file(folder: Path, args: argparse.Namespace, data: Path) -> Path:
    path = folder / "sweep.toml"
    path.write_text(f"""model = "{Path(args.model).expanduser().resolve()}"
device = "cpu"
dtype = "{args.dtype}"
[evaluation]
tasks = ["mmlu", "wikitext"]
sample = "first"
data_dir = "{data}"
[evaluation.mmlu]
limit = {args.limit}
num_fewshot = 5
[evaluation.wikitext]
limit = {args.windows}
seqlen = {args.seqlen}
[[strategies]]
name = "drop-layers"
layers = "each"
""")
    return path


def timed_run(study, out: Path, layer_sweep: bool) -> tuple[pl.DataFrame, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run = run_study(study, out, layer_sweep=layer_sweep)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    items = pl.read_parquet(run / "items.parquet").sort("variant", "task", "metric", "item_id")
    return items, wall, cpu


def compare(sweep: pl.DataFrame, naive: pl.DataFrame) -> dict:
    keys = ["variant", "task", "metric", "item_id"]
    assert sweep.select(keys).equals(naive.select(keys)), "the two runs evaluated different items"
    mmlu = pl.col("task") == "mmlu"
    ours, theirs = sweep.filter(mmlu), naive.filter(mmlu)
    ll_diff = max(abs(a - b) for x, y in zip(ours["loglikelihoods"], theirs["loglikelihoods"], strict=True)
                  for a, b in zip(json.loads(x), json.loads(y), strict=True))
    windows = pl.col("task") == "wikitext"
    nll = sweep.filter(windows)["nll_sum"] - naive.filter(windows)["nll_sum"]
    return {
        "mmlu_items": len(ours), "identical_mmlu_predictions": int((ours["prediction"] == theirs["prediction"]).sum()),
        "max_abs_loglikelihood_diff": ll_diff,
        "wikitext_windows": sweep.filter(windows).height,
        "max_abs_window_nll_diff": float(nll.abs().max()),
        "max_rel_window_nll_diff": float((nll.abs() / naive.filter(windows)["nll_sum"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", default=str(HERE.parents[1] / "shared" / "data"))
    parser.add_argument("--limit", type=int, default=2, help="MMLU questions per subject")
    parser.add_argument("--subjects", type=int, default=4, help="first N MMLU subjects")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = small_data(Path(args.data_dir), args.subjects, folder / "data")
        study = load_study(study_file(folder, args, data))
        load_model(study.model, dtype=args.dtype)  # converts a GGUF once, outside both timings
        naive, naive_wall, naive_cpu = timed_run(study, folder / "naive", layer_sweep=False)
        sweep, sweep_wall, sweep_cpu = timed_run(study, folder / "sweep", layer_sweep=True)
    report = {
        "model": args.model, "dtype": args.dtype, "variants": sweep["variant"].n_unique(),
        "mmlu": f"5-shot, first {args.limit} of the first {args.subjects} subjects",
        "wikitext": f"{args.windows} windows x {args.seqlen} tokens",
        "naive_wall_s": round(naive_wall, 1), "sweep_wall_s": round(sweep_wall, 1),
        "naive_cpu_s": round(naive_cpu, 1), "sweep_cpu_s": round(sweep_cpu, 1),
        "ratio_wall": round(sweep_wall / naive_wall, 3), "ratio_cpu": round(sweep_cpu / naive_cpu, 3),
        **compare(sweep, naive),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
