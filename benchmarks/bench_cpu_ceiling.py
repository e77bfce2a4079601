"""How much faster two single-thread processes compute than one on this machine: the ceiling for
any 2-worker speed-up (BENCHMARKS.md, "Studies on Ray"). Two vCPUs that are hyperthreads of one core
would give ~1.2x; two real cores ~2x.

    python benchmarks/bench_cpu_ceiling.py [--seconds 12] [--model PATH]

Without ``--model``: 512x512 matmuls, which stay in each core's cache (pure compute). With
``--model`` (any model prunelab loads, e.g. the smoke study's SmolLM2 GGUF): the same model's work
as a study's chunks do it -- scoring 256-token windows and greedy decoding -- whose weights stream
from memory on every pass, so two processes also share the memory bandwidth. Each process loads
first and starts measuring at the same moment as the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def matmuls(seconds: float, start_at: float) -> dict[str, float]:
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return {"matmul": rate(lambda: a @ b, seconds, start_at)}


def model_passes(path: str, seconds: float, start_at: float) -> dict[str, float]:
    import torch

    from prunelab.model.loading import load_model

    model = load_model(path, device="cpu", dtype="float32").model.eval()
    window = torch.randint(100, 1000, (1, 256))
    prompt = torch.randint(100, 1000, (1, 64))

    def decode() -> None:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                       do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        scoring = rate(lambda: model(window), seconds / 2, start_at)
        decoding = rate(decode, seconds / 2, time.time())
    return {"score 256-token window": scoring, "decode 16 tokens": decoding}


def rate(step, seconds: float, start_at: float) -> float:
    """Steps per second over ``seconds``, beginning at wall-clock ``start_at`` (after a warm-up)."""
    for _ in range(3):
        step()
    time.sleep(max(0.0, start_at - time.time()))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - started)


def measure(args: argparse.Namespace, processes: int) -> dict[str, float]:
    """The summed rate of ``processes`` children that measure at the same time."""
    start_at = time.time() + (40 if args.model else 3)  # after every child has loaded
    command = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "--start-at", str(start_at),
               *(["--model", args.model] if args.model else [])]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    rates = [json.loads(child.communicate()[0].splitlines()[-1]) for child in children]
    return {kind: sum(r[kind] for r in rates) for kind in rates[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--model", help="measure this model's passes instead of matmuls")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        found = model_passes(args.model, args.seconds, args.start_at) if args.model else matmuls(args.seconds, args.start_at)
        print(json.dumps(found))
        return
    one, two = measure(args, 1), measure(args, 2)
    for kind in one:
        print(f"{kind}: one process {one[kind]:.2f}/s, two processes {two[kind]:.2f}/s together: "
              f"{two[kind] / one[kind]:.2f}x")


if __name__ == "__main__":
    main()
