"""prunelab vs lm-evaluation-harness, side by side: same model weights, same items, same dtype.

Why: prunelab claims to score MMLU and GSM8K exactly as lm-eval does, only faster. This script
checks both claims in one run on one machine:

* agreement: identical MMLU predictions (argmax of the four log-likelihoods), the largest
  log-likelihood difference, identical GSM8K extracted answers (strict and flexible) and texts;
  the prompt strings and token ids of every item are compared too, so a disagreement can be told
  apart from an input difference;
* speed: wall and process-CPU seconds of each tool on the same work, as a ratio. The MMLU subjects
  are run in chunks, alternating lm-eval / prunelab float32 / prunelab bfloat16 per chunk, so a
  change in load from other processes on a shared machine hits every tool alike. Model loading is
  not timed (both are handed a loaded model).

lm-eval reads the local task configs in ``benchmarks/lm_eval_tasks/`` (verbatim copies of its
``mmlu`` and ``gsm8k`` tasks, GSM8K with ``fewshot_config: {sampler: first_n}``, reading the same
local files as prunelab). Both tools get the same safetensors folder (prunelab's GGUF conversion).

Usage (the BENCHMARKS.md runs):
    python benchmarks/compare_lm_eval.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf \\
        --mmlu-fraction 0.1 --gsm8k-limit 20 --threads 1
    python benchmarks/compare_lm_eval.py --model ~/.cache/prunelab-test-models/qwen2.5/*.gguf \\
        --mmlu-limit 3 --gsm8k-limit 10 --threads 1 --lm-eval-batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TASKS_DIR = HERE / "lm_eval_tasks"
LETTERS = "ABCD"


# ---------------------------------------------------------------------------- timing
@dataclass
class Clock:
    """Accumulated wall and process-CPU seconds of one tool over all its chunks."""

    wall: float = 0.0
    cpu: float = 0.0
    chunks: list[dict[str, float]] = field(default_factory=list)

    @contextmanager
    def measure(self, label: str):
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        spent = {"label": label, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                 "load_before": load_before, "load_after": os.getloadavg()[0]}
        self.wall += spent["wall_s"]
        self.cpu += spent["cpu_s"]
        self.chunks.append(spent)
        print(f"  {label}: {spent['wall_s']:.1f} s wall, {spent['cpu_s']:.1f} s cpu, "
              f"load {load_before:.1f}->{spent['load_after']:.1f}", flush=True)

    def summary(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 2), "cpu_s": round(self.cpu, 2)}


# ---------------------------------------------------------------------------- lm-eval side
def lm_eval_model(folder: Path, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)


def run_lm_eval(lm, task_manager, tasks: list[str], limit: float | int, num_fewshot: int) -> dict[str, list]:
    """lm-eval's per-sample logs ({task: [sample, ...]}) for ``tasks`` on the first ``limit`` docs."""
    import lm_eval

    result = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
        log_samples=True, bootstrap_iters=0, verbosity="WARNING",
    )
    return result["samples"]


def lm_mmlu_records(samples: dict[str, list]) -> dict[str, dict[str, Any]]:
    """item id (``subject/row``, prunelab's) -> lm-eval's prompt, log-likelihoods and prediction."""
    records = {}
    for task, rows in samples.items():
        subject = task.removeprefix("prunelab_mmlu_")
        for s in rows:
            lls = [float(r[0][0]) for r in s["resps"]]
            records[f"{subject}/{s['doc_id']}"] = {
                "prompt": s["arguments"][0][0], "loglikelihoods": lls,
                "prediction": LETTERS[max(range(4), key=lambda j: lls[j])],
            }
    return records


def lm_gsm8k_records(samples: list) -> dict[str, dict[str, Any]]:
    """item id (``test/row``) -> lm-eval's prompt, generated text and strict/flexible answers."""
    records: dict[str, dict[str, Any]] = {}
    for s in samples:
        entry = records.setdefault(f"test/{s['doc_id']}", {"prompt": s["arguments"][0][0], "generated": s["resps"][0][0]})
        kind = "strict" if s["filter"] == "strict-match" else "flexible"
        entry[f"answer_{kind}"] = s["filtered_resps"][0]
        entry[f"correct_{kind}"] = bool(s["exact_match"])
    return records


# ---------------------------------------------------------------------------- prunelab side
def prunelab_records(engine, task, items) -> dict[str, dict[str, Any]]:
    from prunelab.evaluate.run import PreparedTask, run_task

    result = run_task(engine, PreparedTask(task.evaluator, items, task.options))
    return {r["item_id"]: r for r in result.records}


