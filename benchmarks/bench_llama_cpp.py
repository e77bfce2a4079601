"""llama.cpp as a real client of prunelab's folders: convert, quantize, ``llama-bench`` (issue 23).

1. llama.cpp itself: the sources vendored in the ``llama-cpp-python`` sdist from PyPI
   (``pip download --no-deps --no-binary=llama-cpp-python llama-cpp-python==VERSION``; not
   ``--no-binary :all:``, which would build cmake from source), extracted and built with cmake
   (targets ``llama-bench``, ``llama-perplexity``, ``llama-quantize``) under
   ``~/.cache/prunelab/llama.cpp/VERSION/``. ``--llama-cpp-dir`` (or ``LLAMA_CPP_DIR``) reuses a
   tree that is already there (its ``build-portable/`` (``--native``: ``build-native/``) folder is reused, only missing targets are built).
2. Every folder is converted with llama.cpp's own ``convert_hf_to_gguf.py`` to f16 and quantized
   with ``llama-quantize`` to q8_0 (both cached next to the folder as ``FOLDER.f16.gguf`` /
   ``FOLDER.q8_0.gguf``). A folder that does not convert or load is reported, not skipped silently.
3. Speed: ``llama-bench -p 128,512 -n 32 -t THREADS -r 1`` once per model per round (llama-bench runs
   its own warm-up first), ``--rounds`` rounds with the model order rotating, so load that comes and
   goes on a shared machine hits every model alike; speedup = median over rounds of the model's
   tokens/s / dense tokens/s of the same round and the same quantization.
4. A sanity check that the conversion kept the model: ``llama-perplexity`` on the first
   ``--ppl-chunks`` chunks of ``--ppl-ctx`` tokens of WikiText-2 test (llama.cpp scores the second
   half of each chunk, so the figure is not prunelab's windowed perplexity, but a broken conversion
   shows as a perplexity in the thousands).

The converter needs gguf (vendored), numpy, torch, transformers and, for a Llama tokenizer,
sentencepiece in the Python that runs it (``--python``).

Usage (the BENCHMARKS.md run; folders from ``bench_width.py --save``):
    LLAMA_CPP_DIR=/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp python benchmarks/bench_llama_cpp.py \\
        --dense /tmp/wb/smollm2/dense /tmp/wb/smollm2/width_* /tmp/wb/smollm2/depth_* \\
        --json benchmarks/results/llama_cpp_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNELAB_SHARED", ROOT.parent / "shared"))
TEST = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
DEFAULT_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-perplexity", "llama-quantize")
# A portable x86-64 build: AVX2/FMA/F16C kernels, no -march=native. The GGML_NATIVE build of session 8
# died with SIGILL (rc 132) on q8_0 models on this kind of VM, whose CPU flags do not match what the
# guest may execute; ``--native`` builds for the host CPU instead (in its own build folder).
PORTABLE_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON")
NATIVE_FLAGS = ("-DGGML_NATIVE=ON",)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in command), flush=True)
    return subprocess.run([str(c) for c in command], text=True, capture_output=True, **kwargs)


# ---------------------------------------------------------------------------- llama.cpp itself
def source_tree(version: str, cache: Path) -> Path:
    """The vendored llama.cpp of the llama-cpp-python sdist, downloaded and extracted once."""
    tree = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        done = run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=llama-cpp-python",
                    f"llama-cpp-python=={version}", "-d", cache])
        if done.returncode:
            raise SystemExit(f"pip download llama-cpp-python=={version} failed: {done.stderr.strip()[-500:]}")
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")  # data filter: no absolute paths, links out or devices
    return tree


def cmake() -> str:
    """cmake on PATH, else the one pip installs into this Python."""
    from shutil import which

    found = which("cmake")
    if found:
        return found
    done = run([sys.executable, "-m", "pip", "install", "-q", "cmake"])
    if done.returncode:
        raise SystemExit(f"no cmake on PATH and pip install cmake failed: {done.stderr.strip()[-300:]}")
    return str(Path(sys.executable).parent / "cmake")


def build(tree: Path, jobs: int, native: bool = False) -> Path:
    """Configure once (Release, CPU, no curl; portable or native) and build the missing targets; returns the bin folder."""
    build_dir = tree / ("build-native" if native else "build-portable")
    binaries = build_dir / "bin"
    missing = [t for t in TARGETS if not (binaries / t).is_file()]
    if not missing:
        return binaries
    tool = cmake()
    if not (build_dir / "CMakeCache.txt").is_file():
        done = run([tool, "-S", tree, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    *(NATIVE_FLAGS if native else PORTABLE_FLAGS)])
        if done.returncode:
            raise SystemExit(f"cmake configure failed: {done.stderr.strip()[-800:]}")
    done = run([tool, "--build", build_dir, "-j", str(jobs), "--target", *missing])
    if done.returncode:
        raise SystemExit(f"cmake build of {', '.join(missing)} failed: {(done.stdout + done.stderr).strip()[-800:]}")
    return binaries


# ---------------------------------------------------------------------------- the models
def convert(tree: Path, binaries: Path, python: str, folder: Path) -> dict[str, Any]:
    """FOLDER.f16.gguf by convert_hf_to_gguf.py and FOLDER.q8_0.gguf by llama-quantize (cached)."""
    f16, q8 = folder.with_name(folder.name + ".f16.gguf"), folder.with_name(folder.name + ".q8_0.gguf")
    weights = folder / "model.safetensors"
    result: dict[str, Any] = {"folder": str(folder)}
    if not f16.is_file() or f16.stat().st_mtime < weights.stat().st_mtime:
        done = run([python, tree / "convert_hf_to_gguf.py", folder, "--outtype", "f16", "--outfile", f16])
        if done.returncode:
            return {**result, "error": "convert_hf_to_gguf.py: " + done.stderr.strip().splitlines()[-1]}
    if not q8.is_file() or q8.stat().st_mtime < f16.stat().st_mtime:
        done = run([binaries / "llama-quantize", f16, q8, "q8_0"])
        if done.returncode:
            return {**result, "error": "llama-quantize: " + (done.stdout + done.stderr).strip().splitlines()[-1]}
    return {**result, "f16": str(f16), "q8_0": str(q8), "f16_bytes": f16.stat().st_size, "q8_0_bytes": q8.stat().st_size}


def bench_once(binaries: Path, model: str, threads: int, new_tokens: int) -> list[dict[str, Any]] | str:
    done = run([binaries / "llama-bench", "-m", model, "-t", threads, "-p", "128,512", "-n", new_tokens, "-r", 1, "-o", "json"])
    if done.returncode:
        return (done.stdout + done.stderr).strip().splitlines()[-1] if (done.stdout + done.stderr).strip() else "failed"
    return [{"test": f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}", "tokens_per_s": r["avg_ts"]}
            for r in json.loads(done.stdout)]


def perplexity(binaries: Path, model: str, threads: int, ctx: int, chunks: int) -> float | str:
    done = run([binaries / "llama-perplexity", "-m", model, "-f", TEST, "-c", ctx, "--chunks", chunks, "-t", threads])
    text = done.stdout + done.stderr
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    if done.returncode or not found:
        return text.strip().splitlines()[-1] if text.strip() else "failed"
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="saved model folders (bench_width.py --save)")
    parser.add_argument("--dense", required=True, help="the dense folder the ratios are against")
    parser.add_argument("--llama-cpp-dir", default=os.environ.get("LLAMA_CPP_DIR"),
                        help="an existing llama.cpp source tree (with or without its build folder); default: the sdist's")
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "prunelab" / "llama.cpp"))
    parser.add_argument("--python", default=sys.executable, help="the Python that runs convert_hf_to_gguf.py")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--native", action="store_true", help="build for this CPU (-march=native) instead of portable AVX2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-ctx", type=int, default=512)
    parser.add_argument("--ppl-chunks", type=int, default=4, help="0: no perplexity check")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tree = Path(args.llama_cpp_dir) if args.llama_cpp_dir else source_tree(args.version, Path(args.cache) / args.version)
    binaries = build(tree, args.jobs, args.native)
    folders = [Path(args.dense).resolve()] + [Path(f).resolve() for f in args.folders if Path(f).resolve() != Path(args.dense).resolve()]
    if not_folders := [str(f) for f in folders if not (f / "config.json").is_file()]:
        raise SystemExit(f"not a model folder (no config.json): {', '.join(not_folders)}")
    models = {f.name: convert(tree, binaries, args.python, f) for f in folders}
    dense = folders[0].name
    runnable = [(name, q) for name, m in models.items() if "error" not in m for q in ("f16", "q8_0")]
    for name, model in models.items():
        if "error" in model:
            print(f"{name}: {model['error']}", flush=True)
        model["rounds"] = {"f16": [], "q8_0": []}
    for round_index in range(args.rounds):
        shift = (round_index * 2) % max(len(runnable), 1)
        for name, quant in runnable[shift:] + runnable[:shift]:
            result = bench_once(binaries, models[name][quant], args.threads, args.new_tokens)
            models[name]["rounds"][quant].append(result)
            print(f"{name} {quant}: {result}", flush=True)  # kept in the log if a later step fails
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    if args.ppl_chunks:
        for name, quant in runnable:
            if quant == "f16":
                models[name]["perplexity_f16"] = perplexity(binaries, models[name]["f16"], args.threads, args.ppl_ctx, args.ppl_chunks)
    if args.json:
        machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"llama_cpp": str(tree), "args": vars(args), "machine": machine,
                                               "models": models}, indent=2) + "\n")
    summarize(models, dense)
    if args.json:
        Path(args.json).write_text(json.dumps({"llama_cpp": str(tree), "args": vars(args), "machine": machine,
                                               "models": models}, indent=2) + "\n")  # again, with the summary


def summarize(models: dict[str, dict[str, Any]], dense: str) -> None:
    """Per model and quantization: median tokens/s per test and the median paired ratio to dense."""
    for model in models.values():
        model["summary"] = {}
        for quant, rounds in model.get("rounds", {}).items():
            good = [r for r in rounds if isinstance(r, list)]
            base = [r for r in models[dense]["rounds"].get(quant, []) if isinstance(r, list)]
            tests = {row["test"] for r in good for row in r}
            rows = {}
            for test in sorted(tests):
                mine = [next(x["tokens_per_s"] for x in r if x["test"] == test) for r in good]
                theirs = [next(x["tokens_per_s"] for x in r if x["test"] == test) for r in base]
                paired = [a / b for a, b in zip(mine, theirs, strict=False)]
                rows[test] = {"tokens_per_s": statistics.median(mine), "speedup": statistics.median(paired) if paired else None,
                              "paired": paired}
            model["summary"][quant] = rows
    print("\n| model | quant | file (MB) | " + " | ".join(["pp128 tok/s (x)", "pp512 tok/s (x)", "tg tok/s (x)"]) + " | ppl (f16) |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models.items():
        if "error" in model:
            print(f"| {name} | — | — | {model['error']} | | | |")
            continue
        for quant, rows in model["summary"].items():
            cells = [f"{r['tokens_per_s']:.1f} ({r['speedup']:.2f})" if r["speedup"] is not None else f"{r['tokens_per_s']:.1f} (no dense)"
                     for t, r in sorted(rows.items(), key=lambda kv: (kv[0][:2] == "tg", kv[0]))]
            ppl = model.get("perplexity_f16", "") if quant == "f16" else ""
            ppl = f"{ppl:.2f}" if isinstance(ppl, float) else ppl
            print(f"| {name} | {quant} | {model[quant + '_bytes'] / 1e6:.0f} | " + " | ".join(cells) + f" | {ppl} |")


if __name__ == "__main__":
    main()
