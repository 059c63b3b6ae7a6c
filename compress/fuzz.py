"""python -m compress.fuzz --cases N: hostile and damaged ``.dcz`` files against the reader.

Each case takes a real file (a built-in corpus written by the reference writer, plus
any ``--file``), damages it and decodes every tensor. A case passes when it ends in

- ``refused``: a ``FormatError``, or
- ``decoded``: every tensor decodes, and to exactly what an independent decoder
  written from docs/FORMAT.md alone (``spec_decode``) makes of the same bytes,

and in either case within the time cap and allocating at most ``alloc_bound(file
size)`` bytes (measured with tracemalloc, which sees every numpy buffer). Anything
else fails: ``wrong`` (decoded to something else), ``error`` (another exception),
``hang``, ``memory``, or ``crash`` (the worker process died).

Damage: bit flips, bytes set to extremes, truncations, insertions, splices of two
files, and aimed edits of the table's fields (the reader's own field trace says
where each lies): counts and lengths set to huge values, shapes whose product
passes 2**63, NaN / Inf in tables. Half the cases recompute the checksums after
the damage, so that the checks behind them are reached too.

Cases are a pure function of ``--seed`` and their index: a failure is replayed by
its number. By default each case runs in a worker process with an address-space
limit, so that a crash or a hang is caught and counted rather than ending the run.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import json
import math
import multiprocessing
import os
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import tracemalloc
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from compress.codec import container
from compress.errors import FormatError
from compress.record import Affine, Codebook, TensorRecord

PASSING = ("refused", "decoded")
FAILING = ("wrong", "error", "hang", "memory", "crash")
MUTATORS = ("flip", "extreme_bytes", "truncate", "insert", "splice", "field", "shape_overflow", "payload")


def alloc_bound(file_size: int) -> int:
    """Bytes the reader may allocate to decode every tensor of a file of ``file_size`` bytes.

    The dense float32 tensors the file may declare (``container.element_budget``), plus
    640 bytes per byte of file for the decoding itself: a stream of ``8 * size`` bits
    holds at most that many symbols, each held in a few int64 arrays along the way.
    """
    return 4 * container.element_budget(file_size) + 640 * file_size + (1 << 20)


# --- the corpus -----------------------------------------------------------------------------------------


def corpus() -> list[bytes]:
    """Real files from the reference writer, covering every encoding, coder and table kind."""
    rng = np.random.default_rng(0)
    scratch = tempfile.TemporaryDirectory()

    def build(add) -> bytes:
        path = Path(scratch.name) / "seed.dcz"
        with container.Writer(path, metadata={"model": "fuzz", "folded_bn": "0"}) as w:
            add(w)
        return path.read_bytes()

    def layer(w, name, shape, density, bits, **kw):
        numel = math.prod(shape)
        positions = np.flatnonzero(rng.random(numel) < density)
        table = Codebook(np.sort(rng.normal(size=2 ** bits)).astype(np.float32))
        w.add(name, TensorRecord(shape, positions, rng.integers(0, 2 ** bits, positions.size), table), **kw)

    def model(w):  # a small pruned and shared MLP, as the pipeline writes it
        layer(w, "fc1.weight", (48, 64), 0.1, 4)
        w.add_raw("fc1.bias", rng.normal(size=48))
        layer(w, "fc2.weight", (10, 48), 0.3, 5, gap_bits=5)
        w.add_raw("fc2.bias", rng.normal(size=10))

    def affine(w):  # linear quantization, per channel, fixed-width coder; other raw dtypes
        shape = (8, 3, 3, 3)
        positions = np.flatnonzero(rng.random(216) < 0.5)
        table = Affine(rng.random(8).astype(np.float32) + 0.01, rng.integers(-3, 20, 8), 16, per_channel=True)
        w.add("conv.weight", TensorRecord(shape, positions, rng.integers(0, 16, positions.size), table), coder="none")
        w.add_raw("bn.running_mean", rng.normal(size=8), dtype="float16")
        w.add_raw("bn.num_batches_tracked", np.array(7), dtype="int64")
        w.add("empty", TensorRecord((0, 5), [], [], Affine([0.5], [0], 4)))

    def sparse_wide(w):  # long zero runs: wide gaps and escapes
        positions = np.sort(rng.choice(200_000, 40, replace=False))
        w.add("wide", TensorRecord((200_000,), positions, rng.integers(0, 3, 40), Codebook([-1.0, 0.5, 2.0])))
        w.add("scalar", TensorRecord((), [0], [0], Codebook([3.0])), gap_bits=1)

    def example(w):  # the worked example of docs/FORMAT.md
        w.add("w", TensorRecord((2, 4), [1, 2, 7], [0, 1, 1], Codebook([-0.5, 0.25])), gap_bits=2)

    def bomb(w):  # well formed, but 70 KB that declare 2**31 elements (8 GiB of float32): over the budget
        w.add("bomb", TensorRecord((1 << 31,), [0], [0], Codebook([1.0])), gap_bits=16)

    with scratch:
        return [build(add) for add in (model, affine, sparse_wide, example, bomb)]


@dataclass(frozen=True)
class Seed:
    """A corpus file and where its fields lie (from the reader's own trace)."""

    data: bytes
    fields: tuple[container.Field, ...]
    crcs: tuple[tuple[int, int, int], ...]  # per tensor: (payload_crc offset, payload start, payload end)


def seed_of(data: bytes) -> Seed:
    """Open a valid file with the field trace on; the header and footer fields are added by hand."""
    trace: list[container.Field] = []
    reader = container.Reader(data, trace=trace, allow_elements=1 << 32)
    crc_at = [f.offset for f in trace if f.name.endswith(".payload_crc")]
    crcs = []
    for at, name in zip(crc_at, reader.names):
        streams = reader.info(name).streams
        crcs.append((at, streams[0].offset, streams[-1].offset + streams[-1].nbytes))
    size = len(data)
    frame = [container.Field("header.version", 8, 2, "H"), container.Field("header.flags", 10, 2, "H"),
             container.Field("footer", size - 28, 20, "QQI")]
    return Seed(data, tuple(frame + trace), tuple(crcs))


# --- damage ---------------------------------------------------------------------------------------------


INTERESTING = {1: [0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF], 2: [0, 1, 0x7FFF, 0x8000, 0xFFFF, 1024, 1025],
               4: [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 16, (1 << 16) + 1, 1 << 24, (1 << 24) + 1],
               8: [0, 1, 1 << 31, 1 << 32, (1 << 32) + 1, 1 << 48, 1 << 60, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]}
FLOATS = [float("nan"), float("inf"), float("-inf"), -0.0, 3.4e38, 1e-45, 65504.0]


def make_case(seeds: list[Seed], seed: int, index: int) -> tuple[str, bytes]:
    """Case ``index`` of the campaign ``seed``: ``(what was done, the damaged bytes)``."""
    rng = np.random.default_rng([seed, index])
    base = seeds[int(rng.integers(len(seeds)))]
    data = bytearray(base.data)
    done = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        name = MUTATORS[int(rng.integers(len(MUTATORS)))]
        done.append(name + MUTATE[name](rng, data, base, seeds))
    if data and rng.random() < 0.5:
        fix_checksums(data, base)
        done.append("crc-fixed")
    return " + ".join(done), bytes(data)


def _flip(rng, data, base, seeds) -> str:
    n = int(rng.integers(1, 9))
    for _ in range(n):
        if data:
            bit = int(rng.integers(8 * len(data)))
            data[bit // 8] ^= 1 << (bit % 8)
    return f"({n})"


def _extreme_bytes(rng, data, base, seeds) -> str:
    if data:
        at = int(rng.integers(len(data)))
        run = data[at:at + int(rng.integers(1, 9))]
        data[at:at + len(run)] = bytes([int(rng.choice([0, 0xFF, 0x7F, 0x80]))]) * len(run)
        return f"@{at}"
    return ""


def _truncate(rng, data, base, seeds) -> str:
    keep = int(rng.integers(len(data) + 1)) if rng.random() < 0.7 else len(data) - int(rng.integers(1, 40))
    del data[max(0, keep):]
    return f"->{len(data)}"


def _insert(rng, data, base, seeds) -> str:
    at = int(rng.integers(len(data) + 1))
    chunk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    data[at:at] = chunk if rng.random() < 0.5 else data[at:at + len(chunk)]
    return f"@{at}"


def _splice(rng, data, base, seeds) -> str:
    other = seeds[int(rng.integers(len(seeds)))].data
    a, b = int(rng.integers(len(data) + 1)), int(rng.integers(len(other) + 1))
    data[a:] = other[b:]
    return f"@{a}/{b}"


def _field(rng, data, base, seeds) -> str:
    f = base.fields[int(rng.integers(len(base.fields)))]
    if f.fmt == "bytes" or f.offset + f.size > len(data):
        return f"({f.name}: skipped)"
    if f.fmt[0] in "<u":  # an array: one element
        dt = np.dtype(f.fmt)
        at = f.offset + dt.itemsize * int(rng.integers(max(1, f.size // dt.itemsize)))
        if at + dt.itemsize > f.offset + f.size:
            return f"({f.name}: empty)"
        if dt.kind == "f":
            value = FLOATS[int(rng.integers(len(FLOATS)))]
            data[at:at + dt.itemsize] = np.array([value], dtype=dt).tobytes()
        else:
            value = _pick(rng, dt.itemsize, None)
            data[at:at + dt.itemsize] = value.to_bytes(dt.itemsize, "little")
        return f"({f.name}[{(at - f.offset) // dt.itemsize}]={value})"
    items = _items(f.fmt)
    if not items:  # a scalar's shape: no dims
        return f"({f.name}: empty)"
    k = int(rng.integers(len(items)))
    at, size = f.offset + items[k][0], items[k][1]
    old = int.from_bytes(data[at:at + size], "little")
    value = _pick(rng, size, old)
    data[at:at + size] = value.to_bytes(size, "little")
    return f"({f.name}#{k}={value})"


def _shape_overflow(rng, data, base, seeds) -> str:
    shapes = [f for f in base.fields if f.name.endswith(".shape") and f.size >= 8]
    if not shapes:
        return "(none)"
    f = shapes[int(rng.integers(len(shapes)))]
    n = f.size // 8
    dims = [[1 << 32] * n, [(1 << 63) - 1] + [2] * (n - 1), [(1 << 64) - 1] * n,
            [int(rng.integers(1, 1 << 22)) for _ in range(n)]][int(rng.integers(4))]
    data[f.offset:f.offset + f.size] = struct.pack(f"<{n}Q", *dims)
    return f"({f.name}={dims})"


def _payload(rng, data, base, seeds) -> str:
    if not base.crcs:
        return "(none)"
    _, start, end = base.crcs[int(rng.integers(len(base.crcs)))]
    if end <= start or end > len(data):
        return "(empty)"
    at = int(rng.integers(start, end))
    data[at] ^= 1 << int(rng.integers(8))
    return f"@{at}"


MUTATE = {"flip": _flip, "extreme_bytes": _extreme_bytes, "truncate": _truncate, "insert": _insert,
          "splice": _splice, "field": _field, "shape_overflow": _shape_overflow, "payload": _payload}


def _items(fmt: str) -> list[tuple[int, int]]:
    """``(offset, size)`` of each value of a little-endian struct format such as ``BBBQQ`` or ``3Q``."""
    out, at, count = [], 0, ""
    for ch in fmt:
        if ch.isdigit():
            count += ch
            continue
        size = struct.calcsize("<" + ch)
        for _ in range(int(count or 1)):
            out.append((at, size))
            at += size
        count = ""
    return out


def _pick(rng, size: int, old: int | None) -> int:
    choices = list(INTERESTING[size])
    if old is not None:
        choices += [max(0, old - 1), old + 1, 2 * old, old >> 1]
    return int(choices[int(rng.integers(len(choices)))]) % (1 << (8 * size))


def fix_checksums(data: bytearray, base: Seed) -> None:
    """Recompute the payload CRCs where ``base`` had them, then the table CRC the footer points at."""
    for at, start, end in base.crcs:
        if at + 4 <= len(data) and end <= len(data):
            data[at:at + 4] = struct.pack("<I", zlib.crc32(data[start:end]))
    if len(data) >= 28:
        footer = len(data) - 28
        table_at = struct.unpack_from("<Q", data, footer)[0]
        if table_at <= footer:
            struct.pack_into("<I", data, footer + 16, zlib.crc32(data[table_at:footer]))


# --- an independent decoder, from docs/FORMAT.md alone ----------------------------------------------------


def spec_decode(data: bytes) -> dict[str, np.ndarray]:
    """Decode a ``.dcz`` file by the letter of docs/FORMAT.md, in plain Python (slow; for small files).

    It shares no code with ``compress.codec`` and checks little: run it only on files
    the reader accepted, to check what the reader made of them.
    """
    def u(fmt: str, at: int) -> tuple:
        return struct.unpack_from("<" + fmt, data, at)

    pos = u("Q", len(data) - 28)[0]
    count, meta_len = u("II", pos)
    pos += 8 + meta_len
    out = {}
    for _ in range(count):
        (n,) = u("H", pos)
        name = data[pos + 2:pos + 2 + n].decode("utf-8")
        encoding, ndim = u("BB", pos + 2 + n)
        pos += 4 + n
        shape = u(f"{ndim}Q", pos)
        pos += 8 * ndim + 4  # dims, payload CRC
        numel = math.prod(shape)
        if encoding == 0:
            dtype, (offset, nbytes, _) = data[pos], u("QQQ", pos + 1)
            pos += 25
            raw = np.frombuffer(data[offset:offset + nbytes], ["<f4", "<f2", "<i8"][dtype])
            out[name] = raw.astype(np.int64 if dtype == 2 else np.float32).reshape(shape)
            continue
        code_coder, gap_coder, width, n_kept, n_gap = u("BBBQQ", pos)
        pos += 19
        if encoding == 1:
            (k,) = u("I", pos)
            values = u(f"{k}f", pos + 4)
            pos += 4 + 4 * k

            def value(q: int, p: int) -> np.float32:
                return np.float32(values[q])
        else:
            per_channel, k, channels = u("BII", pos)
            scale, zero = u(f"{channels}f", pos + 9), u(f"{channels}i", pos + 9 + 4 * channels)
            pos += 9 + 8 * channels
            row = numel // shape[0] if per_channel and shape[0] else 1

            def value(q: int, p: int) -> np.float32:
                c = p // row if per_channel else 0
                return np.float32(scale[c]) * np.float32(q - zero[c])
        lengths = []
        for _ in range(2):
            (n,) = u("I", pos)
            lengths.append(list(data[pos + 4:pos + 4 + n]))
            pos += 4 + n
        (c_off, c_bytes, c_bits), (g_off, g_bytes, g_bits) = u("QQQ", pos), u("QQQ", pos + 24)
        pos += 48
        codes = _symbols(data[c_off:c_off + c_bytes], c_bits, code_coder, lengths[0], n_kept,
                         max(1, (k - 1).bit_length()))
        gaps = _symbols(data[g_off:g_off + g_bytes], g_bits, gap_coder, lengths[1], n_gap, width)
        escape, cursor, kept = (1 << width) - 1, 0, iter(codes)
        dense = np.zeros(numel, np.float32)
        for g in gaps:
            if g == escape:
                cursor += escape
                continue
            dense[cursor + g] = value(next(kept), cursor + g)
            cursor += g + 1
        out[name] = dense.reshape(shape)
    return out


def _symbols(stream: bytes, nbits: int, coder: int, lengths: list[int], count: int, width: int) -> list[int]:
    bits = "".join(f"{b:08b}" for b in stream)[:nbits]
    if coder == 0:
        return [int(bits[i * width:(i + 1) * width], 2) for i in range(count)]
    words, code = {}, 0  # section 4: code words in order of (length, symbol)
    for length in range(1, max(lengths, default=0) + 1):
        for symbol, n in enumerate(lengths):
            if n == length:
                words[format(code, f"0{length}b")] = symbol
                code += 1
        code <<= 1
    out, word = [], ""
    for b in bits:
        word += b
        if word in words:
            out.append(words[word])
            word = ""
    return out


# --- running cases --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # refused | decoded | wrong | error | hang | memory | crash
    detail: str = ""  # the FormatError's field, or what went wrong
    peak: int = 0  # bytes allocated at the peak (tracemalloc)
    seconds: float = 0.0


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise ``CaseTimeout`` in this (main) thread after ``seconds``."""
    def expire(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(data: bytes, time_cap: float = 10.0) -> Outcome:
    """Open ``data`` and decode every tensor, within ``time_cap`` seconds; classify what happened."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    reader = arrays = None
    try:
        with deadline(time_cap):
            reader = container.Reader(data)
            arrays = {name: reader.array(name) for name in reader.names}
            for name in reader.names:
                if reader.info(name).encoding != "raw":
                    reader.record(name)
        outcome = Outcome("decoded")
    except FormatError as e:
        outcome = Outcome("refused", re.sub(r"^tensor\[\d+\]( '.*')?\.?", "", e.field) or "tensor")
    except CaseTimeout:
        outcome = Outcome("hang", f"over {time_cap} s")
    except MemoryError:
        outcome = Outcome("memory", "MemoryError")
    except Exception as e:  # noqa: BLE001 -- the point: anything else is a finding
        where = traceback.extract_tb(e.__traceback__)[-1]
        outcome = Outcome("error", f"{e.__class__.__name__}: {e} ({Path(where.filename).name}:{where.lineno})")
    outcome.seconds = time.perf_counter() - t0
    outcome.peak = tracemalloc.get_traced_memory()[1] - base
    del reader
    if started:
        tracemalloc.stop()
    if outcome.peak > alloc_bound(len(data)):
        return Outcome("memory", f"{outcome.peak} bytes allocated, bound {alloc_bound(len(data))}",
                       outcome.peak, outcome.seconds)
    if outcome.kind == "decoded":
        outcome.detail = differs(arrays, data)
        if outcome.detail:
            outcome.kind = "wrong"
    return outcome


def differs(arrays: dict[str, np.ndarray], data: bytes) -> str:
    """What differs between the reader's tensors and ``spec_decode``'s ('' when they agree bit for bit)."""
    try:
        expected = spec_decode(data)
    except Exception as e:  # noqa: BLE001 -- the reader accepted a file the spec cannot decode
        return f"the spec decoder fails: {e.__class__.__name__}: {e}"
    if list(expected) != list(arrays):
        return f"names {list(arrays)} vs {list(expected)}"
    for name, a in arrays.items():
        b = expected[name]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            return f"tensor {name!r} differs"
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            return f"tensor {name!r} holds NaN or Inf"
    return ""


# --- a campaign -----------------------------------------------------------------------------------------


@dataclass
class Summary:
    cases: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=collections.Counter)
    refused_fields: dict[str, int] = field(default_factory=collections.Counter)
    by_mutator: dict[str, dict[str, int]] = field(default_factory=dict)
    max_peak: int = 0
    max_peak_ratio: float = 0.0  # peak / alloc_bound
    slowest: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        # not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and so counts the pairs
        return {"cases": self.cases, "seconds": self.seconds, "outcomes": dict(self.outcomes),
                "refused_fields": dict(self.refused_fields),
                "by_mutator": {k: dict(v) for k, v in self.by_mutator.items()}, "max_peak": self.max_peak,
                "max_peak_ratio": self.max_peak_ratio, "slowest": self.slowest, "failures": self.failures,
                "ok": self.ok}

    def add(self, index: int, what: str, data: bytes, outcome: Outcome) -> None:
        self.cases += 1
        self.outcomes[outcome.kind] += 1
        if outcome.kind == "refused":
            self.refused_fields[outcome.detail] += 1
        for name in {w.split("(")[0].split("@")[0].split("->")[0] for w in what.split(" + ")}:
            self.by_mutator.setdefault(name, collections.Counter())[outcome.kind] += 1
        self.max_peak = max(self.max_peak, outcome.peak)
        self.max_peak_ratio = max(self.max_peak_ratio, outcome.peak / alloc_bound(len(data)))
        self.slowest = max(self.slowest, outcome.seconds)
        if outcome.kind in FAILING:
            self.failures.append({"case": index, "mutation": what, **asdict(outcome)})


def campaign(cases: int, *, seed: int = 0, files: list[bytes] = (), isolate: bool = True, time_cap: float = 10.0,
             memory_mb: int = 2048, save: Path | None = None, progress=None) -> Summary:
    """Run ``cases`` cases (``make_case(seed, i)`` for i in 0..cases-1).

    Args:
        files: more seed files (e.g. a model file from a run) beside the built-in corpus.
        isolate: run the cases in a worker process limited to ``memory_mb`` MiB of address space
            beyond its start, killed and replaced after a hang or a crash; else in this process.
        time_cap: seconds per case.
        save: folder for the bytes of failing cases (``case-<i>.dcz``).
        progress: called with ``(i, summary)`` now and then.

    Returns:
        The tally; ``summary.ok`` when every case ended in ``refused`` or ``decoded``.
    """
    seeds = [seed_of(d) for d in [*corpus(), *files]]
    summary = Summary()
    t0 = time.perf_counter()
    worker = _Worker(time_cap, memory_mb) if isolate else None
    tracing = not isolate and not tracemalloc.is_tracing()
    if tracing:
        tracemalloc.start()  # once: starting it per case would cost more than the cases
    try:
        for i in range(cases):
            what, data = make_case(seeds, seed, i)
            outcome = worker.run(data) if worker else run_case(data, time_cap)
            summary.add(i, what, data, outcome)
            if outcome.kind in FAILING and save is not None:
                save.mkdir(parents=True, exist_ok=True)
                (save / f"case-{i}.dcz").write_bytes(data)
            if progress and (i + 1) % 1000 == 0:
                progress(i + 1, summary)
    finally:
        if worker:
            worker.close()
        if tracing:
            tracemalloc.stop()
    summary.seconds = time.perf_counter() - t0
    return summary


class _Worker:
    """Runs cases in a child process; a case that hangs or kills the child is counted, and the child replaced."""

    def __init__(self, time_cap: float, memory_mb: int):
        self.time_cap, self.memory_mb = time_cap, memory_mb
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")  # the child needs nothing but what is already imported
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.time_cap, self.memory_mb), daemon=True)
        self.proc.start()
        child.close()

    def run(self, data: bytes) -> Outcome:
        self.conn.send_bytes(data)
        if self.conn.poll(self.time_cap + 5):
            try:
                return Outcome(**json.loads(self.conn.recv_bytes()))
            except EOFError:
                pass
        else:
            self.close()
            self._start()
            return Outcome("hang", f"no answer in {self.time_cap + 5} s: worker killed")
        self.proc.join(5)
        code = self.proc.exitcode
        self._start()
        return Outcome("crash", f"worker died ({'signal ' + str(-code) if code and code < 0 else f'exit {code}'})")

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _serve(conn, time_cap: float, memory_mb: int) -> None:
    faulthandler.disable()  # a crash is the parent's finding to report, not a traceback dump here
    _limit_memory(memory_mb)
    tracemalloc.start()
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(json.dumps(asdict(run_case(data, time_cap))).encode())


def _limit_memory(memory_mb: int) -> None:
    """Cap this process's address space at its current size plus ``memory_mb`` MiB (Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except OSError:
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + (memory_mb << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


# --- command line ---------------------------------------------------------------------------------------


def report(summary: Summary, seed: int) -> str:
    """The campaign as Markdown (outcomes, per damage kind, the reader's refusals, failures)."""
    lines = [f"{summary.cases:,} cases (seed {seed}) in {summary.seconds:.1f} s: "
             + ", ".join(f"{k} {summary.outcomes.get(k, 0):,}" for k in PASSING + FAILING),
             f"largest allocation {summary.max_peak / 2 ** 20:.1f} MiB ({100 * summary.max_peak_ratio:.2f} % of its "
             f"file's bound), slowest case {summary.slowest * 1000:.0f} ms", "",
             "| damage | cases | refused | decoded | failed |", "|---|---|---|---|---|"]
    for name in MUTATORS + ("crc-fixed",):
        c = summary.by_mutator.get(name, {})
        if c:
            lines.append(f"| {name} | {sum(c.values()):,} | {c.get('refused', 0):,} | {c.get('decoded', 0):,} | "
                         f"{sum(c.get(k, 0) for k in FAILING):,} |")
    top = sorted(summary.refused_fields.items(), key=lambda kv: -kv[1])[:12]
    lines += ["", "most frequent refusals (field: cases): " + ", ".join(f"{k}: {v:,}" for k, v in top)]
    for f in summary.failures[:20]:
        lines.append(f"FAILED case {f['case']} ({f['mutation']}): {f['kind']}: {f['detail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000, help="how many cases (default 10,000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: the same seed replays the same cases")
    p.add_argument("--file", type=Path, action="append", default=[], help="another seed file (repeatable)")
    p.add_argument("--time-cap", type=float, default=10.0, help="seconds per case (default 10)")
    p.add_argument("--memory-mb", type=int, default=2048, help="address space per worker beyond its start (MiB)")
    p.add_argument("--in-process", action="store_true", help="no worker process (faster; a crash ends the run)")
    p.add_argument("--save", type=Path, help="write failing cases here")
    p.add_argument("--json", type=Path, help="write the summary here as JSON")
    args = p.parse_args(argv)
    files = []
    for path in args.file:
        try:
            files.append(path.read_bytes())
            seed_of(files[-1])
        except (OSError, FormatError) as e:
            print(f"error: --file {path}: {e}", file=sys.stderr)
            return 2
    summary = campaign(args.cases, seed=args.seed, files=files, isolate=not args.in_process,
                       time_cap=args.time_cap, memory_mb=args.memory_mb, save=args.save,
                       progress=lambda i, s: print(f"{i:,} cases, {len(s.failures)} failed", file=sys.stderr))
    print(report(summary, args.seed))
    if args.json:
        args.json.write_text(json.dumps(summary.to_json() | {"seed": args.seed}, indent=2))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
