"""Benchmark ``codec``: the codec's size and speed against their limits (issue 5, section 3).

    python -m compress.bench codec [--size tiny|full]

Subjects: the models trained by the quick-start and the LeNet recipes, read from their run
folders (``artifacts/quickstart``, ``artifacts/lenet300_fashion``, ``artifacts/lenet5_fashion``:
``model.dcz`` and the prune stage's checkpoint; made by ``python -m compress.run`` and
``python -m compress.run recipes/<name>.toml``) when they exist, and a
synthetic ResNet-18-sized model (``_synthetic.resnet18``: 11.7 M weights, 90 % pruned,
5-bit sharing, from seed 0). At ``--size tiny`` a synthetic LeNet-300-100 stands in for
all of them, labelled so.

Measured, per subject:
- each coded stream's size against its empirical entropy bound ``n H(p)`` (order 0);
- the whole file against the sum of those bounds plus everything that is not a stream
  (headers, codebooks, Huffman length tables, raw tensors);
- the file against zlib (level 9), lzma (preset 9) and, when ``zstandard`` is installed,
  zstd (level 19) on the dense state of the pruned and of the pruned + shared model;
- k-means per weight tensor: Lloyd's time on its kept weights, and its sum of squared
  errors against the exact 1-D optimum on a sample of them.
On the largest subject: the whole file's decode time to float32 tensors against one plain
memory copy of the same bytes, measured in the same run; the Huffman streams alone decoded
by the lanes and by bitarray's sequential decoder; the encode time.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import lzma
import math
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress import bench
from compress.bench import _synthetic, _timing
from compress.codec import container, gaps, huffman
from compress.kmeans1d import Init, kmeans_1d, kmeans_1d_optimal, sse

# run folders under artifacts/ (trained models), and the command that makes each
RUNS = {"quickstart": "python -m compress.run",
        "lenet300_fashion": "python -m compress.run recipes/lenet300_fashion.toml",
        "lenet5_fashion": "python -m compress.run recipes/lenet5_fashion.toml"}
SAMPLE = {bench.Size.TINY: 2_000, bench.Size.FULL: 100_000}  # k-means values compared with the optimum
REPEAT = {bench.Size.TINY: 3, bench.Size.FULL: 15}  # timed runs, medians reported


@dataclass
class Subject:
    """A model and its ``.dcz`` file.

    Attributes:
        name: as printed in tables.
        source: where it comes from (a run folder, or "synthetic").
        path: its ``.dcz`` file.
        pruned: the dense state after pruning, before sharing (float32; int64 buffers).
        kept: per shared tensor, its kept weights before sharing (what k-means clustered).
        bits: per shared tensor, ``log2`` of its codebook size.
    """

    name: str
    source: str
    path: Path
    pruned: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]
    bits: dict[str, int]


def entropy_bits(symbols: np.ndarray) -> float:
    """The empirical (order-0) entropy bound of a stream: ``sum over symbols of count * log2(n / count)``."""
    counts = np.bincount(np.asarray(symbols, dtype=np.int64))
    counts = counts[counts > 0].astype(np.float64)
    return float(np.sum(counts * np.log2(counts.sum() / counts))) if counts.size else 0.0


def dense_bytes(state: dict[str, np.ndarray]) -> bytes:
    """A state as the bytes a general-purpose compressor would see: every tensor, float32 (int64 buffers)."""
    return b"".join(np.ascontiguousarray(v, dtype=np.float32 if v.dtype.kind == "f" else np.int64).tobytes()
                    for v in state.values())


def synthetic_subject(model: _synthetic.Model, folder: Path) -> Subject:
    path = folder / "synthetic.dcz"
    container.write(path, {k: model.records.get(k, v) for k, v in model.dense.items()})
    kept = {k: model.dense[k].reshape(-1)[r.positions] for k, r in model.records.items()}
    bits = {k: max(1, math.ceil(math.log2(r.table.size))) for k, r in model.records.items()}
    return Subject(model.name, "synthetic", path, model.pruned, kept, bits)


def run_subject(run: Path) -> Subject:
    """A subject from a pipeline run folder: its ``model.dcz`` and its prune stage's checkpoint.

    Raises:
        InputError: the folder lacks either.
    """
    import torch

    from compress.errors import InputError

    checkpoints = sorted(run.glob("stages/*-prune.pt"))
    if not (run / "model.dcz").is_file() or not checkpoints:
        raise InputError(f"{run}: needs model.dcz and stages/NN-prune.pt (run its recipe first)")
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["model"]
    pruned = {k: v.float().numpy() if v.is_floating_point() else v.to(torch.int64).numpy() for k, v in state.items()}
    reader = container.Reader(run / "model.dcz")
    records = reader.records([n for n in reader.names if reader.info(n).encoding != "raw"])
    kept = {k: pruned[k].reshape(-1)[r.positions] for k, r in records.items()}
    bits = {k: max(1, math.ceil(math.log2(r.table.size))) for k, r in records.items()}
    for path in run.glob("stages/*-quantize.pt"):  # the bits asked for (k-means may have dropped empty clusters)
        entry = json.loads(torch.load(path, map_location="cpu", weights_only=True)["entry"])
        for name, figures in entry.get("figures", {}).get("tensors", {}).items():
            if name in bits and isinstance(figures, dict) and "bits" in figures:
                bits[name] = int(figures["bits"])
    return Subject(run.name, str(run), run / "model.dcz", pruned, kept, bits)


# --- sizes -----------------------------------------------------------------------------------------------


def stream_sizes(subject: Subject) -> list[dict]:
    """Per sparse tensor: each stream's symbols, coded bits and entropy bound (bits)."""
    reader = container.Reader(subject.path)
    rows = []
    for name, record in reader.records([n for n in reader.names if reader.info(n).encoding != "raw"]).items():
        info = reader.info(name)
        symbols = {"codes": record.codes, "gaps": gaps.to_gaps(record.positions, info.numel, info.gap_bits)}
        row = {"tensor": name, "weights": info.numel, "kept": info.n_kept, "gap_bits": info.gap_bits,
               "coder": info.code_coder}
        for (stream, s), coded in zip(symbols.items(), info.streams):
            row[stream] = {"symbols": int(s.size), "bits": coded.nbits, "bytes": coded.nbytes,
                           "entropy_bits": entropy_bits(s)}
        rows.append(row)
    return rows