def prunelab_prompt(task_name: str, item, k: int) -> str:
    """The exact prompt text prunelab's evaluator builds for an item (to diff against lm-eval's)."""
    if task_name == "mmlu":
        from prunelab_plugins.mmlu import build_prompt

        return build_prompt(item.group, item.data["shots"][:k], item.data)
    from prunelab_plugins.gsm8k import build_prompt

    return build_prompt(item.data["shots"][:k], item.data["question"])


# ---------------------------------------------------------------------------- comparisons
def compare_inputs(lm, engine, prompts: dict[str, tuple[str, str]], continuations: list[str]) -> dict[str, Any]:
    """Same prompt string and same token ids (context and each continuation) for every item?"""
    text_diff, token_diff = [], []
    for item_id, (ours, theirs) in prompts.items():
        if ours != theirs:
            text_diff.append(item_id)
            continue
        for cont in continuations or [None]:
            if cont is None:
                same = engine.encode(ours) == lm.tok_encode(ours)
            else:
                same = engine.encode_pair(ours, cont) == tuple(lm._encode_pair(ours, cont))
            if not same:
                token_diff.append(item_id)
                break
    return {"n": len(prompts), "prompt_text_differs": text_diff, "token_ids_differ": token_diff}


def compare_mmlu(reference: dict, ours: dict, label: str) -> dict[str, Any]:
    ids = sorted(reference)
    differs = [i for i in ids if ours[i]["prediction"] != reference[i]["prediction"]]
    diffs = [abs(a - b) for i in ids for a, b in zip(ours[i]["loglikelihoods"], reference[i]["loglikelihoods"], strict=True)]
    details = []
    for i in differs:
        ref = sorted(reference[i]["loglikelihoods"], reverse=True)
        details.append({"item_id": i, "reference": reference[i]["prediction"], label: ours[i]["prediction"],
                        "reference_top2_margin": ref[0] - ref[1],
                        "reference_lls": reference[i]["loglikelihoods"], f"{label}_lls": ours[i]["loglikelihoods"]})
    acc = _mean(ours[i]["correct"] for i in ids)
    return {"n": len(ids), "identical_predictions": len(ids) - len(differs),
            "identical_fraction": (len(ids) - len(differs)) / len(ids),
            "max_abs_loglikelihood_diff": max(diffs), "mean_abs_loglikelihood_diff": sum(diffs) / len(diffs),
            "acc": acc, "disagreements": details}


def compare_gsm8k(reference: dict, ours: dict) -> dict[str, Any]:
    ids = sorted(reference, key=lambda i: int(i.split("/")[1]))
    out: dict[str, Any] = {"n": len(ids)}
    for key in ("answer_strict", "answer_flexible", "generated"):
        same = [i for i in ids if ours[i][key] == reference[i][key]]
        out[f"identical_{key}"] = len(same)
        out[f"identical_{key}_fraction"] = len(same) / len(ids)
    out["disagreements"] = [
        {"item_id": i, **{f"reference_{k}": reference[i][k] for k in ("answer_strict", "answer_flexible", "generated")},
         **{f"ours_{k}": ours[i][k] for k in ("answer_strict", "answer_flexible", "generated")}}
        for i in ids if ours[i]["generated"] != reference[i]["generated"]
    ]
    return out


def speed(reference: Clock, ours: Clock, items: int) -> dict[str, Any]:
    return {"items": items, "lm_eval": reference.summary(), "prunelab": ours.summary(),
            "throughput_ratio_wall": reference.wall / ours.wall, "throughput_ratio_cpu": reference.cpu / ours.cpu,
            "items_per_s_lm_eval": items / reference.wall, "items_per_s_prunelab": items / ours.wall}


