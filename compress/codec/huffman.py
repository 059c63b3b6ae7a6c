"""Canonical Huffman coding of integer symbols, and the fixed-width coder it is compared with.

A canonical code is fully described by the code length of each symbol, so a
file stores lengths only (one byte per symbol, 0 = symbol unused). Codes are
handed out in order of ``(length, symbol)``: the first code of length ``L`` is
``(first[L-1] + count[L-1]) << 1`` and the codes of one length are consecutive
integers. Bits are written MSB first; a stream's last byte is zero-padded.

bitarray does the per-symbol work in C (``bitarray.encode`` and
``bitarray.util.canonical_decode``); numpy does the rest. Nothing here loops in
Python per symbol.
"""
from __future__ import annotations

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

from compress.errors import FormatError

MAX_LENGTH = 31  # bitarray's canonical decoder takes codes of at most 31 bits
FIXED_CHUNK = 1 << 20  # values packed per numpy pass; a multiple of 8 keeps chunks byte-aligned


# --- code lengths ---------------------------------------------------------------------------------------


def lengths_from_counts(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of every symbol from its count.

    Args:
        counts: occurrences of each symbol ``0..len(counts)-1``.

    Returns:
        ``uint8[len(counts)]``: 0 for an unused symbol, 1 for a lone used symbol, else the
        Huffman length. Lengths never exceed ``MAX_LENGTH``: for the astronomically skewed
        counts that would need longer codes, the counts are halved until the code fits.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1  # a one-symbol code still needs one bit per symbol
        return lengths
    c = counts[used]
    while True:
        code, _, _ = canonical_huffman({int(s): int(n) for s, n in zip(used, c)})
        if max(len(v) for v in code.values()) <= MAX_LENGTH:
            break
        c = np.maximum(1, c >> 1)  # flatter counts give a shallower tree; the code stays complete
    for s, v in code.items():
        lengths[s] = len(v)
    return lengths


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Exact bits of a stream with these symbol counts under these code lengths."""
    return int(np.dot(np.asarray(counts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))


def check_lengths(lengths: np.ndarray, field: str = "huffman.lengths", offset: int | None = None) -> None:
    """Check that ``lengths`` describe a usable canonical code.

    Every length is at most ``MAX_LENGTH``; a lone used symbol has length 1; two or more
    used symbols form a complete prefix code (Kraft sum exactly 1). An empty code (no used
    symbol) is valid and can only decode an empty stream.

    Raises:
        FormatError: the lengths violate one of these rules.
    """
    used = np.asarray(lengths)[np.asarray(lengths) > 0].astype(np.int64)
    if used.size == 0:
        return
    if used.max() > MAX_LENGTH:
        raise FormatError(field, offset, f"code length {int(used.max())} exceeds {MAX_LENGTH}")
    if used.size == 1:
        if used[0] != 1:
            raise FormatError(field, offset, f"a lone symbol must have code length 1, not {int(used[0])}")
        return
    kraft = int(np.sum(np.left_shift(np.int64(1), MAX_LENGTH - used)))  # Kraft sum in units of 2**-31
    if kraft != 1 << MAX_LENGTH:
        relation = "over" if kraft > 1 << MAX_LENGTH else "under"
        raise FormatError(field, offset, f"code lengths are not a complete prefix code (Kraft sum {relation} 1)")


def canonical_tables(lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """The canonical code of ``lengths`` as bitarray's decoding tables.

    Returns:
        ``(count, symbols)``: ``count[L]`` codes of length ``L`` (``count[0] == 0``), and the
        used symbols sorted by ``(length, symbol)``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    used = np.flatnonzero(lengths)  # ascending symbols; a stable sort by length keeps them in order
    symbols = used[np.argsort(lengths[used], kind="stable")]
    top = int(lengths.max()) if used.size else 0
    count = np.bincount(lengths[used], minlength=top + 1).tolist()
    count[0] = 0
    return count, symbols.tolist()


def canonical_code(lengths: np.ndarray) -> dict[int, bitarray]:
    """Symbol -> code word of the canonical code with these lengths (used symbols only)."""
    count, symbols = canonical_tables(lengths)
    code, value, i = {}, 0, 0
    for length in range(1, len(count)):
        for _ in range(count[length]):
            code[symbols[i]] = bitarray(format(value, f"0{length}b"), endian="big")
            value += 1
            i += 1
        value <<= 1
    return code


# --- Huffman streams ------------------------------------------------------------------------------------


def encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, bitarray]:
    """Huffman-code integer symbols.

    Args:
        symbols: ints in ``[0, alphabet)``.
        alphabet: number of possible symbols.

    Returns:
        ``(lengths, bits)``: ``uint8[alphabet]`` code lengths (0 = absent) and the coded stream.

    Raises:
        ValueError: a symbol is outside ``[0, alphabet)``.
    """
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= alphabet):
        raise ValueError(f"symbols must lie in [0, {alphabet})")
    lengths = lengths_from_counts(np.bincount(symbols, minlength=alphabet))
    bits = bitarray(endian="big")
    if symbols.size:
        bits.encode(canonical_code(lengths), symbols.tolist())
    return lengths, bits


