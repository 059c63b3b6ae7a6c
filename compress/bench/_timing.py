"""Timing for the benchmarks: medians of interleaved runs, and the memory-copy floor measured beside them.

The machine these run on is shared, so every figure is the median of several runs,
and the functions compared are run in turn (a, b, floor, a, b, floor, ...) so that a
burst of load from elsewhere falls on all of them alike. Threads are pinned to one
(``one_thread``): the codec is single-threaded, and the floor must be too.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Pin torch to one thread while timing (numpy's element-wise work is single-threaded anyway)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[tuple[float, float]]]:
    """``(wall-clock, CPU)`` seconds of each function over ``repeat`` rounds, the functions taking turns.

    CPU time (this process's) is the steadier figure on a loaded machine: a long run is more
    often preempted than a short one, which inflates its wall-clock time more.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def summary(times: list[tuple[float, float]]) -> dict[str, float]:
    """``{"median_s", "min_s", "cpu_median_s", "runs"}`` of ``interleaved``'s timings."""
    wall = [w for w, _ in times]
    return {"median_s": statistics.median(wall), "min_s": min(wall),
            "cpu_median_s": statistics.median(c for _, c in times), "runs": len(times)}


def memory_copy(nbytes: int, fresh: bool = True) -> Callable[[], Any]:
    """One plain copy of ``nbytes``: the floor of any decoder that has to write that many bytes.

    Args:
        fresh: copy into a new buffer (``src.copy()``: allocation and first-touch page faults
            included, as a decoder's output pays them); else into a buffer already in memory
            (``np.copyto``: the bare bandwidth, a stricter floor).
    """
    src = np.ones(max(1, nbytes // 4), dtype=np.float32)
    if fresh:
        return src.copy
    dst = np.zeros_like(src)  # touched now, so the copy pays no page faults
    return lambda: np.copyto(dst, src)
