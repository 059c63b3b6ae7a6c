"""The ``.dcz`` model file: writer and reader. docs/FORMAT.md is the byte-level specification.

    header (12 B) | tensor payloads (streams, back to back) | table | footer (28 B)

The table sits at the end so the writer streams tensor by tensor. The reader
treats every file as hostile: each count, length and offset is checked against
the bytes that exist before anything is allocated, and every failure is a
``FormatError`` naming the field and its byte offset. Nothing here can run
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
from typing import Iterable, Mapping

import numpy as np
from bitarray import bitarray

from compress.codec import gaps, huffman
from compress.errors import FormatError
from compress.record import Affine, Codebook, TensorRecord

MAGIC = b"\x89DCZ\r\n\x1a\n"
VERSION = 1
HEADER = struct.Struct("<8sHH")  # magic, version, flags
FOOTER = struct.Struct("<QQI8s")  # table offset, table length, table CRC32, magic
STREAM = struct.Struct("<QQQ")  # byte offset, byte length, bit length

RAW, SPARSE_CODEBOOK, SPARSE_AFFINE = 0, 1, 2
ENCODINGS = {RAW: "raw", SPARSE_CODEBOOK: "sparse+codebook", SPARSE_AFFINE: "sparse+affine"}
FIXED, HUFFMAN = 0, 1
CODERS = {"none": FIXED, "huffman": HUFFMAN}
CODER_NAMES = {v: k for k, v in CODERS.items()}
DTYPES = {0: ("float32", np.dtype("<f4")), 1: ("float16", np.dtype("<f2")), 2: ("int64", np.dtype("<i8"))}
DTYPE_IDS = {name: i for i, (name, _) in DTYPES.items()}

MAX_NAME = 1024  # bytes of UTF-8
MAX_NDIM = 8
MAX_NUMEL = 1 << 32  # elements of one tensor (16 GiB dense float32): far beyond these models, far below overflow
# What a file may make the reader allocate unless the caller allows more (section 5 of docs/FORMAT.md): the
# format lets one escape bit skip 65,535 zeros, so a tiny file can describe a huge, nearly empty tensor.
MIN_ELEMENT_BUDGET = 1 << 24  # any file may decode to this many elements (64 MiB of float32)
ELEMENTS_PER_BYTE = 1 << 12  # and to this many per byte of file; real Deep Compression files have ~10
MAX_TABLE = 1 << 16  # codebook entries / affine levels: codes fit in 16 bits
MAX_ZERO_POINT = 1 << 24  # |zero point|: code - zero_point stays exact in int32 and float32
MAX_META = 1 << 16  # bytes of metadata JSON
MIN_ENTRY = 34  # bytes of the smallest table entry (a raw scalar with a one-byte name)


@dataclass(frozen=True)
class TensorStats:
    """What one tensor costs in the file; every size is exact.

    ``total_bytes = header_bytes + payload_bytes``; over all tensors, plus the file's fixed
    overhead (header, footer, tensor count, metadata), the totals add up to the file size.
    """

    name: str
    shape: tuple[int, ...]
    encoding: str  # raw | sparse+codebook | sparse+affine
    coder: str = ""  # huffman | none for sparse tensors
    dtype: str = ""  # float32 | float16 | int64 for raw tensors
    n_kept: int = 0
    n_gap_symbols: int = 0  # escapes included
    n_escapes: int = 0
    gap_bits: int = 0
    code_bits: int = 0  # width of a code in the fixed-width coder
    code_stream_bits: int = 0
    gap_stream_bits: int = 0
    table_bytes: int = 0  # codebook or scale/zero point, plus the Huffman length tables (part of header_bytes)
    header_bytes: int = 0  # the tensor's whole entry in the table
    payload_bytes: int = 0  # its streams
    total_bytes: int = 0


# --- writing ------------------------------------------------------------------------------------------


class Writer:
    """Stream tensors into a ``.dcz`` file that appears atomically, and only on success.

    Bytes go to a temporary file beside ``path``; ``close()`` (or leaving the ``with``
    block normally) writes the table and footer and renames it into place. An exception
    inside the block removes the temporary file and leaves ``path`` untouched.

    Usage::

        with Writer(path, metadata={"model": "lenet5"}) as w:
            w.add("fc1.weight", record)
            w.add_raw("fc1.bias", bias)
        w.stats, w.size

    Args:
        path: the file to write.
        metadata: str -> str pairs stored as sorted JSON (at most 64 KiB).

    Raises:
        ValueError: metadata that is not str -> str or too large.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.metadata = _metadata_bytes(metadata or {})
        self.stats: list[TensorStats] = []
        self.size: int | None = None  # the file's size, once closed
        self._entries: list[bytes] = []
        self._names: set[str] = set()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(HEADER.pack(MAGIC, VERSION, 0))
        self._offset = HEADER.size

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def close(self) -> tuple[list[TensorStats], int]:
        """Write the table and footer and move the file into place.

        Returns:
            ``(stats per tensor, file size in bytes)``.
        """
        if self._file.closed:
            raise ValueError("the writer is closed")
        try:
            table = struct.pack("<II", len(self._entries), len(self.metadata)) + self.metadata
            table += b"".join(self._entries)
            self._file.write(table)
            self._file.write(FOOTER.pack(self._offset, len(table), zlib.crc32(table), MAGIC))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make a model file private
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.size = self._offset + len(table) + FOOTER.size
        return self.stats, self.size

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is left as it was."""
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def add(self, name: str, record: TensorRecord, *, gap_bits: int | None = None,
            coder: str = "huffman") -> TensorStats:
        """Store a sparse tensor: its codes and its position gaps, one stream each.

        Args:
            name: unique tensor name, 1..1024 bytes of UTF-8.
            record: shape, kept positions, codes and code -> value table.
            gap_bits: gap width 1..16; None picks the width whose gap stream is smallest.
            coder: ``huffman`` (canonical Huffman per stream) or ``none`` (fixed width:
                ``ceil(log2(table.size))`` bits per code, ``gap_bits`` per gap symbol).

        Returns:
            The tensor's exact sizes.

        Raises:
            ValueError: a bad name, coder or width, or a record the reader would refuse
                (positions not strictly increasing inside the tensor, codes outside the
                table, non-finite values, sizes past the format's limits).
        """
        self._check_open()
        if coder not in CODERS:
            raise ValueError(f"coder must be one of {sorted(CODERS)}, got {coder!r}")
        if gap_bits is not None and gap_bits not in gaps.WIDTHS:
            raise ValueError(f"gap_bits must be in 1..16 or None, got {gap_bits!r}")
        name_bytes = self._check_name(name)
        _check_shape(name, record.shape)
        _check_record(name, record)
        table = record.table
        width = gap_bits if gap_bits is not None else gaps.best_width(record.positions, record.numel, coder=coder)
        symbols = gaps.to_gaps(record.positions, record.numel, width)
        code_bits = huffman.fixed_width(table.size)
        if coder == "huffman":
            code_lengths, code_stream = huffman.encode(record.codes, table.size)
            gap_lengths, gap_stream = huffman.encode(symbols, 1 << width)
        else:
            code_lengths = gap_lengths = np.zeros(0, np.uint8)
            code_stream = huffman.pack_fixed(record.codes, code_bits)
            gap_stream = huffman.pack_fixed(symbols, width)
        encoding = SPARSE_CODEBOOK if isinstance(table, Codebook) else SPARSE_AFFINE
        values = _table_bytes(table)
        lengths = _lengths_bytes(code_lengths) + _lengths_bytes(gap_lengths)
        refs, crc = self._write_streams([code_stream, gap_stream])
        entry = (_entry_head(name_bytes, encoding, record.shape, crc)
                 + struct.pack("<BBBQQ", CODERS[coder], CODERS[coder], width, record.codes.size, symbols.size)
                 + values + lengths + refs[0] + refs[1])
        payload = (len(code_stream) + 7) // 8 + (len(gap_stream) + 7) // 8
        return self._finish(entry, TensorStats(
            name, record.shape, ENCODINGS[encoding], coder=coder, n_kept=int(record.codes.size),
            n_gap_symbols=int(symbols.size), n_escapes=int(np.count_nonzero(symbols == gaps.escape(width))),
            gap_bits=width, code_bits=code_bits, code_stream_bits=len(code_stream),
            gap_stream_bits=len(gap_stream), table_bytes=len(values) + len(lengths), header_bytes=len(entry),
            payload_bytes=payload, total_bytes=len(entry) + payload))

    def add_raw(self, name: str, array: np.ndarray, dtype: str = "float32") -> TensorStats:
        """Store a tensor as it is.

        Args:
            name: unique tensor name, 1..1024 bytes of UTF-8.
            array: the values; real numbers for the float dtypes, integers for ``int64``.
            dtype: ``float32``, ``float16`` (lossy, half the bytes) or ``int64``.

        Returns:
            The tensor's exact sizes.

        Raises:
            ValueError: a bad name or dtype, NaN/Inf values (or values that overflow float16),
                or an array past the format's limits.
        """
        self._check_open()
        if dtype not in DTYPE_IDS:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_IDS)}, got {dtype!r}")
        array = np.asarray(array)
        name_bytes = self._check_name(name)
        _check_shape(name, array.shape)
        data = _raw_array(name, array, dtype)
        refs, crc = self._write_streams([data.tobytes()])
        entry = _entry_head(name_bytes, RAW, array.shape, crc) + struct.pack("<B", DTYPE_IDS[dtype]) + refs[0]
        return self._finish(entry, TensorStats(
            name, tuple(array.shape), "raw", dtype=dtype, header_bytes=len(entry), payload_bytes=data.nbytes,
            total_bytes=len(entry) + data.nbytes))

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError("the writer is closed")

    def _check_name(self, name: str) -> bytes:
        """The name as UTF-8, if it is one the reader accepts and not used yet."""
        if not isinstance(name, str):
            raise ValueError(f"tensor name must be a str, got {type(name).__name__}")
        try:
            raw = name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"tensor name {name!r} is not valid Unicode") from None
        if not 0 < len(raw) <= MAX_NAME:
            raise ValueError(f"tensor name must be 1..{MAX_NAME} bytes of UTF-8, got {len(raw)}")
        if name in self._names:
            raise ValueError(f"tensor name {name!r} is repeated")
        return raw

    def _write_streams(self, streams: list[bitarray | bytes]) -> tuple[list[bytes], int]:
        """Append streams to the payload; their (offset, bytes, bits) records and the CRC32 of their bytes."""
        refs, crc = [], 0
        for stream in streams:
            data, nbits = (stream.tobytes(), len(stream)) if isinstance(stream, bitarray) else (stream, 8 * len(stream))
            refs.append(STREAM.pack(self._offset, len(data), nbits))
            self._file.write(data)
            crc = zlib.crc32(data, crc)
            self._offset += len(data)
        return refs, crc

    def _finish(self, entry: bytes, stats: TensorStats) -> TensorStats:
        self._entries.append(entry)
        self._names.add(stats.name)
        self.stats.append(stats)
        return stats


def write(path: str | os.PathLike, tensors: Mapping[str, TensorRecord | np.ndarray], *, coder: str = "huffman",
          gap_bits: int | None = None, raw_dtype: str = "float32",
          metadata: Mapping[str, str] | None = None) -> tuple[list[TensorStats], int]:
    """Write records (sparse) and arrays (raw) to ``path`` in the given order.

    Args:
        tensors: name -> ``TensorRecord`` or array; integer and bool arrays are stored as int64,
            the others as ``raw_dtype``.
        coder, gap_bits: as for ``Writer.add``.
        raw_dtype: ``float32`` or ``float16`` for floating-point arrays.
        metadata: str -> str pairs.

    Returns:
        ``(stats per tensor, file size in bytes)``.
    """
    with Writer(path, metadata) as w:
        for name, t in tensors.items():
            if isinstance(t, TensorRecord):
                w.add(name, t, gap_bits=gap_bits, coder=coder)
            else:
                t = np.asarray(t)
                w.add_raw(name, t, "int64" if t.dtype.kind in "iub" else raw_dtype)
    return w.stats, w.size


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM or any(not 0 <= d <= MAX_NUMEL for d in shape) or math.prod(shape) > MAX_NUMEL:
        raise ValueError(f"{name}: shape {shape} is past the format's limits "
                         f"(at most {MAX_NDIM} dims, {MAX_NUMEL} elements, each dim at most {MAX_NUMEL})")


def _entry_head(name: bytes, encoding: int, shape: tuple[int, ...], crc: int) -> bytes:
    """The fields every table entry starts with: name, encoding, shape, payload CRC."""
    return struct.pack(f"<H{len(name)}sBB{len(shape)}QI", len(name), name, encoding, len(shape), *shape, crc)


def _metadata_bytes(metadata: Mapping[str, str]) -> bytes:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata must map str to str")
    if not metadata:
        return b""
    data = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_META:
        raise ValueError(f"metadata is {len(data)} bytes of JSON, at most {MAX_META} allowed")
    return data


def _check_record(name: str, record: TensorRecord) -> None:
    """Refuse a record the reader would refuse, before a byte of it is written."""
    table, positions, codes, numel = record.table, record.positions, record.codes, record.numel
    if not 1 <= table.size <= MAX_TABLE:
        raise ValueError(f"{name}: a table of {table.size} codes (1..{MAX_TABLE} allowed)")
    if isinstance(table, Codebook):
        if not np.all(np.isfinite(table.values)):
            raise ValueError(f"{name}: NaN or infinite value in the codebook")
    else:
        channels = record.shape[0] if table.per_channel and record.shape else 1
        if table.per_channel and not record.shape:
            raise ValueError(f"{name}: a per-channel grid needs at least one dimension")
        if table.scale.size != channels:
            raise ValueError(f"{name}: {table.scale.size} scales for {channels} channels")
        if not np.all(np.isfinite(table.scale)):
            raise ValueError(f"{name}: NaN or infinite scale")
        if np.any(np.abs(table.zero_point.astype(np.int64)) > MAX_ZERO_POINT):
            raise ValueError(f"{name}: zero point beyond +-{MAX_ZERO_POINT}")
    if positions.size:
        if positions[0] < 0 or positions[-1] >= numel or np.any(np.diff(positions) <= 0):
            raise ValueError(f"{name}: positions must be strictly increasing in [0, {numel})")
        if codes.min() < 0 or codes.max() >= table.size:
            raise ValueError(f"{name}: codes must lie in [0, {table.size})")
        if not np.all(np.isfinite(_values(record))):
            raise ValueError(f"{name}: the table decodes to NaN or infinite values")


def _values(record: TensorRecord) -> np.ndarray:
    """The record's values; overflow to Inf is reported by the caller, not warned about."""
    with np.errstate(over="ignore", invalid="ignore"):
        return record.values()


def _table_bytes(table: Codebook | Affine) -> bytes:
    if isinstance(table, Codebook):
        return struct.pack("<I", table.size) + table.values.astype("<f4").tobytes()
    return (struct.pack("<BII", int(table.per_channel), table.levels, table.scale.size)
            + table.scale.astype("<f4").tobytes() + table.zero_point.astype("<i4").tobytes())


def _lengths_bytes(lengths: np.ndarray) -> bytes:
    """u32 count + one u8 per symbol up to the last used one (trailing zeros are implied)."""
    used = np.flatnonzero(lengths)
    n = int(used[-1]) + 1 if used.size else 0
    return struct.pack("<I", n) + lengths[:n].astype(np.uint8).tobytes()


def _raw_array(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    target = DTYPES[DTYPE_IDS[dtype]][1]
    if dtype == "int64":
        if array.dtype.kind not in "iub":
            raise ValueError(f"{name}: int64 storage needs an integer array, got {array.dtype}")
        return np.ascontiguousarray(array, dtype=target)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"{name}: {dtype} storage needs a real-valued array, got {array.dtype}")
    with np.errstate(over="ignore"):
        data = np.ascontiguousarray(array, dtype=target)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{name}: NaN or infinite value (or one that overflows {dtype})")
    return data


# --- reading ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """Where a stream lies: ``nbytes`` bytes at ``offset``, of which the first ``nbits`` bits count."""

    offset: int
    nbytes: int
    nbits: int


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's table entry, as checked when the file was opened (nothing decoded yet)."""

    name: str
    shape: tuple[int, ...]
    encoding: str  # raw | sparse+codebook | sparse+affine
    dtype: str = ""  # raw: float32 | float16 | int64
    code_coder: str = ""  # sparse: huffman | none
    gap_coder: str = ""
    gap_bits: int = 0
    code_bits: int = 0
    n_kept: int = 0
    n_gap_symbols: int = 0
    table_bytes: int = 0
    header_bytes: int = 0
    payload_bytes: int = 0
    total_bytes: int = 0
    offset: int = 0  # where the entry starts in the file
    streams: tuple[Stream, ...] = ()  # raw: (data,); sparse: (codes, gaps)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class _Entry:
    info: TensorInfo
    index: int
    crc: int
    table: Codebook | Affine | None = None
    code_lengths: np.ndarray | None = None
    gap_lengths: np.ndarray | None = None


@dataclass(frozen=True)
class Field:
    """Where the reader found one field (or group of fields) of the table: for tools such as the fuzzer.

    ``fmt`` is the ``struct`` format of the values (``"QQQ"``), a numpy dtype for arrays
    (``"<f4"``), or ``"bytes"``.
    """

    name: str
    offset: int
    size: int
    fmt: str


class _Cursor:
    """Bounds-checked little-endian reads over ``data[pos:end]``; errors name the field and the offset."""

    def __init__(self, data: memoryview, pos: int, end: int, trace: list[Field] | None = None):
        self.data, self.pos, self.end, self.trace = data, pos, end, trace

    def take(self, n: int, field: str, fmt: str = "bytes") -> memoryview:
        if n > self.end - self.pos:
            raise FormatError(field, self.pos, f"needs {n} bytes, {self.end - self.pos} remain in the table")
        if self.trace is not None:
            self.trace.append(Field(field, self.pos, n, fmt))
        view = self.data[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, field: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, field, fmt))

    def one(self, fmt: str, field: str) -> int:
        return self.unpack(fmt, field)[0]

    def array(self, dtype: str, count: int, field: str) -> np.ndarray:
        item = np.dtype(dtype).itemsize
        if count > (self.end - self.pos) // item:  # before allocating
            raise FormatError(field, self.pos, f"{count} values do not fit in the {self.end - self.pos} bytes left")
        return np.frombuffer(self.take(count * item, field, dtype), dtype=dtype).copy()


