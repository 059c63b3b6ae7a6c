"""The ``.dcz`` model file: writer and reader. See docs/FORMAT.md for the byte layout.

    header (12 B) | tensor payloads ... | table | footer (28 B)

The table sits at the end so the writer streams tensor by tensor. The reader
treats every file as hostile: each count, length and offset is checked
against the bytes that exist before anything is allocated, and every failure
is a ``FormatError`` naming the field and byte offset. Nothing here can run
code: no pickle, only numbers, UTF-8 names and a JSON object of strings.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bitarray import bitarray

from compress.codec import gaps as gaps_mod
from compress.codec import huffman
from compress.errors import FormatError
from compress.record import Affine, Codebook, TensorRecord

MAGIC = b"\x89DCZ\r\n\x1a\n"
VERSION = 1
HEADER = struct.Struct("<8sHH")
FOOTER = struct.Struct("<QQI8s")

RAW, SPARSE_CODEBOOK, SPARSE_AFFINE = 0, 1, 2
ENCODINGS = {RAW: "raw", SPARSE_CODEBOOK: "sparse+codebook", SPARSE_AFFINE: "sparse+affine"}
FIXED, HUFFMAN = 0, 1
CODERS = {"none": FIXED, "huffman": HUFFMAN}
DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2"), 2: np.dtype("<i8")}
DTYPE_IDS = {"float32": 0, "float16": 1, "int64": 2}

MAX_NAME = 1024
MAX_NDIM = 8
MAX_NUMEL = 1 << 40  # a trillion elements: far beyond any model, far below overflow
MAX_TABLE = 1 << 16  # codebook entries / levels / symbols of an alphabet
MAX_META = 1 << 16


@dataclass(frozen=True)
class TensorStats:
    """What one tensor costs in the file (all sizes exact)."""

    name: str
    shape: tuple[int, ...]
    encoding: str
    n_kept: int = 0
    n_gap_symbols: int = 0
    n_escapes: int = 0
    gap_bits: int = 0
    code_bits: int = 0  # width of a code in the fixed-width coder
    code_stream_bits: int = 0
    gap_stream_bits: int = 0
    table_bytes: int = 0  # codebook or scale/zero point, plus Huffman length tables
    header_bytes: int = 0  # its entry in the tensor table
    payload_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.header_bytes + self.payload_bytes


def code_width(table_size: int) -> int:
    return max(1, math.ceil(math.log2(max(table_size, 1))))


# --- writing ------------------------------------------------------------------------------------------


class Writer:
    """Stream tensors into a ``.dcz`` file; the file appears (atomically) only when the block succeeds.

    Usage::

        with Writer(path, metadata={"model": "lenet5"}) as w:
            w.add("fc1.weight", record)
            w.add_raw("fc1.bias", bias)
    """

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.entries: list[bytes] = []
        self.stats: list[TensorStats] = []
        self.names: set[str] = set()
        self.size = 0

    def __enter__(self) -> "Writer":
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.file = os.fdopen(fd, "wb")
        self.file.write(HEADER.pack(MAGIC, VERSION, 0))
        self.offset = HEADER.size
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                self.finish()
        finally:
            self.file.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)

    def finish(self) -> None:
        meta = json.dumps(self.metadata, sort_keys=True, separators=(",", ":")).encode()
        table = struct.pack("<II", len(self.entries), len(meta)) + meta + b"".join(self.entries)
        self.file.write(table)
        self.file.write(FOOTER.pack(self.offset, len(table), zlib.crc32(table), MAGIC))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.size = self.offset + len(table) + FOOTER.size
        os.replace(self.tmp, self.path)

    def write_streams(self, *streams: bitarray) -> tuple[list[bytes], int]:
        refs, crc = [], 0
        for bits in streams:
            data = bits.tobytes()
            refs.append(struct.pack("<QQQ", self.offset, len(data), len(bits)))
            self.file.write(data)
            crc = zlib.crc32(data, crc)
            self.offset += len(data)
        return refs, crc

    def head(self, name: str, encoding: int, shape: tuple[int, ...]) -> bytes:
        raw = name.encode("utf-8")
        if name in self.names or not 0 < len(raw) <= MAX_NAME:
            raise ValueError(f"tensor name {name!r} is empty, too long or repeated")
        self.names.add(name)
        return struct.pack(f"<H{len(raw)}sBB{len(shape)}Q", len(raw), raw, encoding, len(shape), *shape)

    def add_raw(self, name: str, array: np.ndarray, dtype: str = "float32") -> TensorStats:
        """Store a tensor as it is (``float32``, ``float16`` or ``int64``)."""
        dt = DTYPES[DTYPE_IDS[dtype]]
        data = np.ascontiguousarray(array, dtype=dt)
        bits = bitarray()
        bits.frombytes(data.tobytes())
        refs, crc = self.write_streams(bits)
        entry = self.head(name, RAW, data.shape) + struct.pack("<IB", crc, DTYPE_IDS[dtype]) + refs[0]
        self.entries.append(entry)
        stats = TensorStats(name, tuple(data.shape), "raw", header_bytes=len(entry), payload_bytes=data.nbytes)
        self.stats.append(stats)
        return stats

    def add(self, name: str, record: TensorRecord, *, gap_bits: int | None = None,
            coder: str = "huffman") -> TensorStats:
        """Store a compressed tensor: its codes and its position gaps, each as a stream.

        Args:
            gap_bits: gap width 1..16; None picks the width whose coded gap stream is smallest.
            coder: ``huffman`` (canonical Huffman per stream) or ``none`` (fixed width).
        """
        table = record.table
        width = gap_bits if gap_bits is not None else gaps_mod.best_width(record.positions, record.numel)
        gap_symbols = gaps_mod.to_gaps(record.positions, record.numel, width)
        cbits = code_width(table.size)
        mode = CODERS[coder]
        if mode == HUFFMAN:
            code_lengths, code_stream = huffman.encode(record.codes, table.size)
            gap_lengths, gap_stream = huffman.encode(gap_symbols, 1 << width)
        else:
            code_lengths, gap_lengths = np.zeros(0, np.uint8), np.zeros(0, np.uint8)
            code_stream = huffman.pack_fixed(record.codes, cbits)
            gap_stream = huffman.pack_fixed(gap_symbols, width)
        if isinstance(table, Codebook):
            encoding = SPARSE_CODEBOOK
            table_bytes = struct.pack("<I", table.size) + table.values.astype("<f4").tobytes()
        else:
            encoding = SPARSE_AFFINE
            table_bytes = (struct.pack("<BII", int(table.per_channel), table.levels, table.scale.size)
                           + table.scale.astype("<f4").tobytes() + table.zero_point.astype("<i4").tobytes())
        lengths_bytes = (struct.pack("<I", code_lengths.size) + code_lengths.tobytes()
                         + struct.pack("<I", gap_lengths.size) + gap_lengths.tobytes())
        refs, crc = self.write_streams(code_stream, gap_stream)
        entry = (self.head(name, encoding, record.shape)
                 + struct.pack("<IBBBBQQ", crc, mode, cbits, width, 0, record.codes.size, gap_symbols.size)
                 + table_bytes + lengths_bytes + refs[0] + refs[1])
        self.entries.append(entry)
        m = (1 << width) - 1
        stats = TensorStats(
            name, record.shape, ENCODINGS[encoding], n_kept=int(record.codes.size),
            n_gap_symbols=int(gap_symbols.size), n_escapes=int((gap_symbols == m).sum()), gap_bits=width,
            code_bits=cbits, code_stream_bits=len(code_stream), gap_stream_bits=len(gap_stream),
            table_bytes=len(table_bytes) + len(lengths_bytes),
            header_bytes=len(entry) - len(table_bytes) - len(lengths_bytes),
            payload_bytes=len(code_stream.tobytes()) + len(gap_stream.tobytes()) + len(table_bytes)
            + len(lengths_bytes))
        self.stats.append(stats)
        return stats


def write(path: str | Path, tensors: dict[str, TensorRecord | np.ndarray], *, coder: str = "huffman",
          gap_bits: int | None = None, metadata: dict[str, str] | None = None) -> list[TensorStats]:
    """Write records (compressed) and arrays (raw float32, or int64 for integer arrays) to ``path``."""
    with Writer(path, metadata) as w:
        for name, t in tensors.items():
            if isinstance(t, TensorRecord):
                w.add(name, t, gap_bits=gap_bits, coder=coder)
            else:
                w.add_raw(name, t, "int64" if np.issubdtype(np.asarray(t).dtype, np.integer) else "float32")
    return w.stats


# --- reading ------------------------------------------------------------------------------------------


class Cursor:
    """Bounds-checked little-endian reads over a byte range; errors name the field and the offset."""

    def __init__(self, data: memoryview, start: int, end: int):
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int, field: str) -> memoryview:
        if n < 0 or n > self.end - self.pos:
            raise FormatError(field, self.pos, f"needs {n} bytes, {self.end - self.pos} remain")
        view = self.data[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, field: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, field))

    def one(self, fmt: str, field: str):
        return self.unpack(fmt, field)[0]

    def array(self, dtype: str, count: int, field: str) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        if count > (self.end - self.pos) // item:
            raise FormatError(field, self.pos, f"{count} values do not fit in the {self.end - self.pos} bytes left")
        return np.frombuffer(self.take(count * item, field), dtype=dtype).copy()


@dataclass(frozen=True)
class Entry:
    """A tensor's table entry, checked; its streams are decoded on demand."""

    name: str
    encoding: int
    shape: tuple[int, ...]
    crc: int
    streams: tuple[tuple[int, int, int], ...]  # (offset, bytes, bits)
    dtype: int = 0
    coder: int = 0
    code_bits: int = 0
    gap_bits: int = 0
    n_kept: int = 0
    n_gap_symbols: int = 0
    table: Codebook | Affine | None = None
    code_lengths: np.ndarray | None = None
    gap_lengths: np.ndarray | None = None
    offset: int = 0  # where the entry starts in the file, for error messages

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Reader:
    """Open a ``.dcz`` file (path or bytes); check its header, footer and table.

    Raises:
        FormatError: on anything that is not a well-formed ``.dcz`` file of a known version.
    """

    def __init__(self, source: str | Path | bytes):
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise FormatError("file", None, f"cannot read {source} ({e.strerror})") from None
        self.data = memoryview(data)
        self.size = len(data)
        self.metadata: dict[str, str] = {}
        self.entries: dict[str, Entry] = {}
        self.parse()

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def parse(self) -> None:
        if self.size < HEADER.size + FOOTER.size:
            raise FormatError("file", 0, f"{self.size} bytes is too short for a .dcz file")
        magic, version, flags = HEADER.unpack(self.data[:HEADER.size])
        if magic != MAGIC:
            raise FormatError("magic", 0, "not a .dcz file")
        if version != VERSION:
            raise FormatError("version", 8, f"unknown format version {version} (this reader knows {VERSION})")
        if flags != 0:
            raise FormatError("flags", 10, f"unknown flags {flags:#x}")
        footer_at = self.size - FOOTER.size
        table_offset, table_length, table_crc, end_magic = FOOTER.unpack(self.data[footer_at:])
        if end_magic != MAGIC:
            raise FormatError("footer.magic", footer_at + 20, "file is truncated or not a .dcz file")
        if not HEADER.size <= table_offset <= footer_at or table_offset + table_length != footer_at:
            raise FormatError("footer.table_offset", footer_at,
                              f"table at {table_offset}+{table_length} does not end at the footer ({footer_at})")
        table = self.data[table_offset:footer_at]
        if zlib.crc32(table) != table_crc:
            raise FormatError("footer.table_crc", footer_at + 16, "table checksum mismatch: the file is damaged")
        self.payload_end = table_offset
        cur = Cursor(self.data, table_offset, footer_at)
        count, meta_len = cur.unpack("II", "table.count")
        if meta_len > MAX_META:
            raise FormatError("table.metadata", cur.pos - 4, f"metadata of {meta_len} bytes exceeds {MAX_META}")
        meta_at = cur.pos
        try:
            meta = json.loads(bytes(cur.take(meta_len, "table.metadata")).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError("table.metadata", meta_at, "not a UTF-8 JSON object") from None
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise FormatError("table.metadata", meta_at, "must be a JSON object of strings")
        self.metadata = meta
        if count > (footer_at - cur.pos) // 20:  # an entry takes at least 20 bytes
            raise FormatError("table.count", table_offset, f"{count} tensors cannot fit in the table")
        for i in range(count):
            entry = self.parse_entry(cur, i)
            if entry.name in self.entries:
                raise FormatError(f"tensor[{i}].name", entry.offset, f"repeated name {entry.name!r}")
            self.entries[entry.name] = entry
        if cur.pos != footer_at:
            raise FormatError("table", cur.pos, f"{footer_at - cur.pos} unexpected bytes after the last tensor")

    def parse_entry(self, cur: Cursor, i: int) -> Entry:
        at = cur.pos
        f = f"tensor[{i}]"
        name_len = cur.one("H", f"{f}.name_length")
        if not 0 < name_len <= MAX_NAME:
            raise FormatError(f"{f}.name_length", at, f"name length {name_len} not in 1..{MAX_NAME}")
        try:
            name = bytes(cur.take(name_len, f"{f}.name")).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{f}.name", at + 2, "not UTF-8") from None
        f = f"tensor[{i}] {name!r}"
        encoding, ndim = cur.unpack("BB", f"{f}.encoding")
        if encoding not in ENCODINGS:
            raise FormatError(f"{f}.encoding", cur.pos - 2, f"unknown encoding {encoding}")
        if ndim > MAX_NDIM:
            raise FormatError(f"{f}.ndim", cur.pos - 1, f"{ndim} dimensions (at most {MAX_NDIM})")
        shape_at = cur.pos
        shape = cur.unpack(f"{ndim}Q", f"{f}.shape")
        numel = 1
        for d in shape:  # Python ints: no overflow, capped before anything is allocated
            numel *= d
            if numel > MAX_NUMEL:
                raise FormatError(f"{f}.shape", shape_at, f"shape {shape} has more than {MAX_NUMEL} elements")
        if encoding == RAW:
            crc, dtype = cur.unpack("IB", f"{f}.dtype")
            if dtype not in DTYPES:
                raise FormatError(f"{f}.dtype", cur.pos - 1, f"unknown dtype {dtype}")
            stream = self.stream(cur, f"{f}.stream")
            if stream[1] != numel * DTYPES[dtype].itemsize or stream[2] != 8 * stream[1]:
                raise FormatError(f"{f}.stream", cur.pos - 24,
                                  f"{stream[1]} bytes for {numel} values of {DTYPES[dtype].itemsize} bytes")
            return Entry(name, encoding, shape, crc, (stream,), dtype=dtype, offset=at)
        crc, coder, code_bits, gap_bits, _, n_kept, n_gap = cur.unpack("IBBBBQQ", f"{f}.streams")
        if coder not in (FIXED, HUFFMAN):
            raise FormatError(f"{f}.coder", cur.pos - 20, f"unknown coder {coder}")
        if not 1 <= gap_bits <= 16 or not 1 <= code_bits <= 16:
            raise FormatError(f"{f}.gap_bits", cur.pos - 18, f"widths {code_bits}/{gap_bits} not in 1..16")
        if n_kept > numel or n_kept > n_gap:
            raise FormatError(f"{f}.n_kept", cur.pos - 16, f"{n_kept} kept of {numel} with {n_gap} gap symbols")
        if numel > (n_gap + 1) * ((1 << gap_bits) - 1):
            raise FormatError(f"{f}.n_gap_symbols", cur.pos - 8,
                              f"{n_gap} gap symbols of {gap_bits} bits cannot span {numel} positions")
        table = self.table(cur, encoding, shape, f)
        if code_width(table.size) != code_bits:
            raise FormatError(f"{f}.code_bits", at, f"{code_bits} bits for a table of {table.size}")
        code_lengths = cur.array("u1", cur.one("I", f"{f}.code_lengths"), f"{f}.code_lengths")
        gap_lengths = cur.array("u1", cur.one("I", f"{f}.gap_lengths"), f"{f}.gap_lengths")
        if code_lengths.size > table.size or gap_lengths.size > 1 << gap_bits:
            raise FormatError(f"{f}.code_lengths", cur.pos, "more code lengths than symbols")
        streams = (self.stream(cur, f"{f}.code_stream"), self.stream(cur, f"{f}.gap_stream"))
        for (_, _, bits), count, width, field in ((streams[0], n_kept, code_bits, "code_stream"),
                                                   (streams[1], n_gap, gap_bits, "gap_stream")):
            ok = bits == count * width if coder == FIXED else count <= bits
            if not ok:
                raise FormatError(f"{f}.{field}", cur.pos, f"{bits} bits cannot hold {count} symbols")
        return Entry(name, encoding, shape, crc, streams, coder=coder, code_bits=code_bits, gap_bits=gap_bits,
                     n_kept=n_kept, n_gap_symbols=n_gap, table=table, code_lengths=code_lengths,
                     gap_lengths=gap_lengths, offset=at)

    def table(self, cur: Cursor, encoding: int, shape: tuple[int, ...], f: str) -> Codebook | Affine:
        at = cur.pos
        if encoding == SPARSE_CODEBOOK:
            k = cur.one("I", f"{f}.codebook_size")
            if not 1 <= k <= MAX_TABLE:
                raise FormatError(f"{f}.codebook_size", at, f"{k} entries not in 1..{MAX_TABLE}")
            values = cur.array("<f4", k, f"{f}.codebook")
            if not np.all(np.isfinite(values)):
                raise FormatError(f"{f}.codebook", at + 4, "NaN or infinite value")
            return Codebook(values)
        per_channel, levels, channels = cur.unpack("BII", f"{f}.affine")
        if per_channel > 1 or not 1 <= levels <= MAX_TABLE:
            raise FormatError(f"{f}.affine", at, f"per_channel={per_channel}, levels={levels}")
        expected = shape[0] if per_channel and shape else 1
        if channels != expected:
            raise FormatError(f"{f}.affine.channels", at + 5, f"{channels} channels, expected {expected}")
        scale = cur.array("<f4", channels, f"{f}.scale")
        zero_point = cur.array("<i4", channels, f"{f}.zero_point")
        if not np.all(np.isfinite(scale)):
            raise FormatError(f"{f}.scale", at + 9, "NaN or infinite scale")
        if np.any(np.abs(zero_point.astype(np.int64)) > MAX_TABLE):
            raise FormatError(f"{f}.zero_point", at + 9 + 4 * channels, "zero point out of range")
        return Affine(scale, zero_point, levels, bool(per_channel))

    def stream(self, cur: Cursor, field: str) -> tuple[int, int, int]:
        at = cur.pos
        offset, length, bits = cur.unpack("QQQ", field)
        if not HEADER.size <= offset <= self.payload_end or length > self.payload_end - offset:
            raise FormatError(f"{field}.offset", at, f"bytes {offset}..{offset + length} lie outside the payload")
        if not 8 * length - 7 <= bits <= 8 * length and not (length == 0 == bits):
            raise FormatError(f"{field}.bits", at + 16, f"{bits} bits do not fill {length} bytes")
        return offset, length, bits

    def bits(self, stream: tuple[int, int, int]) -> bitarray:
        offset, length, nbits = stream
        b = bitarray()
        b.frombytes(bytes(self.data[offset:offset + length]))
        del b[nbits:]
        return b

    def check_crc(self, e: Entry) -> None:
        crc = 0
        for offset, length, _ in e.streams:
            crc = zlib.crc32(self.data[offset:offset + length], crc)
        if crc != e.crc:
            raise FormatError(f"tensor {e.name!r}.crc", e.offset, "payload checksum mismatch: the file is damaged")

    def info(self, name: str) -> Entry:
        return self.entries[name]

    def record(self, name: str) -> TensorRecord:
        """The compressed tensor ``name`` as a record (positions, codes, table)."""
        e = self.entries[name]
        if e.encoding == RAW:
            raise FormatError(f"tensor {name!r}", e.offset, "is stored raw, it has no record")
        self.check_crc(e)
        f = f"tensor {name!r}"
        code_bits, gap_bits = self.bits(e.streams[0]), self.bits(e.streams[1])
        if e.coder == HUFFMAN:
            codes = huffman.decode(e.code_lengths, code_bits, e.n_kept, f"{f}.code_stream")
            symbols = huffman.decode(e.gap_lengths, gap_bits, e.n_gap_symbols, f"{f}.gap_stream")
        else:
            codes = huffman.unpack_fixed(code_bits, e.code_bits, e.n_kept, f"{f}.code_stream")
            symbols = huffman.unpack_fixed(gap_bits, e.gap_bits, e.n_gap_symbols, f"{f}.gap_stream")
        if codes.size and codes.max() >= e.table.size:
            raise FormatError(f"{f}.code_stream", e.streams[0][0], f"code {int(codes.max())} outside the table")
        positions = gaps_mod.from_gaps(symbols, e.gap_bits, e.numel, f"{f}.gap_stream")
        if positions.size != e.n_kept:
            raise FormatError(f"{f}.gap_stream", e.streams[1][0], f"{positions.size} positions for {e.n_kept} codes")
        return TensorRecord(e.shape, positions, codes, e.table)

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` decoded: float32 (raw float16 widened), or int64."""
        e = self.entries[name]
        if e.encoding != RAW:
            dense = self.record(name).to_dense()
            if not np.all(np.isfinite(dense)):  # a hostile affine scale can overflow float32
                raise FormatError(f"tensor {name!r}", e.offset, "decodes to NaN or infinite values")
            return dense
        self.check_crc(e)
        offset, length, _ = e.streams[0]
        out = np.frombuffer(self.data[offset:offset + length], dtype=DTYPES[e.dtype]).reshape(e.shape)
        if out.dtype.kind == "f":
            if not np.all(np.isfinite(out)):
                raise FormatError(f"tensor {name!r}", offset, "NaN or infinite value")
            return out.astype(np.float32)
        return out.astype(np.int64)


def read(path: str | Path | bytes) -> dict[str, np.ndarray]:
    """Every tensor of a ``.dcz`` file, decoded."""
    reader = Reader(path)
    return {name: reader.array(name) for name in reader.names}
