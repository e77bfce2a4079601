"""Width vs depth at equal size (issue 23): parameters, file size, speed and quality of each.

Variants of one model, all built in memory from the same dense copy:

* ``dense``;
* ``width`` along one axis (``mlp``, ``heads``, ``hidden``) and ``combined`` (the same fraction of
  MLP and hidden channels, and of heads where that fraction is a whole step of the GQA layout), each
  with the option values whose result has the parameter count closest to 10 / 25 / 40 % fewer
  parameters than dense (``--levels``); a level the axis cannot reach (heads: attention is a small
  share of these models) is skipped and said so;
* ``drop-block k=K`` (depth) with the K whose parameter count is nearest each width variant's.

Width importance is prunelab's default (``activation``, Minitron's) on ``--calibration-samples`` x
256 tokens of WikiText-2 *validation*; drop-block chooses its block on the same text.

Speed is measured with the timing helpers of ``prunelab.model.bench`` (``prunelab bench-model``) in
``bench_layer_removal``'s rotating rounds: one warm-up round, then ``--repeats`` rounds in which every
variant runs every configuration once, the order rotating between rounds; the speedup is the median
over rounds of dense seconds / variant seconds from the same round. Configurations: prefill of one
prompt of each ``--prompt-lengths`` (to the first next-token logits: the head runs on the last
position only) and ``--new-tokens`` greedy decode steps at batch 1 after a prompt of the shortest
length.

Predicted speedup: the ratio of matmul FLOPs, dense / variant, for the same configuration: every
decoder Linear (2 x weights per token), the attention products QK^T and AV (2 x 2 x heads x head_dim
per attended position, causal), and the output head where the configuration runs it (prefill: the
last position; decode: every step). Norms, activations, RoPE and the embedding lookup are not
counted.

Quality: WikiText-2 *test* perplexity and KL(dense || variant) on the first ``--windows`` windows of
``--seqlen`` tokens, cut as ``prunelab eval --tasks wikitext`` cuts them (same joining, same BOS).
Dense runs ``Engine.window_scores(keep_hidden=True)``; a variant whose output head is the dense one
runs ``Engine.window_scores(reference=DenseReference(...))``, the code ``prunelab eval`` uses for KL to
dense. A ``hidden``-pruned variant has a narrower head, so the dense distribution cannot come from
its head: its NLL comes from ``window_token_scores`` and its KL from the dense model's own head on
the stored dense hidden states (``kl_from_logits``, the same formula).

Usage (the BENCHMARKS.md runs):
    python benchmarks/bench_width.py --model ~/.cache/prunelab-test-models/smollm2/*.gguf \\
        --windows 8 --repeats 2 --threads 1 --save /tmp/width-smollm2 --json benchmarks/results/width_smollm2.json
    python benchmarks/bench_width.py --model ~/.cache/prunelab-test-models/qwen2.5/*.gguf \\
        --levels 25 --axes mlp,hidden,combined --windows 2 --repeats 2 --threads 1 \\
        --json benchmarks/results/width_qwen2.5.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layer_removal import CALIBRATION, SHARED, file_bytes, measure_rounds  # noqa: E402

TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
AXES = ("mlp", "heads", "hidden", "combined")
# How far (in percentage points of parameters) a variant may land from its level and still count for it.
LEVEL_TOLERANCE = 4.0


# ---------------------------------------------------------------------------- parameter counts
def width_parameters(adapter, targets) -> int:
    """Hand count of the parameters a width variant with these targets has (Llama/Qwen2 layout).

    Checked against the real count after pruning, so the level a variant is filed under is what was built.
    """
    from prunelab.model import layer_parts, stream_norms

    s, h = targets.sizes, targets.hidden
    q_out, kv_out = targets.heads * s.head_dim, targets.kv_heads * s.head_dim
    part = layer_parts(adapter, 0)
    layer = h * q_out + 2 * h * kv_out + q_out * h + 3 * h * targets.mlp + len(part.norms) * h
    layer += sum(out for lin, out in ((part.q, q_out), (part.k, kv_out), (part.v, kv_out), (part.o, h)) if lin.bias is not None)
    layer += sum(out for lin, out in ((part.gate, targets.mlp), (part.up, targets.mlp), (part.down, h)) if lin.bias is not None)
    vocab = adapter.embedding.weight.shape[0]
    outer = vocab * h * (1 if adapter.tied else 2) + len(stream_norms(adapter, s.hidden)) * h
    return s.layers * layer + outer


def head_steps(sizes, mode: str = "query") -> list[float]:
    """Every head fraction the GQA layout allows in ``query`` mode: multiples of kv_heads / heads."""
    step = sizes.kv_heads if mode == "query" else sizes.group
    return [n / sizes.heads for n in range(step, sizes.heads, step)]


def candidates(adapter, axis: str, round_to: int = 1) -> list[dict[str, float]]:
    """The option sets an axis can take (fractions to remove), finely enough to hit any level; with
    ``round_to`` > 1 each set carries it (the width strategy rounds the kept MLP / hidden counts)."""
    from prunelab.model import width_sizes

    sizes = width_sizes(adapter)
    if axis == "heads":
        return [{"heads": f} for f in head_steps(sizes)]  # heads are never rounded
    rounding = {"round_to": round_to} if round_to > 1 else {}
    if axis == "mlp":
        return [{"mlp": n / sizes.intermediate, **rounding} for n in range(1, sizes.intermediate)]
    steps = [n / sizes.hidden for n in range(1, sizes.hidden)]  # every hidden count (config classes may refuse some)
    if axis == "hidden":
        return [{"hidden": f, **rounding} for f in steps]
    heads = head_steps(sizes)
    rows = []
    for f in steps:
        near = min(heads, key=lambda h: abs(h - f))
        rows.append({"mlp": f, "hidden": f, **({"heads": near} if abs(near - f) <= heads[0] / 2 else {}), **rounding})
    return rows


def choose_options(adapter, axis: str, level: float, dense_params: int,
                   round_to: int = 1) -> tuple[dict[str, float], int] | None:
    """The option set whose variant has the parameter count nearest ``level`` % fewer than dense; None if unreachable."""
    from prunelab.model import width_targets

    best = None
    for options in candidates(adapter, axis, round_to):
        try:
            params = width_parameters(adapter, width_targets(adapter, **options))
        except Exception:  # noqa: BLE001 - a fraction this model refuses is simply not a candidate
            continue
        gap = abs(100 * (1 - params / dense_params) - level)
        if best is None or gap < best[0]:
            best = (gap, options, params)
    if best is None or best[0] > LEVEL_TOLERANCE:
        return None
    return best[1], best[2]


def depth_parameters(adapter, k: int) -> int:
    per_layer = sum(p.numel() for p in adapter.layers[0].parameters())
    return sum(p.numel() for p in adapter.model.parameters()) - k * per_layer


# ---------------------------------------------------------------------------- FLOPs
@dataclasses.dataclass(frozen=True)
class MatmulShape:
    """What the matmul FLOP count of a model needs: decoder Linear weights, attention width, head."""

    decoder_weights: int  # every decoder Linear's weight entries, all layers
    attention_width: int  # layers x heads x head_dim (the QK^T and AV contraction, summed over layers)
    head_weights: int

    @classmethod
    def of(cls, adapter) -> MatmulShape:
        from prunelab.model import layer_parts

        weights = sum(m.weight.numel() for i in range(adapter.num_layers) for m in adapter.linear_modules(i).values())
        width = sum(layer_parts(adapter, i).q.weight.shape[0] for i in range(adapter.num_layers))
        return cls(weights, width, adapter.head.weight.numel())

    def prefill(self, length: int) -> float:
        pairs = length * (length + 1) / 2  # causal: position t attends to t positions
        return 2 * length * self.decoder_weights + 4 * pairs * self.attention_width + 2 * self.head_weights

    def decode(self, context: int, steps: int) -> float:
        attended = sum(context + 1 + t for t in range(steps))
        return steps * (2 * self.decoder_weights + 2 * self.head_weights) + 4 * attended * self.attention_width


# ---------------------------------------------------------------------------- building the variants
def build(dense, args) -> dict[str, dict[str, Any]]:
    """name -> {"loaded", "strategy", "options", "report", "level"}; checks every count it files."""
    from prunelab.model.adapter import adapt
    from prunelab.model.bench import parameter_count
    from prunelab.prune.api import prune

    calibration = {"source": args.calibration, "samples": args.calibration_samples, "seqlen": 256}

    def copy_of():
        model = copy.deepcopy(dense.model)
        return dataclasses.replace(dense, model=model, adapter=adapt(model))

    dense_params = parameter_count(dense.model)
    variants: dict[str, dict[str, Any]] = {"dense": {"loaded": copy_of(), "strategy": "dense", "options": {},
                                                     "report": {}, "level": 0.0}}
    skipped = []
    for round_to, axis, level in ((r, a, lv) for r in args.round_to for a in args.axes for lv in args.levels):
        if round_to > 1 and axis == "heads":
            continue
        chosen = choose_options(dense.adapter, axis, level, dense_params, round_to)
        suffix = f" r{round_to}" if round_to > 1 else ""
        if chosen is None:
            skipped.append(f"{axis}{suffix} {level:g} %: no option value lands within {LEVEL_TOLERANCE:g} points")
            continue
        options, expected = chosen
        name = f"width {axis} -{level:g}%{suffix}"
        if any(v["options"] == options for v in variants.values()):
            continue
        loaded = copy_of()
        report = dict(prune(loaded, "width", calibration=calibration, **options))
        actual = parameter_count(loaded.model)
        if actual != expected:
            raise SystemExit(f"{name}: {actual} parameters, hand count {expected}")
        variants[name] = {"loaded": loaded, "strategy": "width", "options": options, "report": report, "level": level}
        print(f"built {name} {options}: {actual / 1e6:.2f} M", flush=True)
    for v in variants.values():
        if v["strategy"] == "width":
            params = parameter_count(v["loaded"].model)
            v["depth_match"] = min(range(1, dense.adapter.num_layers),
                                   key=lambda k, p=params: abs(depth_parameters(dense.adapter, k) - p))
    for k in sorted({v["depth_match"] for v in variants.values() if "depth_match" in v}):
        loaded = copy_of()
        report = dict(prune(loaded, "drop-block", k=k, calibration=calibration))
        variants[f"depth drop-block k={k}"] = {"loaded": loaded, "strategy": "drop-block", "options": {"k": k},
                                               "report": report, "level": None}
        print(f"built drop-block k={k}: {parameter_count(loaded.model) / 1e6:.2f} M", flush=True)
    for line in skipped:
        print("skipped:", line, flush=True)
    variants["dense"]["skipped"] = skipped
    return variants


# ---------------------------------------------------------------------------- quality
def test_windows(dense, count: int, seqlen: int) -> torch.Tensor:
    """The first ``count`` windows of WikiText-2 test, cut exactly as the ``wikitext`` task cuts them."""
    from prunelab.model import consecutive_windows, window_bos
    from prunelab_plugins.wikitext import lines_from_raw, tokenized

    text = "\n\n".join(lines_from_raw(TEST.read_text(encoding="utf-8")))
    ids = tokenized(dense.tokenizer, text)
    return consecutive_windows(ids, range(count), seqlen, window_bos(dense.tokenizer, dense.adapter))


def quality(variants, dense, windows: torch.Tensor) -> dict[str, dict[str, float]]:
    """Perplexity, KL to dense and top-1 agreement of every variant; hidden-width variants, whose head
    differs, are compared through the dense head (``DenseHead``), as in a study."""
    from prunelab.evaluate.engine import DenseHead, DenseReference, Engine, head_fingerprint

    def engine(loaded):
        return Engine(loaded.model, loaded.tokenizer, loaded.adapter)

    base = variants["dense"]["loaded"]
    scores = engine(base).window_scores(windows, keep_hidden=True)
    reference = DenseReference(torch.stack(scores.hidden), windows, head_fingerprint(base.adapter),
                               DenseHead.of(base.adapter))
    results = {"dense": {"perplexity": math.exp(sum(scores.nll_sums) / sum(scores.counts)), "kl_to_dense": 0.0,
                         "tokens": sum(scores.counts)}}
    for name, variant in variants.items():
        if name == "dense":
            continue
        s = engine(variant["loaded"]).window_scores(windows, reference=reference)
        results[name] = {"perplexity": math.exp(sum(s.nll_sums) / sum(s.counts)),
                         "kl_to_dense": float(torch.cat(s.kl).mean()), "tokens": sum(s.counts),
                         "top1_agreement": float(torch.cat(s.agree).float().mean())}
        print(f"quality {name}: ppl {results[name]['perplexity']:.2f} KL {results[name]['kl_to_dense']:.3f}", flush=True)
    return results


# ---------------------------------------------------------------------------- the run
def speed_rows(variants, seconds, lengths: list[int], new_tokens: int) -> dict[str, list[dict[str, Any]]]:
    """Per variant and configuration: tokens/s, paired speedups against dense, and the FLOP prediction."""
    shapes = {name: MatmulShape.of(v["loaded"].adapter) for name, v in variants.items()}
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in variants:
        rows[name] = []
        for (kind, length, batch), runs in seconds[name].items():
            dense_runs = seconds["dense"][(kind, length, batch)]
            paired = [d / v for d, v in zip(dense_runs, runs, strict=True)]

            def flops(shape, kind=kind, length=length):
                return shape.prefill(length) if kind == "prefill" else shape.decode(min(lengths), new_tokens)

            tokens = length * batch if kind == "prefill" else batch * new_tokens
            rows[name].append({"kind": kind, "prompt_length": length, "batch": batch, "runs": runs,
                               "tokens_per_s": tokens / statistics.median(runs), "paired_speedups": paired,
                               "speedup": statistics.median(paired),
                               "flop_speedup": flops(shapes["dense"]) / flops(shapes[name])})
    return rows


def save_folders(variants, out: Path, levels: list[float]) -> dict[str, str]:
    """Dense, the width variants of ``levels`` and their depth twins as normal checkpoint folders
    (``save_pruned``), for llama.cpp's converter."""
    from prunelab.model.export import save_pruned

    width = [v for v in variants.values() if v["strategy"] == "width" and v["level"] in levels]
    depth = {f"depth drop-block k={v['depth_match']}" for v in width}
    saved = {}
    for name, variant in variants.items():
        if not (name == "dense" or any(variant is w for w in width) or name in depth):
            continue
        folder = out / name.replace(" ", "_").replace("%", "pct").replace("=", "")
        save_pruned(variant["loaded"], folder, variant["report"], overwrite=True)
        saved[name] = str(folder)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GGUF file, model folder or Hub id")
    parser.add_argument("--levels", default="10,25,40", help="percent fewer parameters to aim at")
    parser.add_argument("--axes", default=",".join(AXES), help=f"width axes among {', '.join(AXES)}")
    parser.add_argument("--round-to", default="1", help="width round_to values to build each axis with (e.g. 1,32)")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows for perplexity and KL")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration", default=str(CALIBRATION))
    parser.add_argument("--calibration-samples", type=int, default=4, help="x 256 tokens, for width and drop-block")
    parser.add_argument("--save", default=None, help="also save every variant as a folder under this directory")
    parser.add_argument("--save-levels", default="25", help="levels whose width variants (and depth twins) --save writes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from prunelab.model.bench import parameter_count, parse_int_list
    from prunelab.model.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    args.levels = [float(x) for x in args.levels.split(",")]
    args.axes = [a.strip() for a in args.axes.split(",")]
    args.round_to = [int(x) for x in args.round_to.split(",")]
    if unknown := set(args.axes) - set(AXES):
        raise SystemExit(f"--axes: unknown {sorted(unknown)}; choose among {', '.join(AXES)}")
    lengths = parse_int_list(args.prompt_lengths, "--prompt-lengths")
    dense = load_model(args.model, device="cpu", dtype="float32")
    variants = build(dense, args)
    windows = test_windows(dense, args.windows, args.seqlen)
    seconds = measure_rounds({n: (v["loaded"], {}) for n, v in variants.items()}, lengths, [1], args.new_tokens, args.repeats)
    speeds = speed_rows(variants, seconds, lengths, args.new_tokens)
    scores = quality(variants, dense, windows)
    saved = save_folders(variants, Path(args.save), [float(x) for x in args.save_levels.split(",")]) if args.save else {}
    dense_params = parameter_count(variants["dense"]["loaded"].model)
    rows = []
    for name, v in variants.items():
        loaded = v["loaded"]
        params = parameter_count(loaded.model)
        config = loaded.model.config
        rows.append({"variant": name, "strategy": v["strategy"], "options": v["options"], "level": v["level"],
                     "parameters": params, "removed_pct": 100 * (1 - params / dense_params),
                     "file_bytes": file_bytes(loaded), "layers": loaded.adapter.num_layers,
                     "config": {k: getattr(config, k, None) for k in ("hidden_size", "intermediate_size",
                                                                      "num_attention_heads", "num_key_value_heads", "head_dim")},
                     "dropped_layers": v["report"].get("dropped_layers"),
                     "depth_match": f"depth drop-block k={v['depth_match']}" if "depth_match" in v else None, "speed": speeds[name], **scores[name],
                     "folder": saved.get(name)})
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average_end": os.getloadavg()}
    print_markdown(rows, machine)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "machine": machine, "args": vars(args),
                                               "windows": list(windows.shape), "skipped": variants["dense"]["skipped"],
                                               "variants": rows}, indent=2, default=str) + "\n")
    del variants
    gc.collect()


def print_markdown(rows, machine) -> None:
    configs = rows[0]["speed"]
    header = ["variant", "config (hidden/inter/heads/kv, layers)", "params (M)", "-%", "file (MB)"]
    header += [f"{c['kind']} {c['prompt_length'] if c['kind'] == 'prefill' else 'b1'}: tok/s, x [range], FLOP x" for c in configs]
    header += ["ppl", "KL"]
    print(f"\nthreads {machine['torch_threads']}, load average at the end {machine['load_average_end']}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        c = r["config"]
        cells = [r["variant"], f"{c['hidden_size']}/{c['intermediate_size']}/{c['num_attention_heads']}/"
                 f"{c['num_key_value_heads']}, {r['layers']}", f"{r['parameters'] / 1e6:.1f}", f"{r['removed_pct']:.1f}",
                 f"{r['file_bytes'] / 1e6:.0f}"]
        cells += [f"{s['tokens_per_s']:.1f}, {s['speedup']:.2f} [{min(s['paired_speedups']):.2f}-"
                  f"{max(s['paired_speedups']):.2f}], {s['flop_speedup']:.2f}" for s in r["speed"]]
        cells += [f"{r['perplexity']:.2f}", f"{r['kl_to_dense']:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