def decode(lengths: np.ndarray, bits: bitarray, count: int, field: str = "huffman",
           offset: int | None = None) -> np.ndarray:
    """Decode exactly ``count`` symbols that use exactly every bit of ``bits``.

    Args:
        lengths: code length per symbol (0 = absent), as stored in the file.
        bits: the coded stream, without padding.
        count: how many symbols the file says the stream holds.
        field, offset: what to name in an error.

    Returns:
        ``int64[count]`` symbols, each ``< len(lengths)``.

    Raises:
        FormatError: bad lengths, invalid code words, or a stream that does not hold exactly
            ``count`` symbols in exactly ``len(bits)`` bits.
    """
    check_lengths(lengths, f"{field}.lengths", offset)
    if count > len(bits):  # every code word is at least one bit: checked before anything is allocated
        raise FormatError(field, offset, f"{count} symbols cannot fit in {len(bits)} bits")
    if count == 0:
        if len(bits):
            raise FormatError(field, offset, f"{len(bits)} bits but no symbols")
        return np.zeros(0, dtype=np.int64)
    table_count, table_symbols = canonical_tables(lengths)
    if not table_symbols:
        raise FormatError(f"{field}.lengths", offset, "no code lengths for a non-empty stream")
    symbols = canonical_decode(bits, table_count, table_symbols)
    try:
        out = np.fromiter(symbols, dtype=np.int64, count=count)  # stops after count: bounded allocation
        extra = next(symbols, None)
    except ValueError:  # an invalid or cut-off code word, or fewer than count symbols
        raise FormatError(field, offset, f"stream does not decode to {count} symbols") from None
    if extra is not None:
        raise FormatError(field, offset, f"stream holds more than {count} symbols")
    return out


# --- fixed-width streams --------------------------------------------------------------------------------


def fixed_width(alphabet: int) -> int:
    """Bits per value of the fixed-width coder: ``ceil(log2(alphabet))``, at least 1."""
    return max(1, (int(alphabet) - 1).bit_length())


def pack_fixed(values: np.ndarray, width: int) -> bitarray:
    """Pack non-negative ints ``< 2**width`` (width 1..16) in ``width`` bits each, MSB first."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 1 << width):
        raise ValueError(f"values must lie in [0, {1 << width})")
    out = bytearray()
    for start in range(0, values.size, FIXED_CHUNK):
        chunk = values[start:start + FIXED_CHUNK].astype(">u2")
        bits = np.unpackbits(chunk.view(np.uint8)).reshape(-1, 16)[:, 16 - width:]
        out += np.packbits(bits).tobytes()
    result = bitarray(endian="big")
    result.frombytes(bytes(out))
    del result[values.size * width:]
    return result


def unpack_fixed(bits: bitarray, width: int, count: int, field: str = "fixed",
                 offset: int | None = None) -> np.ndarray:
    """Unpack ``count`` values of ``width`` bits (1..16) each.

    Raises:
        FormatError: ``bits`` does not hold exactly ``count * width`` bits.
    """
    if len(bits) != count * width:
        raise FormatError(field, offset, f"{len(bits)} bits for {count} values of {width} bits")
    data = np.frombuffer(bits.tobytes(), dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    step = FIXED_CHUNK * width // 8  # bytes per chunk of FIXED_CHUNK values
    for i, start in enumerate(range(0, count, FIXED_CHUNK)):
        n = min(FIXED_CHUNK, count - start)
        flat = np.unpackbits(data[i * step:i * step + (n * width + 7) // 8])[:n * width].reshape(n, width)
        wide = np.zeros((n, 16), dtype=np.uint8)
        wide[:, 16 - width:] = flat
        out[start:start + n] = np.packbits(wide).view(">u2")
    return out