def file_sizes(subject: Subject, streams: list[dict]) -> dict:
    """The file against the sum of its streams' entropy bounds plus all that is not a stream."""
    reader = container.Reader(subject.path)
    size = subject.path.stat().st_size
    stream_bytes = sum(r[s]["bytes"] for r in streams for s in ("codes", "gaps"))
    bound_bytes = sum(r[s]["entropy_bits"] for r in streams for s in ("codes", "gaps")) / 8
    infos = [reader.info(n) for n in reader.names]
    return {"file_bytes": size, "stream_bytes": stream_bytes, "stream_bound_bytes": bound_bytes,
            "table_bytes": sum(i.table_bytes for i in infos if i.encoding != "raw"),
            "raw_bytes": sum(i.payload_bytes for i in infos if i.encoding == "raw"),
            "other_bytes": size - stream_bytes, "bound_bytes": bound_bytes + size - stream_bytes,
            "file_over_bound": size / (bound_bytes + size - stream_bytes)}


def compressors(subject: Subject) -> dict:
    """General-purpose compressors on the dense pruned, and pruned + shared, state; our file beside them."""
    zstandard = importlib.import_module("zstandard") if importlib.util.find_spec("zstandard") else None
    out = {"file_bytes": subject.path.stat().st_size}
    for form, state in (("pruned", subject.pruned), ("shared", container.read(subject.path))):
        data = dense_bytes(state)
        out[form] = {"dense_bytes": len(data), "zlib9": len(zlib.compress(data, 9)),
                     "lzma9": len(lzma.compress(data, preset=9))}
        if zstandard is not None:
            out[form]["zstd19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    return out


# --- k-means -------------------------------------------------------------------------------------------


def kmeans(subject: Subject, sample: int, seed: int = 0) -> list[dict]:
    """Per shared tensor: Lloyd's time on its kept weights, and its SSE against the optimum on a sample."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, values in subject.kept.items():
        k = 2 ** subject.bits[name]
        start = time.perf_counter()
        kmeans_1d(values, k, Init.LINEAR)
        seconds = time.perf_counter() - start
        part = values if values.size <= sample else rng.choice(values, size=sample, replace=False)
        lloyd = {init.value: sse(part, *kmeans_1d(part, k, init)) for init in (Init.LINEAR, Init.DENSITY)}
        start = time.perf_counter()
        best = sse(part, *kmeans_1d_optimal(part, k))
        rows.append({"tensor": name, "values": int(values.size), "k": k, "lloyd_seconds": seconds,
                     "sample": int(part.size), "sse_optimal": best, "optimal_seconds": time.perf_counter() - start,
                     **{f"sse_{i}": v for i, v in lloyd.items()},
                     **{f"sse_ratio_{i}": v / best if best > 0 else 1.0 for i, v in lloyd.items()}})
    return rows


# --- speed ---------------------------------------------------------------------------------------------


def speed(subject: Subject, repeat: int) -> dict:
    """Decode and encode times of a subject's file, and the memory-copy floor of its dense bytes."""
    from compress import modelfile

    reader = container.Reader(subject.path)
    names = list(reader.names)
    dense = sum(4 * reader.info(n).numel if reader.info(n).dtype != "int64" else 8 * reader.info(n).numel
                for n in names)
    records = reader.records([n for n in names if reader.info(n).encoding != "raw"])
    tensors = {n: records.get(n) if n in records else reader.array(n) for n in names}
    streams = []  # the Huffman streams, as the writer makes them (the encoder is deterministic)
    for name, record in records.items():
        info = reader.info(name)
        for symbols, alphabet in ((record.codes, record.table.size),
                                  (gaps.to_gaps(record.positions, record.numel, info.gap_bits), 1 << info.gap_bits)):
            lengths, bits = huffman.encode(symbols, alphabet)
            streams.append(huffman.Coded(lengths, bits.tobytes(), len(bits), int(symbols.size)))
    decoded = modelfile.decode(subject.path)
    for name, tensor in container.read(subject.path).items():  # what is timed must be right
        if not np.array_equal(decoded[name].numpy().reshape(-1).view(np.uint8), tensor.reshape(-1).view(np.uint8)):
            raise RuntimeError(f"modelfile.decode and container.read differ on {name}")
    with tempfile.TemporaryDirectory() as tmp, _timing.one_thread():
        again, fixed = Path(tmp) / "again.dcz", Path(tmp) / "fixed.dcz"
        container.write(fixed, tensors, coder="none")
        times = _timing.interleaved({
            "decode": lambda: modelfile.decode(subject.path),
            "decode_fixed_width": lambda: modelfile.decode(fixed),
            "memory_copy": _timing.memory_copy(dense),
            "memory_copy_into": _timing.memory_copy(dense, fresh=False),
            "huffman_lanes": lambda: huffman.decode_many(streams, min_total=0),
            "huffman_sequential": lambda: huffman.decode_many(streams, min_symbols=1 << 62),
            "encode": lambda: container.write(again, tensors),
        }, repeat)
        fixed_bytes = fixed.stat().st_size
    out = {name: _timing.summary(t) for name, t in times.items()}
    out["dense_bytes"] = dense
    out["fixed_width_file_bytes"] = fixed_bytes
    out["huffman_symbols"] = sum(s.count for s in streams)
    out["decode_over_copy"] = out["decode"]["median_s"] / out["memory_copy"]["median_s"]
    out["decode_over_copy_cpu"] = out["decode"]["cpu_median_s"] / out["memory_copy"]["cpu_median_s"]
    out["decode_over_copy_into"] = out["decode"]["median_s"] / out["memory_copy_into"]["median_s"]
    return out


# --- the benchmark ---------------------------------------------------------------------------------------


@bench.register("codec")
def codec(size: bench.Size, out: Path) -> bench.Result:
    """Codec size and speed against their limits: entropy bounds, zlib/lzma, decode vs memcpy, k-means vs optimum."""
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        if size is bench.Size.TINY:
            stand_in = _synthetic.model(_synthetic.lenet300_shapes(), "synthetic LeNet-300-100 stand-in "
                                        "(90 % pruned, 5-bit; tiny size, no training)")
            subjects = [synthetic_subject(stand_in, Path(tmp))]
        else:
            subjects = []
            for name, command in RUNS.items():
                run = Path("artifacts") / name
                if (run / "model.dcz").is_file():
                    subjects.append(run_subject(run))
                else:
                    notes.append(f"No run folder {run}: its rows are missing (make it with `{command}`).")
            subjects.append(synthetic_subject(_synthetic.resnet18(), Path(tmp)))
        figures = {}
        for s in subjects:
            streams = stream_sizes(s)
            figures[s.name] = {"source": s.source, "streams": streams, "file": file_sizes(s, streams),
                               "compressors": compressors(s), "kmeans": kmeans(s, SAMPLE[size])}
        fastest = max(subjects, key=lambda s: s.path.stat().st_size)
        figures["speed"] = {"subject": fastest.name, **speed(fastest, REPEAT[size])}
    notes += [
        "Entropy bound: n H(p) of each stream's own symbol histogram (order 0), the least any coder of "
        "independent symbols can reach; a Huffman code stays within one bit per symbol of it. Its length "
        "table is counted in 'other', with headers, codebooks and raw tensors.",
        "Compressors: zlib level 9 and lzma preset 9 (Python's standard library) on the dense state "
        "(every tensor as float32, int64 buffers as int64), ratio = dense bytes / compressed bytes."
        + ("" if importlib.util.find_spec("zstandard") else " zstd: the `zstandard` module is not installed."),
        f"Speed: medians of {REPEAT[size]} interleaved runs, one thread, wall-clock and CPU time of this "
        "process (on a loaded machine the CPU figure is the steadier: a long run is preempted more often than "
        "a short one, which inflates its wall-clock time more); decode = "
        "`compress.modelfile.decode` (file to float32 torch tensors, file read included); memory copy = "
        "`src.copy()` of the model's dense bytes (a new buffer: allocation and page faults included, as the "
        "decoder's output pays them), and `np.copyto` into a buffer already in memory; Huffman only = the "
        "file's Huffman streams through `huffman.decode_many` (lanes) or bitarray's `canonical_decode` "
        "(sequential); encode = `container.write` of the records and raw tensors.",
        f"K-means: Lloyd with linear init (the paper's and the pipeline's default) on each tensor's kept "
        f"weights, timed once; SSE of Lloyd (linear and density init) against the exact optimum "
        f"(`kmeans_1d_optimal`) on a random sample of at most {SAMPLE[size]:,} of them, all on the same sample.",
    ]
    return bench.Result(figures=figures, tables=tables(figures, subjects), notes=notes)


def tables(figures: dict, subjects: list[Subject]) -> list[tuple[str, str]]:
    """The Markdown tables of ``result.md``."""
    out = []
    rows = []
    for s in subjects:
        f = figures[s.name]
        for stream in ("codes", "gaps"):
            bits = sum(r[stream]["bits"] for r in f["streams"])
            bound = sum(r[stream]["entropy_bits"] for r in f["streams"])
            worst = max(f["streams"], key=lambda r: r[stream]["bits"] / max(r[stream]["entropy_bits"], 1))
            rows.append([s.name, stream, f"{sum(r[stream]['symbols'] for r in f['streams']):,}", f"{bits:,}",
                         f"{bound:,.0f}", f"{bits / bound:.4f}" if bound else "-",
                         f"{worst['tensor']} {worst[stream]['bits'] / max(worst[stream]['entropy_bits'], 1):.3f}"])
    out.append(("Coded streams against their entropy bound", bench.table(
        ["model", "stream", "symbols", "coded bits", "bound n·H(p) bits", "coded / bound", "worst tensor"], rows)))
    rows = []
    for s in subjects:
        f = figures[s.name]["file"]
        rows.append([s.name, f"{f['file_bytes']:,}", f"{f['stream_bytes']:,}", f"{f['stream_bound_bytes']:,.0f}",
                     f"{f['table_bytes']:,}", f"{f['raw_bytes']:,}", f"{f['other_bytes']:,}",
                     f"{f['file_over_bound']:.4f}"])
    out.append(("Whole file against the bound", bench.table(
        ["model", "file B", "streams B", "streams' bound B", "tables B", "raw tensors B", "all but streams B",
         "file / (bound + all but streams)"], rows)))
    rows = []
    for s in subjects:
        c = figures[s.name]["compressors"]
        for form in ("pruned", "shared"):
            d = c[form]["dense_bytes"]
            cells = [f"{c[form][k]:,} ({d / c[form][k]:.1f}×)" if k in c[form] else "-"
                     for k in ("zlib9", "lzma9", "zstd19")]
            rows.append([s.name, "pruned" if form == "pruned" else "pruned + shared", f"{d:,}", *cells,
                         f"{c['file_bytes']:,} ({d / c['file_bytes']:.1f}×)"])
    out.append(("Our file against general-purpose compressors (bytes, ratio)", bench.table(
        ["model", "dense state", "dense B", "zlib -9", "lzma -9", "zstd -19", "our .dcz"], rows)))
    sp = figures["speed"]
    copy = sp["memory_copy"]

    def row(what: str, key: str) -> list[str]:
        t = sp[key]
        return [what, f"{t['median_s'] * 1e3:.1f} ms", f"{t['median_s'] / copy['median_s']:.1f}×",
                f"{t['cpu_median_s'] * 1e3:.1f} ms", f"{t['cpu_median_s'] / copy['cpu_median_s']:.1f}×"]

    out.append((f"Speed ({sp['subject']})", bench.table(
        ["what", "wall median", "÷ memory copy", "CPU median", "÷ memory copy (CPU)"],
        [row("decode, whole file to float32 tensors", "decode"),
         row(f"memory copy of {sp['dense_bytes'] / 1e6:.1f} MB into a new buffer (the floor)", "memory_copy"),
         row("memory copy into a buffer already in memory", "memory_copy_into"),
         row(f"decode, the same model coded at fixed width ({sp['fixed_width_file_bytes']:,} B, no Huffman)",
             "decode_fixed_width"),
         row(f"Huffman streams only ({sp['huffman_symbols']:,} symbols), lanes", "huffman_lanes"),
         row("Huffman streams only, bitarray sequential", "huffman_sequential"),
         row("encode, whole file (fsync included)", "encode")])))
    rows = []
    for s in subjects:
        for r in figures[s.name]["kmeans"]:
            rows.append([s.name, r["tensor"], f"{r['values']:,}", r["k"], f"{r['lloyd_seconds'] * 1e3:.1f}",
                         f"{r['sample']:,}", f"{r['sse_ratio_linear']:.4f}", f"{r['sse_ratio_density']:.4f}",
                         f"{r['optimal_seconds']:.2f}"])
    out.append(("K-means per tensor: Lloyd's time, and its SSE ÷ the exact optimum", bench.table(
        ["model", "tensor", "kept weights", "k", "Lloyd ms (linear init)", "sample", "SSE ÷ optimum, linear init",
         "SSE ÷ optimum, density init", "optimum s"], rows)))
    return out
