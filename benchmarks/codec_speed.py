"""Encode and decode time of one large sparse tensor, against a plain memory copy of its dense bytes.

    python benchmarks/codec_speed.py [--numel 10000000] [--density 0.1] [--bits 5] [--repeat 5]

Synthetic, deterministic: positions uniform at the given density, codes from a Laplace-like
distribution over 2**bits clusters (trained weights shared by k-means look like this).
Prints medians of ``--repeat`` runs. Tip: the file is written to a temporary folder.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from compress.codec import Reader, Writer
from compress.record import Codebook, TensorRecord


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--numel", type=int, default=10_000_000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--bits", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    positions = np.flatnonzero(rng.random(args.numel) < args.density)
    k = 2 ** args.bits
    weights = np.exp(-np.abs(np.arange(k) - k / 2) / (k / 8))
    codes = rng.choice(k, size=positions.size, p=weights / weights.sum())
    record = TensorRecord((args.numel,), positions, codes, Codebook(np.linspace(-1, 1, k)))
    dense = record.to_dense()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.dcz"
        for coder in ("huffman", "none"):
            def encode():
                with Writer(path) as w:
                    w.add("w", record, coder=coder)

            enc = median_time(encode, args.repeat)
            dec = median_time(lambda: Reader(path).array("w"), args.repeat)
            copy = median_time(lambda: dense.copy(), args.repeat)
            size = path.stat().st_size
            print(f"{coder:8s} numel {args.numel:,} kept {positions.size:,}: file {size:,} B "
                  f"({dense.nbytes / size:.1f}x), encode {enc:.3f} s, decode {dec:.3f} s "
                  f"= {dec / copy:.1f}x a {dense.nbytes / 1e6:.0f} MB memory copy ({copy * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