# ---------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=".gguf file or Hugging Face model folder")
    p.add_argument("--data-dir", default=str(HERE.parents[1] / "shared" / "data"))
    p.add_argument("--tasks", default="mmlu,gsm8k")
    p.add_argument("--num-fewshot", type=int, default=5)
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--mmlu-fraction", type=float, default=None, help="first ceil(f*n) per subject (lm-eval --limit f)")
    sel.add_argument("--mmlu-limit", type=int, default=None, help="first N per subject (lm-eval --limit N)")
    p.add_argument("--mmlu-subjects", default=None, help="comma-separated subset of subjects (default all)")
    p.add_argument("--gsm8k-limit", type=int, default=20)
    p.add_argument("--lm-eval-batch-size", type=int, default=8)
    p.add_argument("--chunk-subjects", type=int, default=6, help="MMLU subjects per alternation chunk")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both tools (default torch's)")
    p.add_argument("--no-bf16", action="store_true", help="skip the prunelab bfloat16 run")
    p.add_argument("--out", default=None, help="folder for summary.json (default benchmarks/results/<model>)")
    return p.parse_args(argv)


def resolve_folder(spec: str) -> Path:
    from prunelab.model.loading import classify_source, gguf_to_folder

    kind, path = classify_source(spec)
    if kind == "gguf":
        return gguf_to_folder(path)
    if kind == "dir":
        return path
    raise SystemExit("compare_lm_eval: pass a local .gguf file or model folder (both tools must read the same weights)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager

    from prunelab.evaluate.data import DataSource, Subset
    from prunelab.evaluate.engine import Engine
    from prunelab.evaluate.run import prepare_tasks
    from prunelab.model.loading import load_model

    os.environ["PRUNELAB_DATA"] = args.data_dir  # read by benchmarks/lm_eval_tasks/utils.py
    folder = resolve_folder(args.model)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_name = Path(args.model).name.removesuffix(".gguf")
    out_dir = Path(args.out) if args.out else HERE / "results" / model_name
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = out_dir
    print(f"model {args.model} -> {folder}; torch threads {torch.get_num_threads()}", flush=True)

    lm = lm_eval_model(folder, args.lm_eval_batch_size)
    dtypes = ["float32"] + ([] if args.no_bf16 else ["bfloat16"])
    engines = {}
    for dtype in dtypes:
        loaded = load_model(str(folder), device="cpu", dtype=dtype)
        engines[dtype] = Engine(loaded.model, loaded.tokenizer, loaded.adapter)
    task_manager = TaskManager(include_path=str(TASKS_DIR))
    source = DataSource.resolve(args.data_dir)
    summary: dict[str, Any] = {
        "model": args.model, "weights_folder": str(folder), "num_fewshot": args.num_fewshot,
        "settings": {"lm_eval": {"backend": "hf", "dtype": "float32", "batch_size": args.lm_eval_batch_size,
                                 "device": "cpu", "logits_cache": True},
                     "prunelab": {"dtypes": dtypes, "batch_tokens": engines["float32"].batch_tokens,
                                  "max_batch": engines["float32"].max_batch, "prefix_cache": True},
                     "torch_threads": torch.get_num_threads(), "chunk_subjects": args.chunk_subjects},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(),
    }

    if "mmlu" in tasks:
        summary["mmlu"] = run_mmlu(args, lm, engines, task_manager, source, prepare_tasks, Subset)
    if "gsm8k" in tasks:
        summary["gsm8k"] = run_gsm8k(args, lm, engines, task_manager, source, prepare_tasks, Subset)

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(_headline(summary), indent=2))
    print(f"wrote {out_dir / 'summary.json'}")
    return 0


def run_mmlu(args, lm, engines, task_manager, source, prepare_tasks, Subset) -> dict[str, Any]:
    if args.mmlu_limit:
        subset, limit = Subset(fraction=1.0, sample="first", limit=args.mmlu_limit), args.mmlu_limit
    else:
        fraction = args.mmlu_fraction or 0.1
        subset, limit = Subset(fraction=fraction, sample="first"), fraction
    (task,) = prepare_tasks(["mmlu"], source, subset, {"num_fewshot": args.num_fewshot})
    subjects = list(dict.fromkeys(i.group for i in task.items))
    if args.mmlu_subjects:
        wanted = set(args.mmlu_subjects.split(","))
        subjects = [s for s in subjects if s in wanted]
    print(f"MMLU: {sum(i.group in subjects for i in task.items)} questions, {len(subjects)} subjects, "
          f"{args.num_fewshot}-shot", flush=True)
    clocks = {"lm_eval": Clock(), **{d: Clock() for d in engines}}
    reference: dict[str, Any] = {}
    ours: dict[str, dict[str, Any]] = {d: {} for d in engines}
    for start in range(0, len(subjects), args.chunk_subjects):
        chunk = subjects[start:start + args.chunk_subjects]
        items = [i for i in task.items if i.group in chunk]
        label = f"{chunk[0]}..{chunk[-1]} ({len(items)} q)"
        with clocks["lm_eval"].measure(f"lm-eval  {label}"):
            samples = run_lm_eval(lm, task_manager, [f"prunelab_mmlu_{s}" for s in chunk], limit, args.num_fewshot)
        reference.update(lm_mmlu_records(samples))
        for dtype, engine in engines.items():
            with clocks[dtype].measure(f"prunelab {dtype} {label}"):
                ours[dtype].update(prunelab_records(engine, task, items))
    _dump(args.out_dir / "raw_mmlu.json", {"lm_eval": reference, "prunelab": ours})
    items = [i for i in task.items if i.group in subjects]
    if sorted(reference) != sorted(i.id for i in items):
        raise SystemExit("compare_lm_eval: lm-eval and prunelab evaluated different MMLU items")
    prompts = {i.id: (prunelab_prompt("mmlu", i, args.num_fewshot), reference[i.id]["prompt"]) for i in items}
    result = {
        "n": len(items), "limit": limit,
        "inputs": compare_inputs(lm, engines["float32"], prompts, [" " + x for x in LETTERS]),
        "lm_eval_acc": sum(reference[i.id]["prediction"] == LETTERS[i.data["answer"]] for i in items) / len(items),
        "float32": compare_mmlu(reference, ours["float32"], "prunelab"),
        "speed_float32": speed(clocks["lm_eval"], clocks["float32"], len(items)),
        "chunks": {k: c.chunks for k, c in clocks.items()},
    }
    if "bfloat16" in engines:
        result["bfloat16_vs_lm_eval"] = compare_mmlu(reference, ours["bfloat16"], "prunelab_bf16")
        result["bfloat16_vs_float32"] = compare_mmlu(ours["float32"], ours["bfloat16"], "prunelab_bf16")
        result["speed_bfloat16"] = speed(clocks["lm_eval"], clocks["bfloat16"], len(items))
    return result


def run_gsm8k(args, lm, engines, task_manager, source, prepare_tasks, Subset) -> dict[str, Any]:
    subset = Subset(fraction=1.0, sample="first", limit=args.gsm8k_limit)
    (task,) = prepare_tasks(["gsm8k"], source, subset, {"num_fewshot": args.num_fewshot})
    print(f"GSM8K: {len(task.items)} problems, {args.num_fewshot}-shot, 256 new tokens", flush=True)
    clocks = {"lm_eval": Clock(), **{d: Clock() for d in engines}}
    with clocks["lm_eval"].measure(f"lm-eval  gsm8k ({len(task.items)})"):
        samples = run_lm_eval(lm, task_manager, ["prunelab_gsm8k"], args.gsm8k_limit, args.num_fewshot)
    reference = lm_gsm8k_records(samples["prunelab_gsm8k"])
    ours = {}
    for dtype, engine in engines.items():
        with clocks[dtype].measure(f"prunelab {dtype} gsm8k ({len(task.items)})"):
            ours[dtype] = prunelab_records(engine, task, task.items)
    _dump(args.out_dir / "raw_gsm8k.json", {"lm_eval": reference, "prunelab": ours})
    if sorted(reference) != sorted(ours["float32"]):
        raise SystemExit("compare_lm_eval: lm-eval and prunelab evaluated different GSM8K items")
    prompts = {i.id: (prunelab_prompt("gsm8k", i, args.num_fewshot), reference[i.id]["prompt"]) for i in task.items}
    result = {
        "n": len(task.items),
        "inputs": compare_inputs(lm, engines["float32"], prompts, []),
        "float32": compare_gsm8k(reference, ours["float32"]),
        "speed_float32": speed(clocks["lm_eval"], clocks["float32"], len(task.items)),
        "exact_match": {
            "lm_eval": {k: _mean(r[f"correct_{k}"] for r in reference.values()) for k in ("strict", "flexible")},
            **{f"prunelab_{d}": {k: _mean(r[f"correct_{k}"] for r in o.values()) for k in ("strict", "flexible")}
               for d, o in ours.items()},
        },
    }
    if "bfloat16" in engines:
        result["bfloat16_vs_lm_eval"] = compare_gsm8k(reference, ours["bfloat16"])
        result["speed_bfloat16"] = speed(clocks["lm_eval"], clocks["bfloat16"], len(task.items))
    return result


def _headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers BENCHMARKS.md quotes, without the per-item details."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in {"disagreements", "chunks"}}
        return value

    head = {k: strip(summary[k]) for k in ("mmlu", "gsm8k") if k in summary}
    for task in head.values():
        task["inputs"] = {k: (v if isinstance(v, int) else len(v)) for k, v in task["inputs"].items()}
    return head


def _dump(path: Path, raw: dict[str, Any]) -> None:
    """Per-item outputs of every tool, saved before comparing (hours of work must not be lost)."""
    path.write_text(json.dumps(raw, default=str) + "\n")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("prunelab", "lm_eval", "torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


if __name__ == "__main__":
    sys.exit(main())
