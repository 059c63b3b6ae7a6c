"""Canonical Huffman coding of integer symbols, and the fixed-width coder it is compared with.

A canonical code is fully described by the code length of each symbol, so a
file stores lengths only (one byte per symbol, 0 = symbol unused). Codes are
handed out in order of ``(length, symbol)``: the first code of length ``L`` is
``(first[L-1] + count[L-1]) << 1`` and the codes of one length are consecutive
integers. Bits are written MSB first; a stream's last byte is zero-padded.

Encoding is bitarray's (``bitarray.encode``, C). Decoding is table-driven and
vectorised with numpy (``decode_many``): each stream is cut into lanes that all
advance together, several code words per look-up, one numpy operation per step
for every lane of every stream in a file; short streams go through bitarray's
sequential decoder (``canonical_decode``), which also backs up the lanes in the
rare stream whose lanes do not fall into step. Nothing loops in Python per
symbol but the repairs of such lanes, and those within a budget.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

from compress.errors import FormatError

MAX_LENGTH = 31  # bitarray's canonical decoder takes codes of at most 31 bits
FIXED_CHUNK = 1 << 20  # values packed per numpy pass; a multiple of 8 keeps chunks byte-aligned
LANE_MIN_SYMBOLS = 1 << 13  # shorter streams: bitarray's sequential decoder is cheaper than building tables
LANE_MIN_TOTAL = 1 << 19  # fewer symbols in all: the lanes' fixed cost (about 100 numpy steps) does not pay
LANE_MAX_BITS = 1 << 24  # bits in one batch of lanes: their memory is at most ~150 bytes a stream byte
LANE_STEPS = 96  # steps a lane is sized for: fewer make more lanes (more numpy work per call, fewer calls)
LANE_OVERLAP = 128  # bits a lane decodes before its own, to fall into step with the true word boundaries
MIN_LANE_BITS = 64  # longer than any step (31 bits), so only a stream's last lane can reach past its end
TABLE_BITS = (10, 16)  # look-up bits, smallest and largest: bigger streams earn bigger tables
TABLE_SHRINK = 7  # a stream of n bits gets a table of about n / 2**TABLE_SHRINK entries
SLOTS = 4  # words at most per look-up (a step takes 3 on average from 15 bits of 5-bit codes)


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


@dataclass(frozen=True, eq=False)
class Coded:
    """One Huffman-coded stream, as the file gives it.

    Attributes:
        lengths: code length per symbol (0 = absent).
        data: the stream's bytes; bits past ``nbits`` are ignored.
        nbits: its length in bits.
        count: how many symbols the file says it holds.
        field, offset: what to name in an error.
    """

    lengths: np.ndarray
    data: bytes
    nbits: int
    count: int
    field: str = "huffman"
    offset: int | None = None

    def bits(self) -> bitarray:
        bits = bitarray(endian="big")
        bits.frombytes(bytes(self.data[:(self.nbits + 7) // 8]))
        del bits[self.nbits:]
        return bits


def symbol_dtype(alphabet: int) -> np.dtype:
    """The unsigned integers decoded symbols come in: the narrowest that holds ``alphabet`` symbols."""
    return np.dtype(np.uint8 if alphabet <= 1 << 8 else np.uint16 if alphabet <= 1 << 16 else np.uint32)


def decode(lengths: np.ndarray, bits: bitarray, count: int, field: str = "huffman",
           offset: int | None = None) -> np.ndarray:
    """Decode exactly ``count`` symbols that use exactly every bit of ``bits`` (``decode_many`` of one stream).

    Args:
        lengths: code length per symbol (0 = absent), as stored in the file.
        bits: the coded stream, without padding.
        count: how many symbols the file says the stream holds.
        field, offset: what to name in an error.

    Returns:
        ``count`` symbols, each ``< len(lengths)``, of ``symbol_dtype(len(lengths))``.

    Raises:
        FormatError: bad lengths, invalid code words, or a stream that does not hold exactly
            ``count`` symbols in exactly ``len(bits)`` bits.
    """
    return decode_many([Coded(np.asarray(lengths), bits.tobytes(), len(bits), count, field, offset)])[0]


def decode_many(streams: Sequence[Coded], *, min_symbols: int = LANE_MIN_SYMBOLS, min_total: int = LANE_MIN_TOTAL,
                lane_steps: int = LANE_STEPS, overlap: int = LANE_OVERLAP,
                budget: int | None = None) -> list[np.ndarray]:
    """Decode several streams, each into exactly its ``count`` symbols using exactly its ``nbits`` bits.

    Streams of ``min_symbols`` or more (and at most ``LANE_MAX_BITS`` bits), if they hold
    ``min_total`` symbols together, are decoded together in lanes (``decode_lanes``: numpy,
    table-driven), in batches of at most ``LANE_MAX_BITS`` bits; the others, and the rare long
    ones whose lanes do not fall into step, one word after the other by bitarray
    (``decode_sequential``). Both give the same symbols and refuse the same streams.

    Args:
        streams: the streams.
        min_symbols, min_total: which streams go to the lanes (tests make them 1 and 0).
        lane_steps, overlap, budget: see ``decode_lanes``.

    Returns:
        Per stream its ``count`` symbols, each ``< len(lengths)``, of ``symbol_dtype(len(lengths))``.

    Raises:
        FormatError: naming a stream (its field and offset) with bad lengths, invalid code
            words, or not exactly ``count`` symbols in exactly ``nbits`` bits.
    """
    out: list[np.ndarray | None] = []
    laned = []
    eligible = [min_symbols <= s.count and s.nbits <= LANE_MAX_BITS and s.lengths.size <= 1 << 16 for s in streams]
    lanes = sum(s.count for s, e in zip(streams, eligible) if e) >= min_total
    for i, s in enumerate(streams):
        check_lengths(s.lengths, f"{s.field}.lengths", s.offset)
        used = np.flatnonzero(s.lengths)
        if s.count > s.nbits:  # every code word is at least one bit: checked before anything is allocated
            raise FormatError(s.field, s.offset, f"{s.count} symbols cannot fit in {s.nbits} bits")
        if s.count == 0:
            if s.nbits:
                raise FormatError(s.field, s.offset, f"{s.nbits} bits but no symbols")
            out.append(np.zeros(0, dtype=symbol_dtype(s.lengths.size)))
        elif used.size == 0:
            raise FormatError(f"{s.field}.lengths", s.offset, "no code lengths for a non-empty stream")
        elif used.size == 1:  # the lone code word is a single 0 bit
            if s.nbits != s.count or s.bits().any():
                raise FormatError(s.field, s.offset, f"stream does not decode to {s.count} symbols")
            out.append(np.full(s.count, used[0], dtype=symbol_dtype(s.lengths.size)))
        elif eligible[i] and lanes:
            out.append(None)
            laned.append(i)
        else:
            out.append(decode_sequential(s))
    while laned:  # in batches of at most LANE_MAX_BITS
        batch, bits = [], 0
        while laned and bits + streams[laned[0]].nbits <= LANE_MAX_BITS:
            bits += streams[laned[0]].nbits
            batch.append(laned.pop(0))
        decoded = decode_lanes([streams[i] for i in batch], lane_steps=lane_steps, overlap=overlap, budget=budget)
        for i, symbols in zip(batch, decoded):
            out[i] = symbols if symbols is not None else decode_sequential(streams[i])
    return out


def decode_sequential(stream: Coded) -> np.ndarray:
    """Decode one word after the other with bitarray's canonical decoder (C).

    The stream's lengths must have passed ``check_lengths`` and ``1 <= count <= nbits``.
    """
    table_count, table_symbols = canonical_tables(stream.lengths)
    symbols = canonical_decode(stream.bits(), table_count, table_symbols)
    try:
        # stops after count: bounded allocation
        out = np.fromiter(symbols, dtype=symbol_dtype(stream.lengths.size), count=stream.count)
        extra = next(symbols, None)
    except ValueError:  # an invalid or cut-off code word, or fewer than count symbols
        raise FormatError(stream.field, stream.offset, f"stream does not decode to {stream.count} symbols") from None
    if extra is not None:
        raise FormatError(stream.field, stream.offset, f"stream holds more than {stream.count} symbols")
    return out


class _Code:
    """A canonical code prepared for decoding.

    ``order`` lists the used symbols by ``(length, symbol)`` and ``lengths`` their code
    lengths; word ``i``, left-justified to ``maxlen`` bits, starts at ``starts[i]`` (the
    running Kraft sum), so a binary search in ``starts`` decodes any word. Its look-up table
    (``_tables``) is indexed by the next ``table_bits`` bits.
    """

    def __init__(self, lengths: np.ndarray, table_bits: int):
        lengths = np.asarray(lengths, dtype=np.int64)
        used = np.flatnonzero(lengths)
        self.symbol_lengths = lengths
        self.order = used[np.argsort(lengths[used], kind="stable")]
        self.lengths = lengths[self.order]
        self.maxlen = int(self.lengths[-1])
        self.starts = np.concatenate([[0], np.cumsum(np.left_shift(1, self.maxlen - self.lengths))[:-1]])
        self.step = int(np.gcd.reduce(self.lengths))  # every word boundary is a multiple of it
        self.table_bits = table_bits
        self.short = self.lengths <= table_bits  # the words a look-up can find
        self.span = np.left_shift(1, table_bits - self.lengths[self.short])  # table entries that start with each
        self.has_long = int(self.span.sum()) < 1 << table_bits


def _tables(codes: list[_Code], slot_bits: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The look-up tables of several codes, one after the other in joint arrays.

    Entry ``v`` of a code's table holds the whole words that the ``table_bits`` bits ``v``
    begin with (at most ``slots``): ``info = bits | words << 8`` (0 where the first word is
    longer than the table) and the symbols packed ``slot_bits`` apiece in ``packed``, the first
    lowest. Built for all codes at once: a few numpy passes over the joint table.

    Returns:
        ``(info, packed, bits_per_step)``: the joint tables and, per code, the bits a step takes
        on random bits (the average over its table, a long word counted at its code's longest).
    """
    size = np.array([1 << c.table_bits for c in codes])
    at = np.cumsum(size) - size
    # the first word of every entry: short words by canonical order, then a gap for the longer ones
    zero = np.zeros(1, dtype=np.int64)
    span = np.concatenate([a for n, c in zip(size, codes) for a in (c.span, [n - c.span.sum()])])
    first_length = np.repeat(np.concatenate([a for c in codes for a in (c.lengths[c.short], zero)]),
                             span).astype(np.uint32)
    packed_type = np.dtype(f"<u{slots * slot_bits // 8}")
    first_symbol = np.repeat(np.concatenate([a for c in codes for a in (c.order[c.short], zero)]),
                             span).astype(packed_type)
    base = np.repeat(at, size)  # where each entry's own table begins
    window = (np.arange(int(size.sum())) - base).astype(np.uint32)
    bits = np.repeat(np.array([c.table_bits for c in codes], dtype=np.uint32), size)
    mask = (np.uint32(1) << bits) - np.uint32(1)
    taken, packed = first_length.copy(), first_symbol.copy()
    alive = taken > 0
    words = alive.astype(np.uint16)
    for q in range(1, slots):
        rest = ((window << taken) & mask) + base  # the bits after the words taken (zeros past the table)
        length = first_length[rest]
        alive &= (length > 0) & (taken + length <= bits)
        if not alive.any():
            break
        packed |= np.where(alive, first_symbol[rest], 0).astype(packed_type) << packed_type.type(q * slot_bits)
        words += alive
        taken += np.where(alive, length, 0).astype(np.uint32)
    longest = np.repeat(np.array([c.maxlen for c in codes], dtype=np.uint32), size)
    per_step = np.add.reduceat(np.where(taken > 0, taken, longest), at) / size
    return (taken | words << 8).astype(np.uint16), packed, per_step


