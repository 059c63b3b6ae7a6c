"""Sparse positions <-> a stream of fixed-width gap symbols (Deep Compression's relative indexing).

With gap width ``w`` (1..16 bits) let ``M = 2**w - 1``. A cursor starts at flat
position 0 and the symbols are read in order:

- a symbol ``g < M`` says "the next kept weight is ``g`` positions after the
  cursor": it sits at ``cursor + g``, and the cursor moves to just past it;
- the symbol ``M`` is the ESCAPE (the paper's filler zero): the cursor advances
  by ``M`` positions and no weight is placed, so the skipped run decodes to 0.

A gap of ``g`` positions is written as ``g // M`` escapes followed by ``g % M``.
After the last kept weight the encoder appends escapes while more than ``M``
positions remain (``numel - cursor > M``). The reader therefore requires
``numel - M <= cursor_end <= numel``, and before decoding anything it can require
``numel <= (n_symbols + 1) * M``: every symbol advances the cursor by at most
``M``, so the size of the dense tensor is bounded by the length of the stream.

Everything is vectorised with numpy (cumsum, bincount); nothing loops per weight.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from compress.codec import huffman
from compress.errors import FormatError

WIDTHS = range(1, 17)
BINCOUNT_LIMIT = 1 << 22  # largest gap histogrammed with bincount; beyond it np.unique keeps memory small


def escape(width: int) -> int:
    """The escape symbol ``M = 2**width - 1`` (also the longest step one symbol can take)."""
    return (1 << width) - 1


def raw_gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros skipped before each kept weight: ``positions[i] - positions[i-1] - 1`` (``positions[0]`` first)."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    gaps = np.diff(positions, prepend=np.int64(-1)) - 1
    return gaps


def tail_escapes(positions: np.ndarray, numel: int, width: int) -> int:
    """Escapes after the last kept weight: as many as leave at most ``M`` positions uncovered."""
    cursor = int(positions[-1]) + 1 if len(positions) else 0
    return max(0, (int(numel) - cursor - 1) // escape(width))


def to_gaps(positions: np.ndarray, numel: int, width: int) -> np.ndarray:
    """Gap symbols for sparse positions.

    Args:
        positions: strictly increasing flat indices in ``[0, numel)``.
        numel: elements of the dense tensor.
        width: gap width in bits, 1..16.

    Returns:
        ``int64`` symbols in ``[0, M]``, escapes included.
    """
    m = escape(width)
    gaps = raw_gaps(positions)
    escapes = gaps // m
    n = int(escapes.sum()) + gaps.size + tail_escapes(positions, numel, width)
    out = np.full(n, m, dtype=np.int64)  # every slot not holding a weight's gap is an escape
    out[np.cumsum(escapes + 1) - 1] = gaps % m
    return out


def from_gaps(symbols: np.ndarray, width: int, numel: int, field: str = "gaps",
              offset: int | None = None) -> np.ndarray:
    """Positions from gap symbols, checked against the tensor's size.

    Args:
        symbols: gap symbols in ``[0, M]``.
        width: gap width in bits, 1..16.
        numel: elements of the dense tensor.
        field, offset: what to name in an error.

    Returns:
        ``int64`` strictly increasing flat positions in ``[0, numel)``.

    Raises:
        FormatError: a symbol is out of range, the gaps run past the end of the tensor,
            or more than ``M`` positions are left uncovered at the end.
    """
    m = escape(width)
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size and ((symbols.dtype.kind == "i" and symbols.min() < 0) or symbols.max() > m):
        raise FormatError(field, offset, f"gap symbol out of range for width {width}")
    # the cursor after each symbol, less one: a gap g moves it g + 1, an escape M
    ends = np.take(np.minimum(np.arange(1, m + 2), m), symbols)
    if ends.size:
        ends[0] -= 1
    np.cumsum(ends, out=ends)
    cursor = int(ends[-1]) + 1 if ends.size else 0
    if cursor > numel:
        raise FormatError(field, offset, f"gaps run past the end of the tensor ({cursor} > {numel})")
    if numel - cursor > m:
        raise FormatError(field, offset, f"gaps end at {cursor}, more than {m} short of {numel}")
    return np.compress(symbols != m, ends)


def symbol_counts(positions: np.ndarray, numel: int, width: int) -> np.ndarray:
    """How often each gap symbol ``0..M`` occurs, without building the stream."""
    return _counts(_histogram(raw_gaps(positions)), tail_escapes(positions, numel, width), width)


def coded_bytes(positions: np.ndarray, numel: int, width: int, coder: str = "huffman") -> int:
    """Exact bytes the gap stream takes in the file at this width, its Huffman length table included.

    Args:
        coder: ``huffman`` (stream bytes + one byte per stored code length) or ``none``
            (``width`` bits per symbol).
    """
    counts = symbol_counts(positions, numel, width)
    return _coded_bytes(counts, width, coder)


def best_width(positions: np.ndarray, numel: int, widths: Iterable[int] = WIDTHS, coder: str = "huffman") -> int:
    """The gap width whose stream (with its length table) is smallest; ties go to the narrower width.

    Exact sizes from symbol counts (``np.bincount``) and Huffman lengths from counts; no
    stream is built.

    Args:
        positions: strictly increasing flat indices in ``[0, numel)``.
        numel: elements of the dense tensor.
        widths: candidate widths, each in 1..16.
        coder: ``huffman`` or ``none`` (fixed width).

    Returns:
        The best width.
    """
    widths = list(widths)
    if not widths or any(w not in WIDTHS for w in widths):
        raise ValueError(f"gap widths must be in 1..16, got {widths}")
    hist = _histogram(raw_gaps(positions))  # once; each width only folds it
    cost = {w: _coded_bytes(_counts(hist, tail_escapes(positions, numel, w), w), w, coder) for w in widths}
    return min(widths, key=lambda w: (cost[w], w))


def _histogram(gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct gap values and their counts."""
    if gaps.size and gaps.max() < BINCOUNT_LIMIT:
        counts = np.bincount(gaps)
        values = np.flatnonzero(counts)
        return values, counts[values]
    return np.unique(gaps, return_counts=True)


def _counts(hist: tuple[np.ndarray, np.ndarray], tail: int, width: int) -> np.ndarray:
    values, counts = hist
    m = escape(width)
    out = np.bincount(values % m, weights=counts, minlength=m + 1).astype(np.int64)
    out[m] += int(np.dot(values // m, counts)) + tail
    return out


def _coded_bytes(counts: np.ndarray, width: int, coder: str) -> int:
    if coder == "none":
        return (int(counts.sum()) * width + 7) // 8
    lengths = huffman.lengths_from_counts(counts)
    used = np.flatnonzero(lengths)
    table = int(used[-1]) + 1 if used.size else 0  # the file stores lengths up to the last used symbol
    return (huffman.coded_bits(counts, lengths) + 7) // 8 + table
