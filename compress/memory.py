"""Peak memory of a stretch of work (a pipeline stage): resident set size, and CUDA allocations.

On Linux the kernel keeps the process's peak RSS (``VmHWM`` in ``/proc/self/status``);
writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS, so ``mark()``
then ``since(mark)`` gives the peak during that stretch alone. Where the reset is
refused, the peak is the process's since it started, and the figures say so.

A reset also wipes the process's own peak, which the kernel reports to the parent
(``wait4``'s ``ru_maxrss``) from that same counter; ``process_peak_bytes()`` keeps it
across resets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")

_highest_seen = 0  # the highest VmHWM read so far: a reset makes the kernel forget it


@dataclass(frozen=True)
class Mark:
    """Where a measured stretch began."""

    rss_bytes: int | None  # resident set size at the start
    scoped: bool  # the RSS peak was reset here: the peak read later is this stretch's own
    cuda: bool  # CUDA peak statistics were reset here


def mark() -> Mark:
    """Reset the peak counters and note the current RSS."""
    scoped = reset_rss_peak()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return Mark(status_bytes("VmRSS"), scoped, cuda)


def since(start: Mark) -> dict:
    """Memory figures since ``start``, for a stage's report entry.

    Returns:
        ``rss_start_bytes``, ``peak_rss_bytes`` (None where the system does not say),
        ``peak_rss_scope`` (``stage``, or ``process`` where the peak could not be reset),
        and ``peak_cuda_bytes`` (allocated by torch) when CUDA is in use.
    """
    out = {"rss_start_bytes": start.rss_bytes, "peak_rss_bytes": read_peak(),
           "peak_rss_scope": "stage" if start.scoped else "process"}
    if start.cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def process_peak_bytes() -> int | None:
    """This process's peak RSS since it started, resets included; None off Linux."""
    return None if read_peak() is None else _highest_seen  # the read folds the current peak in


def read_peak() -> int | None:
    """The kernel's peak RSS since the last reset (``VmHWM``), remembered for ``process_peak_bytes``."""
    global _highest_seen
    peak = status_bytes("VmHWM")
    _highest_seen = max(_highest_seen, peak or 0)
    return peak


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux 4.0+); False where that is not possible."""
    read_peak()
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
