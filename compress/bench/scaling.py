"""Benchmark ``scaling``: how encode, decode and k-means time grow with a tensor's size (issue 5, section 4).

    python -m compress.bench scaling [--size tiny|full]

One synthetic weight tensor per size (``_synthetic.tensor``: trained-like Laplace values,
90 % pruned by magnitude, 5-bit k-means sharing, seed 0), from 10^5 to 10^7 weights
(tiny: 10^4 to 10^5). Timed per size, interleaved with a plain memory copy of the
tensor's dense float32 bytes (the floor): writing its ``.dcz`` file, decoding the file to
a dense float32 array, and Lloyd's k-means (k = 32, linear init) on its kept weights.
The figures go into ``scaling.png`` (log-log) with the fitted slope of each curve
(time ~ n^slope: 1 is linear).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from compress import bench
from compress.bench import _synthetic, _timing
from compress.codec import container, huffman
from compress.kmeans1d import Init, kmeans_1d

SIZES = {bench.Size.TINY: (10 ** 4, 3 * 10 ** 4, 10 ** 5),
         bench.Size.FULL: (10 ** 5, 3 * 10 ** 5, 10 ** 6, 3 * 10 ** 6, 10 ** 7)}
REPEAT = {bench.Size.TINY: 3, bench.Size.FULL: 5}
CURVES = ("encode", "decode", "kmeans", "memory_copy")


def measure(numel: int, repeat: int, folder: Path) -> dict:
    """Median times (and the file's size) for one tensor of ``numel`` weights."""
    weights, record = _synthetic.tensor(numel)
    kept = weights[record.positions]
    path = folder / f"w{numel}.dcz"
    container.write(path, {"w": record})
    if not np.array_equal(container.read(path)["w"].view(np.uint32), record.to_dense().view(np.uint32)):
        raise RuntimeError(f"the file of {numel} weights does not decode to its record")  # time only what is right
    with _timing.one_thread():
        times = _timing.interleaved({
            "encode": lambda: container.write(path, {"w": record}),
            "decode": lambda: container.read(path),
            "kmeans": lambda: kmeans_1d(kept, 32, Init.LINEAR),
            "memory_copy": _timing.memory_copy(4 * numel),
        }, repeat)
    info = container.Reader(path).info("w")
    symbols = info.n_kept + info.n_gap_symbols
    return {"weights": numel, "kept": info.n_kept, "file_bytes": path.stat().st_size, "huffman_symbols": symbols,
            "decoder": "lanes" if symbols >= huffman.LANE_MIN_TOTAL else "sequential",
            **{name: _timing.summary(t) for name, t in times.items()}}


def slope(rows: list[dict], curve: str) -> float:
    """The exponent of a least-squares fit ``time ~ weights ** slope`` on log-log axes."""
    n = np.log10([r["weights"] for r in rows])
    t = np.log10([r[curve]["median_s"] for r in rows])
    return float(np.polyfit(n, t, 1)[0])


def plot(rows: list[dict], slopes: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    n = [r["weights"] for r in rows]
    for curve, style in zip(CURVES, ("o-", "s-", "^-", "k--")):
        ax.loglog(n, [r[curve]["median_s"] for r in rows], style, label=f"{curve} (slope {slopes[curve]:.2f})")
    ax.set_xlabel("weights in the tensor (90 % pruned, 5-bit)")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Codec and k-means time against tensor size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@bench.register("scaling")
def scaling(size: bench.Size, out: Path) -> bench.Result:
    """Encode, decode and k-means time from 10^5 to 10^7 weights (log-log plot, fitted slopes)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, REPEAT[size], Path(tmp)) for n in SIZES[size]]
    slopes = {curve: slope(rows, curve) for curve in CURVES}
    plot(rows, slopes, out / "scaling.png")
    table_rows = [[f"{r['weights']:,}", f"{r['kept']:,}", f"{r['file_bytes']:,}",
                   *(f"{r[c]['median_s'] * 1e3:.2f}" for c in CURVES),
                   f"{r['decode']['median_s'] / r['memory_copy']['median_s']:.1f}×",
                   f"{r['decode']['cpu_median_s'] / max(r['memory_copy']['cpu_median_s'], 1e-9):.1f}×",
                   r["decoder"]] for r in rows]
    table_rows.append(["slope", "", "", *(f"{slopes[c]:.2f}" for c in CURVES), "", "", ""])
    return bench.Result(
        figures={"rows": rows, "slopes": slopes},
        tables=[("Time against tensor size (ms, medians)", bench.table(
            ["weights", "kept", "file B", "encode", "decode", "k-means (kept, k=32)", "memory copy",
             "decode ÷ copy", "decode ÷ copy (CPU)", "Huffman decoder"], table_rows))],
        notes=[f"Wall-clock medians of {REPEAT[size]} interleaved runs, one thread (and the CPU-time ratio of "
               "decode to copy, steadier on a loaded machine). Encode = `container.write` of the record (fsync "
               "included); decode = `container.read` (file to a dense float32 array, file read included); "
               "k-means = `kmeans_1d` on the kept weights (Lloyd, linear init, k = 32, to convergence); memory "
               "copy = `src.copy()` of the dense float32 bytes (a new buffer, as the decoder's output). Slope: "
               "least-squares fit of log time on log weights. Decoding switches from bitarray's sequential "
               f"decoder to the numpy lanes once a file holds {huffman.LANE_MIN_TOTAL:,} Huffman symbols or more "
               "(last column)."],
        files=["scaling.png"])