def _table_bits(nbits: int, maxlen: int) -> int:
    """Bits of look-up for a stream: bigger streams earn bigger tables (more words per step), and one
    that holds its longest word (no binary searches) where that costs at most an eighth of its bits."""
    size = nbits.bit_length()
    return min(TABLE_BITS[1], max(TABLE_BITS[0], size - TABLE_SHRINK, min(maxlen, size - 3)))


def _words(data: bytes, pad_bytes: int) -> np.ndarray:
    """``words[k]``: bytes ``4k..4k+7`` of ``data`` (zero past its end) as a big-endian uint64.

    The 33 to 64 bits from any bit ``p`` on are then ``words[p >> 5] << (p & 31)``: enough for a
    table look-up (16 bits) or the longest code word (31).
    """
    n = (len(data) + pad_bytes) // 4 + 2
    padded = bytes(data) + bytes(4 * n + 8 - len(data))
    words = np.empty(n, dtype=np.uint64)
    words[0::2] = np.frombuffer(padded, dtype=">u8", count=words[0::2].size, offset=0)
    words[1::2] = np.frombuffer(padded, dtype=">u8", count=words[1::2].size, offset=4)
    return words


def decode_lanes(streams: Sequence[Coded], *, lane_steps: int = LANE_STEPS, overlap: int = LANE_OVERLAP,
                 budget: int | None = None) -> list[np.ndarray | None]:
    """Decode streams in parallel lanes: one numpy operation per step advances every lane of every stream.

    Huffman decoding is sequential (a word's end is the next one's start), so each stream is
    cut into lanes, sized to be decoded in about ``lane_steps`` steps. A step looks the next
    bits of a lane up in its stream's table, which gives every whole word found there. Each
    lane starts ``overlap`` bits before its own bits and stops at the first step that ends at
    or past them. A lane that starts inside a code word decodes garbage at first, but Huffman
    codes fall into step with the true word boundaries within a few words: lane ``j`` is right
    from the word where lane ``j-1`` stops, if its own path has a word there. A lane where it
    has not is redone one word at a time from there until it meets its own path (rare).
    Lanes start at multiples of the lengths' common divisor, so equal-length codes are in step.

    Memory: tens of bytes per step of a lane, a step taking 4 to 31 bits; at most about 150
    bytes per byte of stream (streams of 1-bit words), about 20 on the synthetic ResNet-18's.

    Args:
        streams: valid codes (``check_lengths``) of two or more used symbols and alphabets of at
            most 65536 symbols, ``1 <= count <= nbits``, fewer than 2**31 bits in all.
        lane_steps: the steps a lane is sized for.
        overlap: bits a lane decodes before its own.
        budget: words at most redone one at a time per stream (default: ``count // 64 + 256``).

    Returns:
        Per stream its symbols (``symbol_dtype``), or None where the budget ran out (decode it sequentially).

    Raises:
        FormatError: for the first stream that is not exactly ``count`` words in exactly ``nbits`` bits.
    """
    return _Lanes(streams, lane_steps, overlap).decode(budget)


