"""Sparse positions <-> a stream of fixed-width gap symbols (Deep Compression's relative indexing).

With width ``w`` let ``M = 2**w - 1``. A cursor starts at position 0.

- A symbol ``g < M`` places the next kept weight at ``cursor + g``; the cursor
  moves just past it.
- The symbol ``M`` is the filler: the cursor advances by ``M`` and no weight is
  placed, so the run of zeros it stands for decodes to exactly zero.

The encoder ends with fillers until at most ``M`` positions remain, so a
reader can require ``numel <= (symbols + 1) * M`` and bound the dense tensor it
allocates by the size of the stream it has read.
"""
from __future__ import annotations

import numpy as np

from compress.codec import huffman
from compress.errors import FormatError


def to_gaps(positions: np.ndarray, numel: int, width: int) -> np.ndarray:
    """Gap symbols for strictly increasing flat ``positions`` in a tensor of ``numel`` elements."""
    m = (1 << width) - 1
    positions = np.asarray(positions, dtype=np.int64)
    starts = np.concatenate([[0], positions[:-1] + 1]) if positions.size else np.zeros(0, np.int64)
    gaps = positions - starts
    fillers = gaps // m
    cursor = int(positions[-1]) + 1 if positions.size else 0
    tail = max(0, (numel - cursor - 1) // m)
    out = np.full(int(fillers.sum()) + positions.size + tail, m, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps % m
    return out


def from_gaps(symbols: np.ndarray, width: int, numel: int, field: str) -> np.ndarray:
    """Positions from gap symbols; checks that they stay inside the tensor."""
    m = (1 << width) - 1
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size and (symbols.min() < 0 or symbols.max() > m):
        raise FormatError(field, None, f"gap symbol out of range for width {width}")
    ends = np.cumsum(np.where(symbols == m, m, symbols + 1))
    if ends.size and ends[-1] > numel:
        raise FormatError(field, None, f"gaps run past the end of the tensor ({int(ends[-1])} > {numel})")
    return ends[symbols != m] - 1


def stream_bits(positions: np.ndarray, numel: int, width: int) -> int:
    """Bits of the Huffman-coded gap stream plus its length table (one byte per symbol), without coding it."""
    m = (1 << width) - 1
    positions = np.asarray(positions, dtype=np.int64)
    starts = np.concatenate([[0], positions[:-1] + 1]) if positions.size else np.zeros(0, np.int64)
    gaps = positions - starts
    cursor = int(positions[-1]) + 1 if positions.size else 0
    counts = np.bincount(gaps % m, minlength=m + 1)
    counts[m] += int((gaps // m).sum()) + max(0, (numel - cursor - 1) // m)
    lengths = huffman.lengths_from_counts(counts)
    used = np.flatnonzero(lengths)
    table = 8 * (int(used[-1]) + 1) if used.size else 0
    return int(np.dot(counts, lengths.astype(np.int64))) + table


def best_width(positions: np.ndarray, numel: int, widths=range(1, 17)) -> int:
    """The gap width whose coded stream (with its table) is smallest; ties go to the narrower width."""
    return min(widths, key=lambda w: (stream_bits(positions, numel, w), w))
