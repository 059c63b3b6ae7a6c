"""Canonical Huffman coding of integer symbols, and fixed-width packing.

A canonical code is fully described by the code length of each symbol, so the
file stores lengths only (one byte per symbol of the alphabet, 0 = unused).
Codes are assigned in order of (length, symbol): the first code of length L is
``(first(L-1) + count(L-1)) << 1``. bitarray builds the lengths and decodes in C.
Bits are MSB-first within each byte; the last byte is zero-padded.
"""
from __future__ import annotations

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

from compress.errors import FormatError

MAX_LENGTH = 31  # bitarray's canonical decoder handles codes up to 31 bits


def lengths_from_counts(counts: np.ndarray) -> np.ndarray:
    """Huffman code length (uint8) of every symbol from its count; 0 for unused symbols.

    A lone used symbol gets length 1. Lengths over ``MAX_LENGTH`` (only for astronomically
    skewed counts) are avoided by flattening the counts until the code fits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    c = counts[used]
    while True:
        codes, _, _ = canonical_huffman({int(s): int(n) for s, n in zip(used, c)})
        longest = max(len(v) for v in codes.values())
        if longest <= MAX_LENGTH:
            break
        c = np.maximum(1, c >> 1)
    for s, code in codes.items():
        lengths[s] = len(code)
    return lengths


def canonical_tables(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """``(count, symbol)`` lists of the canonical code: count[L] codes of length L, symbols by (length, symbol)."""
    lengths = np.asarray(lengths)
    used = np.flatnonzero(lengths)
    order = used[np.lexsort((used, lengths[used]))]
    top = int(lengths.max()) if used.size else 0
    count = np.bincount(lengths[used], minlength=top + 1).tolist()
    count[0] = 0
    return count, order.tolist()


def codebook(lengths: np.ndarray) -> dict[int, bitarray]:
    """Symbol -> code of the canonical code with these lengths."""
    count, symbols = canonical_tables(lengths)
    table, code, i = {}, 0, 0
    for length in range(1, len(count)):
        for _ in range(count[length]):
            table[symbols[i]] = bitarray(format(code, f"0{length}b"))
            code += 1
            i += 1
        code <<= 1
    return table


def check_lengths(lengths: np.ndarray, field: str) -> None:
    """A usable canonical code: lengths <= MAX_LENGTH and the Kraft sum exactly 1 (1/2 for a lone symbol)."""
    used = lengths[lengths > 0].astype(np.int64)
    if used.size == 0:
        return
    if used.max() > MAX_LENGTH:
        raise FormatError(field, None, f"code length {int(used.max())} exceeds {MAX_LENGTH}")
    kraft = int(np.sum(np.left_shift(np.int64(1), MAX_LENGTH - used)))
    full = 1 << MAX_LENGTH
    if (used.size == 1 and used[0] != 1) or (used.size > 1 and kraft != full):
        raise FormatError(field, None, "code lengths do not form a complete prefix code (Kraft sum != 1)")


def encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bitarray]:
    """Huffman-code ``symbols`` (ints in ``[0, alphabet)``).

    Returns:
        ``(lengths uint8[<= alphabet], bits)``; lengths end at the highest used symbol.
    """
    symbols = np.asarray(symbols, dtype=np.int64)
    counts = np.bincount(symbols, minlength=1) if symbols.size else np.zeros(0, np.int64)
    lengths = lengths_from_counts(counts)
    bits = bitarray()
    if symbols.size:
        bits.encode(codebook(lengths), symbols.tolist())
    return lengths, bits


def decode(lengths: np.ndarray, bits: bitarray, count: int, field: str) -> np.ndarray:
    """Decode exactly ``count`` symbols that use every bit of ``bits``.

    Raises:
        FormatError: bad lengths, an invalid code, or a symbol count that does not match.
    """
    check_lengths(lengths, field)
    if count == 0:
        if len(bits):
            raise FormatError(field, None, "stream has bits but no symbols")
        return np.zeros(0, dtype=np.int64)
    if count > len(bits):  # every code is at least one bit: checked before anything is allocated
        raise FormatError(field, None, f"{count} symbols cannot fit in {len(bits)} bits")
    table_count, table_symbols = canonical_tables(lengths)
    if not table_symbols:
        raise FormatError(field, None, "no code lengths for a non-empty stream")
    try:
        out = np.fromiter(canonical_decode(bits, table_count, table_symbols), dtype=np.int64)
    except (ValueError, IndexError) as e:
        raise FormatError(field, None, f"invalid Huffman data ({e})") from None
    if out.size != count:
        raise FormatError(field, None, f"decoded {out.size} symbols, expected {count}")
    return out


def pack_fixed(values: np.ndarray, width: int) -> bitarray:
    """Pack non-negative ints in ``width`` bits each, MSB first."""
    values = np.asarray(values, dtype=np.int64)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = bitarray()
    bits.pack(((values[:, None] >> shifts) & 1).astype(np.uint8).tobytes())
    return bits


def unpack_fixed(bits: bitarray, width: int, count: int, field: str) -> np.ndarray:
    if len(bits) != count * width:
        raise FormatError(field, None, f"{len(bits)} bits for {count} values of {width} bits")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    flags = np.frombuffer(bits.unpack(), dtype=np.uint8).reshape(count, width).astype(np.int64)
    return flags @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