class _Lanes:
    """The lanes of ``decode_lanes``: their geometry, the joint tables, the steps taken, and the repairs."""

    def __init__(self, streams: Sequence[Coded], lane_steps: int, overlap: int):
        self.streams = streams
        self.slot_bits = 8 if all(s.lengths.size <= 1 << 8 for s in streams) else 16
        self.slots = min(SLOTS, 64 // self.slot_bits)
        codes = [_Code(s.lengths, _table_bits(s.nbits, int(np.max(s.lengths)))) for s in streams]
        self.codes = codes
        self.info_table, self.packed_table, step_bits = _tables(codes, self.slot_bits, self.slots)
        data = [s.data if len(s.data) == (s.nbits + 7) // 8 else bytes(s.data[:(s.nbits + 7) // 8]) for s in streams]
        # per stream: its first bit in the joint bytes, its bits, the lengths' common divisor, its lanes
        base = 8 * np.cumsum([0] + [len(d) for d in data[:-1]])
        nbits = np.array([s.nbits for s in streams])
        g = np.array([c.step for c in codes])
        count = np.maximum(1, nbits // np.maximum(MIN_LANE_BITS, lane_steps * step_bits)).astype(np.int64)

        def per_lane(values) -> np.ndarray:  # a value per stream, repeated for each of its lanes
            return np.repeat(np.asarray(values, dtype=np.int64), count)

        self.stream = per_lane(np.arange(len(streams)))
        k = np.arange(int(count.sum())) - per_lane(np.cumsum(count) - count)  # the lane's index in its stream
        nb, gl, b = per_lane(nbits), per_lane(g), per_lane(base)
        own = b + gl * ((k * nb) // (per_lane(count) * gl))  # multiples of g, spread evenly
        self.first = k == 0
        self.start = np.maximum(own - gl * -(-overlap // gl), b)
        self.end = np.append(own[1:], 0)
        last = np.append(self.first[1:], True)  # a stream's last lane ends where its bits do
        self.end[last] = (b + nb)[last]
        table_bits = np.array([c.table_bits for c in codes])
        self.drop = per_lane(64 - table_bits).astype(np.uint64)
        self.table_at = per_lane(np.cumsum(1 << table_bits) - (1 << table_bits))
        self.long_drop = per_lane([64 - c.maxlen for c in codes]).astype(np.uint64)
        self.key = self.stream << 32
        alphabet = np.array([c.symbol_lengths.size for c in codes])
        self.symbol_at = per_lane(np.cumsum(alphabet) - alphabet)
        self.symbol_length = np.concatenate([c.symbol_lengths for c in codes])
        self.long_starts = np.concatenate([c.starts + (i << 32) for i, c in enumerate(codes)])
        self.long_lengths = np.concatenate([c.lengths for c in codes])
        self.long_order = np.concatenate([c.order for c in codes]).astype(self.packed_table.dtype)
        self.has_long = any(c.has_long for c in codes)
        self.max_steps = int((self.end - self.start).max()) + 8  # a step moves a lane by one bit at least
        # lanes run on until the slowest is done: pad so that no read passes the end of the words
        self.words = _words(b"".join(data), self.max_steps * MAX_LENGTH // 8 + 16)
        self.rows = 2 * lane_steps + 16

    def decode(self, budget: int | None) -> list[np.ndarray | None]:
        self.run()
        self.join()
        self.finish()
        return self.repair_and_gather(budget)

    # --- the steps ---

    def run(self) -> None:
        """Step every lane until each has passed its end; rows of ``ends`` / ``info`` / ``packed`` per step."""
        cur = self.start
        lanes = cur.size
        ends = np.empty((self.rows, lanes), dtype=np.int32)  # a batch holds fewer than 2**31 bits
        info = np.empty((self.rows, lanes), dtype=np.uint16)
        packed = np.empty((self.rows, lanes), dtype=self.packed_table.dtype)
        index, taken = np.empty(lanes, dtype=np.int64), np.empty(lanes, dtype=np.int32)
        window, shift = np.empty(lanes, dtype=np.uint64), np.empty(lanes, dtype=np.uint64)
        entry = window.view(np.int64)  # the window is < 2**16: the same bits index the joint table
        s = 0
        while s < self.max_steps:
            if s == ends.shape[0]:  # more steps than the lanes were sized for: grow
                ends, info, packed = (np.concatenate([m, np.empty_like(m)]) for m in (ends, info, packed))
            np.right_shift(cur, 5, out=index)
            np.take(self.words, index, out=window, mode="clip")
            np.bitwise_and(cur, 31, out=shift, casting="unsafe")
            np.left_shift(window, shift, out=window)
            np.right_shift(window, self.drop, out=window)
            np.add(entry, self.table_at, out=entry)
            np.take(self.info_table, entry, out=info[s], mode="clip")
            np.take(self.packed_table, entry, out=packed[s], mode="clip")
            if self.has_long:
                self.long_words(cur, info[s], packed[s])
            np.bitwise_and(info[s], 255, out=taken)
            cur = np.add(cur, taken, out=ends[s])
            s += 1
            if s % 4 == 0 and (cur >= self.end).all():
                break
        self.steps = s
        self.ends, self.info, self.packed = ends[:s], info[:s], packed[:s]

    def long_words(self, cur: np.ndarray, info: np.ndarray, packed: np.ndarray) -> None:
        """Decode, by binary search, the words longer than their lane's table (``info`` 0)."""
        at = np.flatnonzero(info == 0)
        if at.size:
            c = cur[at]
            window = ((self.words[c >> 5] << (c & 31).astype(np.uint64)) >> self.long_drop[at]).astype(np.int64)
            window |= self.key[at]
            k = np.searchsorted(self.long_starts, window, side="right") - 1  # keys keep each stream's search its own
            info[at] = self.long_lengths[k] | 256
            packed[at] = self.long_order[k]

    def step_words(self, steps: np.ndarray, lanes: np.ndarray) -> tuple[np.ndarray, ...]:
        """For step ``steps[i]`` of lane ``lanes[i]``: the start, symbol and length of each slot, and the words held."""
        begin = np.where(steps == 0, self.start[lanes], self.ends[steps - 1, lanes])
        symbols = self.packed[steps, lanes].view(f"<u{self.slot_bits // 8}").reshape(-1, self.slots)
        length = self.symbol_length[symbols + self.symbol_at[lanes, None]]
        starts = begin[:, None] + np.cumsum(length, axis=1) - length
        return starts, symbols, length, (self.info[steps, lanes] >> 8).astype(np.int64)

    # --- where each lane's true words begin and end ---

    def join(self) -> None:
        """Each lane's entry (where the lane before it stops) and the step and slot of its own path there."""
        lanes = np.arange(self.start.size)
        self.final = np.count_nonzero(self.ends[:-1] < self.end, axis=0)  # the first step to end at or past the end
        self.exits = self.ends[self.final, lanes]
        self.entry = np.where(self.first, self.start, np.roll(self.exits, 1))
        rows = min(self.steps, int((self.entry - self.start).max()) + 1)  # a step ending before the entry is earlier
        self.s0 = np.minimum(np.count_nonzero(self.ends[:rows] <= self.entry, axis=0), self.steps - 1)
        starts, _, _, words = self.step_words(self.s0, lanes)
        match = (starts == self.entry[:, None]) & (np.arange(self.slots) < words[:, None])
        self.joined = match.any(axis=1) & (self.entry < self.end)
        self.q0 = match.argmax(axis=1)

    def finish(self) -> None:
        """How many words of its last step each lane keeps: all, but in a stream's last lane only those
        that start before the stream's end, the last of them ending exactly there (``ends_ok``)."""
        lanes = np.arange(self.start.size)
        self.q1 = (self.info[self.final, lanes] >> 8).astype(np.int64)
        last = np.flatnonzero(np.append(self.first[1:], True))
        starts, _, length, words = self.step_words(self.final[last], last)
        inside = (starts < self.end[last, None]) & (np.arange(self.slots) < words[:, None])
        keep = np.count_nonzero(inside, axis=1)
        self.q1[last] = keep
        at = np.arange(last.size), np.maximum(keep - 1, 0)
        self.ends_ok = dict(zip(last.tolist(), ((keep > 0) & (starts[at] + length[at] == self.end[last])).tolist()))

    # --- lanes redone one word at a time, and the words gathered ---

    def repair_and_gather(self, budget: int | None) -> list[np.ndarray | None]:
        """Each stream's symbols, its lanes repaired where needed and checked: exactly ``count``
        words, the last ending exactly at ``nbits``; None for a stream over its repair budget."""
        prefixes: dict[int, list[int]] = {}
        failed = set()
        bad = np.flatnonzero(~self.joined)
        if bad.size:
            failed = self.repair(bad, prefixes, budget)
        counts, symbols = self.gather()
        out: list[np.ndarray | None] = []
        lane_at = np.concatenate([[0], np.cumsum(counts)])
        bounds = np.flatnonzero(np.append(self.first, True))  # each stream's lanes: bounds[i]..bounds[i + 1]
        for i, s in enumerate(self.streams):
            if i in failed:
                out.append(None)
                continue
            a, b = int(bounds[i]), int(bounds[i + 1])
            redone = [j for j in prefixes if a <= j < b]
            total = int(lane_at[b] - lane_at[a]) + sum(len(prefixes[j]) for j in redone)
            if not self.ends_ok[b - 1]:
                raise FormatError(s.field, s.offset, f"the last code word is cut off: stream does not decode to "
                                  f"{s.count} symbols")
            if total != s.count:
                raise FormatError(s.field, s.offset, f"stream holds {total} symbols, not {s.count}")
            pieces, done = [], lane_at[a]
            for j in sorted(redone):  # a redone lane's first words go before its own
                pieces += [symbols[done:lane_at[j]], np.array(prefixes[j], dtype=symbols.dtype)]
                done = lane_at[j]
            mine = np.concatenate(pieces + [symbols[done:lane_at[b]]]) if pieces else symbols[done:lane_at[b]]
            out.append(mine.astype(symbol_dtype(s.lengths.size), copy=False))
        return out

    def repair(self, bad: np.ndarray, prefixes: dict[int, list[int]], budget: int | None) -> set[int]:
        """Redo, in order, each lane whose entry is not on its own path, and every lane after it whose
        entry moves: words one at a time from the entry until they meet a word of the lane's own
        path (the rest is the lane's own) or leave the lane. Each lane visited and each word decoded
        costs one unit of the stream's budget. Returns the streams over budget."""
        failed: set[int] = set()
        spent: dict[int, int] = {}
        moved = False
        slots = np.arange(self.slots)
        for j in range(int(bad[0]), self.start.size):
            i = int(self.stream[j])
            if self.first[j]:
                moved = False
            if i in failed or (self.joined[j] and not moved):
                continue
            code, stop, cur = self.codes[i], int(self.end[j]), int(self.exits[j - 1])
            allowed = budget if budget is not None else self.streams[i].count // 64 + 256
            spent[i] = spent.get(i, 0) + 1  # a lane visited costs one word: a hostile stream cannot visit them all
            if spent[i] > allowed:
                failed.add(i)
                continue
            # the lane's own words: where each starts -> (step, slot)
            steps = np.arange(self.final[j] + 1)
            starts, _, _, words = self.step_words(steps, np.full(steps.size, j))
            valid = slots < words[:, None]
            own = dict(zip(starts[valid].tolist(), zip(*np.nonzero(valid))))
            starts_list, prefix, met = code.starts.tolist(), [], None
            while cur < stop:
                met = own.get(cur)
                if met is not None:
                    break
                spent[i] = spent.get(i, 0) + 1
                if spent[i] > allowed:
                    failed.add(i)
                    break
                window = ((int(self.words[cur >> 5]) << (cur & 31)) & ((1 << 64) - 1)) >> (64 - code.maxlen)
                k = bisect.bisect_right(starts_list, window) - 1
                prefix.append(int(code.order[k]))
                cur += int(code.lengths[k])
            if i in failed:
                continue
            if prefix:
                prefixes[j] = prefix
            if met is not None:
                self.s0[j], self.q0[j] = met
                exit_ = int(self.exits[j])
            else:  # no word of its own: the lane's words are the prefix, and it ends where they do
                self.s0[j] = self.final[j] + 1
                exit_ = cur
                if j in self.ends_ok:
                    self.ends_ok[j] = cur == stop
            moved = exit_ != self.exits[j]
            self.exits[j] = exit_
        return failed

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        """The words each lane keeps, lane after lane: ``(words per lane, symbols)``.

        Lane ``j`` keeps the words of steps ``s0..final``, from slot ``q0`` of the first and before
        slot ``q1`` of the last: per lane-step a range ``lo..hi`` of slots, whose byte mask comes
        from a table of all ranges.
        """
        step = np.arange(self.steps)[:, None]
        hi = np.where((step >= self.s0) & (step <= self.final), self.info >> 8, 0).astype(np.uint8)
        lo = np.zeros_like(hi)
        live = np.flatnonzero(self.s0 <= self.final)
        hi[self.final[live], live] = self.q1[live]
        lo[self.s0[live], live] = self.q0[live]
        width = self.slots + 1
        key = np.ascontiguousarray((lo * np.uint8(width) + hi).T)  # lane after lane
        slot = np.arange(self.slots)
        ranges = (slot >= np.arange(width)[:, None, None]) & (slot < np.arange(width)[None, :, None])
        masks = ranges.reshape(width * width, self.slots).view(f"<u{self.slots}").reshape(-1)
        mask = masks[key].view(bool).reshape(-1)
        data = self.packed.T.copy().view(f"<u{self.slot_bits // 8}").reshape(-1)
        counts = hi.sum(axis=0, dtype=np.int64) - lo.sum(axis=0, dtype=np.int64)
        return counts, np.compress(mask, data)


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
