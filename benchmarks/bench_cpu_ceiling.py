"""How much faster two single-thread processes compute than one on this machine: the ceiling for
any 2-worker speed-up (BENCHMARKS.md, "Studies on Ray"). Two vCPUs that are hyperthreads of one core
would give ~1.2x; two real cores ~2x.

    python benchmarks/bench_cpu_ceiling.py [--seconds 12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def matmuls_per_second(seconds: float) -> float:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(20):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(matmuls_per_second(args.seconds))
        return
    command = [sys.executable, __file__, "--child", "--seconds", str(args.seconds)]
    one = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    pair = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    two = sum(float(p.communicate()[0]) for p in pair)
    print(f"one process {one:.1f}/s, two processes {two:.1f}/s together: {two / one:.2f}x")


if __name__ == "__main__":
    main()
