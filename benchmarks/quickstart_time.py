"""Wall time of the quick-start from a clean run folder (pretraining included), median of N runs.

    python benchmarks/quickstart_time.py [--runs 3] [--threads 2]

Each run is a fresh ``python -m compress.run`` process, interpreter start-up and imports included:
what a new user waits for.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    times = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "compress.run", "--out", f"{tmp}/q", "--set",
                            f"run.threads={args.threads}"], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
    print(f"quick-start wall time, {args.runs} runs, {args.threads} threads: median {statistics.median(times):.1f} s "
          f"(min {min(times):.1f}, max {max(times):.1f})")


if __name__ == "__main__":
    main()