def element_budget(file_size: int) -> int:
    """How many elements the tensors of a file of ``file_size`` bytes may add up to, by default.

    ``max(2**24, 4096 * file_size)``: decoding such a file allocates at most 16 KiB of
    float32 per byte of file (64 MiB for any small file), whatever the file declares.
    """
    return max(MIN_ELEMENT_BUDGET, ELEMENTS_PER_BYTE * int(file_size))


class Reader:
    """A ``.dcz`` file, opened and checked: header, footer, every checksum and every table entry.

    Opening checks everything that can be checked without decoding (the table CRC and
    every payload CRC included) and the memory the file would make a decoder allocate;
    tensors are then decoded on demand.

    Args:
        source: a path, or the file's bytes.
        allow_elements: the file's tensors may add up to (dense, all together)
            ``max(element_budget(file size), allow_elements)`` elements. A caller that knows
            what to expect raises it: loading into a model allows the model's own size.
        trace: a list that receives a ``Field`` for every table field read, in order.

    Raises:
        FormatError: the file cannot be read, is not a well-formed ``.dcz`` file of a known
            version, or declares more elements than allowed. The reader raises
            nothing else on any input.
    """

    def __init__(self, source: str | os.PathLike | bytes | bytearray | memoryview, *,
                 allow_elements: int = 0, trace: list[Field] | None = None):
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise FormatError("file", None, f"cannot read {os.fspath(source)}: {e.strerror}") from None
        self._data = memoryview(data)
        self.size = len(data)
        self.max_elements = max(element_budget(self.size), int(allow_elements))
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._trace = trace
        self._elements = 0  # declared so far, against max_elements
        self._parse()
        for entry in self._entries.values():  # checksums before anything is decoded
            self._check_crc(entry)

    @property
    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        """Shape, encoding and sizes of tensor ``name`` (``KeyError`` if there is none)."""
        return self._entries[name].info

    def record(self, name: str) -> TensorRecord:
        """Decode the sparse tensor ``name`` to its record (positions, codes, table).

        Raises:
            FormatError: the tensor is raw, or its payload is damaged or inconsistent.
        """
        return self.records([name])[name]

    def records(self, names: Iterable[str]) -> dict[str, TensorRecord]:
        """Decode sparse tensors to their records, all their Huffman streams in one batch
        (``huffman.decode_many``: many streams decode much faster together than one by one).

        Raises:
            FormatError: a tensor is raw, or its payload is damaged or inconsistent.
        """
        batch: list[huffman.Coded] = []
        streams: dict[str, list[int | np.ndarray]] = {}  # per tensor: codes, gap symbols (or their place in batch)
        for name in names:
            e = self._entries[name]
            i = e.info
            f = self._field(name)
            if i.encoding == "raw":
                raise FormatError(f, i.offset, "is stored raw: it has no record")
            streams[name] = []
            for field, s, coder, lengths, count, width in (
                    ("code_stream", i.streams[0], i.code_coder, e.code_lengths, i.n_kept, i.code_bits),
                    ("gap_stream", i.streams[1], i.gap_coder, e.gap_lengths, i.n_gap_symbols, i.gap_bits)):
                if coder == "huffman":
                    streams[name].append(len(batch))
                    batch.append(huffman.Coded(lengths, self._payload(s, f"{f}.{field}"), s.nbits, count,
                                               f"{f}.{field}", s.offset))
                else:
                    streams[name].append(huffman.unpack_fixed(self._bits(s, f"{f}.{field}"), width, count,
                                                              f"{f}.{field}", s.offset))
        decoded = huffman.decode_many(batch)
        return {name: self._record(name, *(decoded[p] if isinstance(p, int) else p for p in parts))
                for name, parts in streams.items()}

    def _record(self, name: str, codes: np.ndarray, symbols: np.ndarray) -> TensorRecord:
        """The record of sparse tensor ``name`` from its decoded codes and gap symbols, checked."""
        e = self._entries[name]
        i = e.info
        f = self._field(name)
        cs, gs = i.streams
        if codes.size and codes.max() >= e.table.size:
            raise FormatError(f"{f}.code_stream", cs.offset, f"code {int(codes.max())} is outside the table")
        positions = gaps.from_gaps(symbols, i.gap_bits, i.numel, f"{f}.gap_stream", gs.offset)
        if positions.size != i.n_kept:
            raise FormatError(f"{f}.gap_stream", gs.offset, f"{positions.size} positions for {i.n_kept} codes")
        record = TensorRecord(i.shape, positions, codes, e.table)
        # a codebook was checked finite when the file was opened; a huge scale can overflow float32
        if positions.size and isinstance(e.table, Affine) and not np.all(np.isfinite(_values(record))):
            raise FormatError(f"{f}.scale", i.offset, "decodes to NaN or infinite values")
        return record

    def array(self, name: str) -> np.ndarray:
        """Decode tensor ``name``: sparse tensors dense float32, raw ones float32 (float16 widened) or int64.

        Raises:
            FormatError: its payload is damaged or inconsistent.
        """
        return self.arrays([name])[name]

    def arrays(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Decode tensors (default: all, in file order) as ``array`` does, the sparse ones in one batch.

        Raises:
            FormatError: a payload is damaged or inconsistent.
        """
        names = self.names if names is None else list(names)
        records = self.records([n for n in names if self._entries[n].info.encoding != "raw"])
        out = {}
        for name in names:
            i = self._entries[name].info
            if name in records:
                # to_dense of an empty per-channel tensor would divide by a zero first dimension
                out[name] = records[name].to_dense() if i.numel else np.zeros(i.shape, dtype=np.float32)
            else:
                out[name] = self._raw(name)
        return out

    def _raw(self, name: str) -> np.ndarray:
        e = self._entries[name]
        i = e.info
        s = i.streams[0]
        out = np.frombuffer(self._data[s.offset:s.offset + s.nbytes], dtype=DTYPES[DTYPE_IDS[i.dtype]][1])
        if out.dtype.kind == "f":
            if not np.all(np.isfinite(out)):
                raise FormatError(f"{self._field(name)}.data", s.offset, "NaN or infinite value")
            return out.astype(np.float32).reshape(i.shape)
        return out.astype(np.int64).reshape(i.shape)

    # --- the table, checked when the file is opened ---

    def _parse(self) -> None:
        size, data = self.size, self._data
        if size < HEADER.size + FOOTER.size:
            raise FormatError("file", 0, f"{size} bytes: truncated, or not a .dcz file")
        magic, version, flags = HEADER.unpack(data[:HEADER.size])
        if magic != MAGIC:
            raise FormatError("header.magic", 0, "not a .dcz file")
        if version != VERSION:
            raise FormatError("header.version", 8, f"unknown format version {version} (this reader knows {VERSION})")
        if flags != 0:
            raise FormatError("header.flags", 10, f"unknown flags {flags:#06x}")
        footer_at = size - FOOTER.size
        table_at, table_len, table_crc, end_magic = FOOTER.unpack(data[footer_at:])
        if end_magic != MAGIC:
            raise FormatError("footer.magic", footer_at + 20, "missing: the file is truncated or damaged")
        if not HEADER.size <= table_at <= footer_at:
            raise FormatError("footer.table_offset", footer_at, f"table offset {table_at} is outside "
                              f"[{HEADER.size}, {footer_at}]")
        if table_len != footer_at - table_at:
            raise FormatError("footer.table_length", footer_at + 8,
                              f"table of {table_len} bytes at {table_at} does not end at the footer ({footer_at})")
        if zlib.crc32(data[table_at:footer_at]) != table_crc:
            raise FormatError("footer.table_crc", footer_at + 16, "table checksum mismatch: the file is damaged")
        self._payload_end = table_at
        self._next_stream = HEADER.size  # streams tile the payload, in table order
        cur = _Cursor(data, table_at, footer_at, self._trace)
        count = cur.one("I", "table.tensor_count")
        self.metadata = self._metadata(cur)
        if count > (footer_at - cur.pos) // MIN_ENTRY:
            raise FormatError("table.tensor_count", table_at, f"{count} tensors cannot fit in the table")
        for i in range(count):
            entry = self._entry(cur, i)
            if entry.info.name in self._entries:
                raise FormatError(f"tensor[{i}].name", entry.info.offset, f"repeated name {entry.info.name!r}")
            self._entries[entry.info.name] = entry
        if cur.pos != footer_at:
            raise FormatError("table", cur.pos, f"{footer_at - cur.pos} unexpected bytes after the last tensor")
        if self._next_stream != table_at:
            raise FormatError("footer.table_offset", footer_at,
                              f"payload bytes {self._next_stream}..{table_at} belong to no stream")

    def _metadata(self, cur: _Cursor) -> dict[str, str]:
        at = cur.pos
        n = cur.one("I", "table.metadata_length")
        if n > MAX_META:
            raise FormatError("table.metadata_length", at, f"{n} bytes of metadata (at most {MAX_META})")
        raw = bytes(cur.take(n, "table.metadata"))
        if not n:
            return {}

        def pairs(items: list[tuple]) -> dict:
            keys = [k for k, _ in items]
            if len(set(keys)) != len(keys) or not all(isinstance(v, str) for _, v in items):
                raise ValueError("not an object of unique strings")
            return dict(items)

        try:
            meta = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            meta = None
        if not isinstance(meta, dict):
            raise FormatError("table.metadata", at + 4, "not a UTF-8 JSON object of unique string keys and values")
        return meta

    def _entry(self, cur: _Cursor, i: int) -> _Entry:
        at = cur.pos
        f = f"tensor[{i}]"
        name_len = cur.one("H", f"{f}.name_length")
        if not 1 <= name_len <= MAX_NAME:
            raise FormatError(f"{f}.name_length", at, f"{name_len} bytes (1..{MAX_NAME} allowed)")
        try:
            name = bytes(cur.take(name_len, f"{f}.name")).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{f}.name", at + 2, "not valid UTF-8") from None
        f = f"tensor[{i}] {name!r}"
        encoding = cur.one("B", f"{f}.encoding")
        if encoding not in ENCODINGS:
            raise FormatError(f"{f}.encoding", cur.pos - 1, f"unknown encoding {encoding}")
        ndim = cur.one("B", f"{f}.ndim")
        if ndim > MAX_NDIM:
            raise FormatError(f"{f}.ndim", cur.pos - 1, f"{ndim} dimensions (at most {MAX_NDIM})")
        shape_at = cur.pos
        shape = cur.unpack(f"{ndim}Q", f"{f}.shape")
        numel = 1
        for d in shape:  # Python ints: no overflow; a zero dimension makes 0 whatever follows
            numel *= d
        if numel > MAX_NUMEL or any(d > MAX_NUMEL for d in shape):  # (0, 2**64-1): no elements, still no array
            raise FormatError(f"{f}.shape", shape_at, f"{shape} has more than {MAX_NUMEL} elements, or a dimension "
                              f"past {MAX_NUMEL}")
        self._elements += numel
        if self._elements > self.max_elements:
            raise FormatError(f"{f}.shape", shape_at, f"{shape} brings the file to {self._elements} elements, more "
                              f"than the {self.max_elements} allowed for {self.size} bytes (a decompression bomb?); "
                              "if it is expected, allow it (allow_elements=, or decode --allow-elements)")
        crc = cur.one("I", f"{f}.payload_crc")
        if encoding == RAW:
            return self._raw_entry(cur, i, f, at, name, shape, numel, crc)
        return self._sparse_entry(cur, i, f, at, name, encoding, shape, numel, crc)

    def _raw_entry(self, cur: _Cursor, i: int, f: str, at: int, name: str, shape: tuple, numel: int,
                   crc: int) -> _Entry:
        dtype = cur.one("B", f"{f}.dtype")
        if dtype not in DTYPES:
            raise FormatError(f"{f}.dtype", cur.pos - 1, f"unknown dtype {dtype}")
        stream_at = cur.pos
        s = self._stream(cur, f"{f}.data")
        dtype_name, dt = DTYPES[dtype]
        if s.nbytes != numel * dt.itemsize:
            raise FormatError(f"{f}.data.length", stream_at + 8,
                              f"{s.nbytes} bytes for {numel} values of {dt.itemsize} bytes (shape {shape})")
        if s.nbits != 8 * s.nbytes:
            raise FormatError(f"{f}.data.bits", stream_at + 16, f"{s.nbits} bits in {s.nbytes} bytes")
        header = cur.pos - at
        info = TensorInfo(name, shape, "raw", dtype=dtype_name, header_bytes=header, payload_bytes=s.nbytes,
                          total_bytes=header + s.nbytes, offset=at, streams=(s,))
        return _Entry(info, i, crc)

    def _sparse_entry(self, cur: _Cursor, i: int, f: str, at: int, name: str, encoding: int, shape: tuple,
                      numel: int, crc: int) -> _Entry:
        head_at = cur.pos
        code_coder, gap_coder, width, n_kept, n_gap = cur.unpack("BBBQQ", f"{f}.coders")
        for k, coder in enumerate((code_coder, gap_coder)):
            if coder not in CODER_NAMES:
                raise FormatError(f"{f}.{('code', 'gap')[k]}_coder", head_at + k, f"unknown coder {coder}")
        if width not in gaps.WIDTHS:
            raise FormatError(f"{f}.gap_bits", head_at + 2, f"gap width {width} (1..16 allowed)")
        if n_kept > numel or n_kept > n_gap:
            raise FormatError(f"{f}.n_kept", head_at + 3,
                              f"{n_kept} kept weights in {numel} elements with {n_gap} gap symbols")
        if numel > (n_gap + 1) * gaps.escape(width):
            raise FormatError(f"{f}.n_gap_symbols", head_at + 11,
                              f"{n_gap} gap symbols of width {width} cannot span {numel} elements")
        table_at = cur.pos
        table = self._table(cur, f, encoding, shape)
        code_lengths = self._lengths(cur, f"{f}.code_lengths", code_coder, table.size)
        gap_lengths = self._lengths(cur, f"{f}.gap_lengths", gap_coder, 1 << width)
        table_size = cur.pos - table_at
        code_bits = huffman.fixed_width(table.size)
        streams = []
        for field, coder, count, bits, lengths in (("code_stream", code_coder, n_kept, code_bits, code_lengths),
                                                   ("gap_stream", gap_coder, n_gap, width, gap_lengths)):
            stream_at = cur.pos
            s = self._stream(cur, f"{f}.{field}")
            if s.nbytes != (s.nbits + 7) // 8:
                raise FormatError(f"{f}.{field}.bits", stream_at + 16, f"{s.nbits} bits in {s.nbytes} bytes")
            if coder == FIXED and s.nbits != count * bits:
                raise FormatError(f"{f}.{field}.bits", stream_at + 16,
                                  f"{s.nbits} bits for {count} values of {bits} bits")
            if coder == HUFFMAN and (count > s.nbits or (count == 0) != (s.nbits == 0)):
                raise FormatError(f"{f}.{field}.bits", stream_at + 16, f"{s.nbits} bits for {count} symbols")
            if coder == HUFFMAN and count and not lengths.any():
                raise FormatError(f"{f}.{field[:-7]}_lengths", table_at, "no code lengths for a non-empty stream")
            streams.append(s)
        header = cur.pos - at
        payload = streams[0].nbytes + streams[1].nbytes
        info = TensorInfo(name, shape, ENCODINGS[encoding], code_coder=CODER_NAMES[code_coder],
                          gap_coder=CODER_NAMES[gap_coder], gap_bits=width, code_bits=code_bits, n_kept=n_kept,
                          n_gap_symbols=n_gap, table_bytes=table_size, header_bytes=header, payload_bytes=payload,
                          total_bytes=header + payload, offset=at, streams=tuple(streams))
        return _Entry(info, i, crc, table, code_lengths, gap_lengths)

    def _table(self, cur: _Cursor, f: str, encoding: int, shape: tuple) -> Codebook | Affine:
        at = cur.pos
        if encoding == SPARSE_CODEBOOK:
            k = cur.one("I", f"{f}.codebook_size")
            if not 1 <= k <= MAX_TABLE:
                raise FormatError(f"{f}.codebook_size", at, f"{k} entries (1..{MAX_TABLE} allowed)")
            values = cur.array("<f4", k, f"{f}.codebook")
            if not np.all(np.isfinite(values)):
                bad = int(np.flatnonzero(~np.isfinite(values))[0])
                raise FormatError(f"{f}.codebook", at + 4 + 4 * bad, f"entry {bad} is NaN or infinite")
            return Codebook(values)
        per_channel, levels, channels = cur.unpack("BII", f"{f}.affine")
        if per_channel > 1:
            raise FormatError(f"{f}.per_channel", at, f"flag {per_channel} (0 or 1 allowed)")
        if not 1 <= levels <= MAX_TABLE:
            raise FormatError(f"{f}.levels", at + 1, f"{levels} levels (1..{MAX_TABLE} allowed)")
        if per_channel and not shape:
            raise FormatError(f"{f}.per_channel", at, "a per-channel grid needs at least one dimension")
        expected = shape[0] if per_channel else 1
        if channels != expected:
            raise FormatError(f"{f}.channels", at + 5, f"{channels} channels, expected {expected}")
        scale = cur.array("<f4", channels, f"{f}.scale")
        zero_point = cur.array("<i4", channels, f"{f}.zero_point")
        if not np.all(np.isfinite(scale)):
            bad = int(np.flatnonzero(~np.isfinite(scale))[0])
            raise FormatError(f"{f}.scale", at + 9 + 4 * bad, f"scale {bad} is NaN or infinite")
        if np.any(np.abs(zero_point.astype(np.int64)) > MAX_ZERO_POINT):
            raise FormatError(f"{f}.zero_point", at + 9 + 4 * channels, f"beyond +-{MAX_ZERO_POINT}")
        return Affine(scale, zero_point, levels, bool(per_channel))

    def _lengths(self, cur: _Cursor, field: str, coder: int, alphabet: int) -> np.ndarray:
        at = cur.pos
        n = cur.one("I", f"{field}.count")
        if coder == FIXED and n:
            raise FormatError(f"{field}.count", at, f"{n} code lengths for a fixed-width stream (0 expected)")
        if n > alphabet:
            raise FormatError(f"{field}.count", at, f"{n} code lengths for an alphabet of {alphabet}")
        lengths = cur.array("u1", n, field)
        huffman.check_lengths(lengths, field, at + 4)
        return lengths

    def _stream(self, cur: _Cursor, field: str) -> Stream:
        at = cur.pos
        s = Stream(*cur.unpack("QQQ", field))
        if s.offset != self._next_stream:
            raise FormatError(f"{field}.offset", at, f"stream at {s.offset}, expected {self._next_stream} "
                              "(streams lie back to back in table order)")
        if s.nbytes > self._payload_end - s.offset:
            raise FormatError(f"{field}.length", at + 8, f"bytes {s.offset}..{s.offset + s.nbytes} run past "
                              f"the payload (it ends at {self._payload_end})")
        self._next_stream = s.offset + s.nbytes
        return s

    # --- payloads ---

    def _field(self, name: str) -> str:
        return f"tensor[{self._entries[name].index}] {name!r}"

    def _check_crc(self, e: _Entry) -> None:
        first, last = e.info.streams[0], e.info.streams[-1]
        if zlib.crc32(self._data[first.offset:last.offset + last.nbytes]) != e.crc:
            raise FormatError(f"{self._field(e.info.name)}.payload_crc", first.offset,
                              "payload checksum mismatch: the file is damaged")

    def _payload(self, s: Stream, field: str) -> bytes:
        """A stream's bytes, its padding bits checked to be zero."""
        data = bytes(self._data[s.offset:s.offset + s.nbytes])
        if s.nbits % 8 and data[-1] & (0xFF >> s.nbits % 8):
            raise FormatError(field, s.offset + s.nbytes - 1, "padding bits after the stream are not zero")
        return data

    def _bits(self, s: Stream, field: str) -> bitarray:
        bits = bitarray(endian="big")
        bits.frombytes(self._payload(s, field))
        del bits[s.nbits:]
        return bits


def read(source: str | os.PathLike | bytes, *, allow_elements: int = 0) -> dict[str, np.ndarray]:
    """Every tensor of a ``.dcz`` file, decoded (see ``Reader.array``).

    Args:
        allow_elements: as for ``Reader``.

    Raises:
        FormatError: the file is damaged, hostile or not a ``.dcz`` file.
    """
    return Reader(source, allow_elements=allow_elements).arrays()
