"""The .dcz file: round trips, exact sizes, determinism, atomic writes, and one bad file per reader error."""
import ast
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from compress.codec import container
from compress.codec.container import Reader, Writer, read, write
from compress.errors import FormatError
from compress.record import Affine, Codebook, TensorRecord

# The worked example of docs/FORMAT.md, section 7.
EXAMPLE_HEX = """
89 44 43 5a 0d 0a 1a 0a 01 00 00 00 60 58 01 00 00 00 00 00 00 00 01 00 77 01 02 02 00 00 00 00
00 00 00 04 00 00 00 00 00 00 00 9e a0 94 41 01 01 02 03 00 00 00 00 00 00 00 04 00 00 00 00 00
00 00 02 00 00 00 00 00 00 bf 00 00 80 3e 02 00 00 00 01 01 04 00 00 00 02 01 00 02 0c 00 00 00
00 00 00 00 01 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00 0d 00 00 00 00 00 00 00 01 00 00 00
00 00 00 00 06 00 00 00 00 00 00 00 0e 00 00 00 00 00 00 00 7e 00 00 00 00 00 00 00 3a 1b a9 75
89 44 43 5a 0d 0a 1a 0a
"""
EXAMPLE = bytes.fromhex(EXAMPLE_HEX)
FIXED_OVERHEAD = 12 + 8 + 28  # header, tensor count + metadata length, footer


def example_record() -> TensorRecord:
    return TensorRecord((2, 4), [1, 2, 7], [0, 1, 1], Codebook([-0.5, 0.25]))


def dense(r: TensorRecord) -> np.ndarray:
    """The record's dense tensor (record.to_dense divides by a zero first dim of an empty per-channel one)."""
    return r.to_dense() if r.numel else np.zeros(r.shape, np.float32)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (-0.0 differs from 0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# --- strategies -------------------------------------------------------------------------------------------


@st.composite
def records(draw) -> TensorRecord:
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3)))
    numel = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    density = draw(st.sampled_from([0.0, 0.02, 0.3, 1.0]))
    positions = np.flatnonzero(rng.random(numel) < density)
    if draw(st.booleans()):
        k = draw(st.integers(1, 300))
        table = Codebook(rng.normal(size=k).astype(np.float32))
    else:
        levels = 2 ** draw(st.integers(1, 8))
        per_channel = draw(st.booleans())
        channels = shape[0] if per_channel else 1
        table = Affine(rng.random(channels).astype(np.float32) + 1e-3, rng.integers(0, levels, channels),
                       levels, per_channel)
    one_code = draw(st.booleans())  # a single distinct code exercises the one-symbol Huffman code
    codes = np.full(positions.size, table.size - 1) if one_code else rng.integers(0, table.size, positions.size)
    return TensorRecord(shape, positions, codes, table)


# --- round trips ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records(), min_size=1, max_size=3), st.sampled_from(["huffman", "none"]),
       st.one_of(st.none(), st.integers(1, 16)))
def test_container_round_trip_is_bit_exact(tmp_path, recs, coder, gap_bits):
    path = tmp_path / "m.dcz"
    raw = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    with Writer(path, metadata={"model": "test"}) as w:
        for i, r in enumerate(recs):
            w.add(f"t{i}", r, gap_bits=gap_bits, coder=coder)
        w.add_raw("bias", raw)
    reader = Reader(path)
    assert reader.names == [f"t{i}" for i in range(len(recs))] + ["bias"]
    assert reader.metadata == {"model": "test"}
    for i, r in enumerate(recs):
        back = reader.record(f"t{i}")
        np.testing.assert_array_equal(back.positions, r.positions)
        np.testing.assert_array_equal(back.codes, r.codes)
        assert bits_equal(reader.array(f"t{i}"), dense(r))
    assert bits_equal(reader.array("bias"), raw)
    assert sum(s.total_bytes for s in w.stats) + FIXED_OVERHEAD + len('{"model":"test"}') == w.size
    assert w.size == os.path.getsize(path)


def test_container_raw_dtypes(tmp_path):
    f32 = np.array([[1.5, -0.0], [3e38, -1e-45]], dtype=np.float32)
    f16 = np.array([0.1, 65504.0, -2.0], dtype=np.float32)
    i64 = np.array([-(2 ** 63), 0, 2 ** 63 - 1])
    path = tmp_path / "raw.dcz"
    with Writer(path) as w:
        w.add_raw("f32", f32)
        w.add_raw("f16", f16, dtype="float16")
        w.add_raw("i64", i64, dtype="int64")
        w.add_raw("scalar", np.float32(2.5))
        w.add_raw("empty", np.zeros((0, 3), np.float32))
    out = read(path)
    assert bits_equal(out["f32"], f32)
    assert bits_equal(out["f16"], f16.astype(np.float16).astype(np.float32))
    assert bits_equal(out["i64"], i64.astype(np.int64))
    assert out["scalar"].shape == () and out["scalar"] == 2.5
    assert out["empty"].shape == (0, 3)
    assert Reader(path).info("f16").payload_bytes == 6


def test_container_edge_records(tmp_path):
    recs = {
        "empty": TensorRecord((0, 5), [], [], Affine([1.0], [0], 4)),
        "empty_per_channel": TensorRecord((0, 5), [], [], Affine(np.zeros(0), np.zeros(0), 4, True)),
        "all_zero": TensorRecord((1000, 1000), [], [], Codebook([0.0])),
        "scalar": TensorRecord((), [0], [0], Codebook([7.0])),
        "full": TensorRecord((3,), [0, 1, 2], [2, 0, 1], Codebook([1, 2, 3])),
        "last_only": TensorRecord((100_000,), [99_999], [0], Codebook([-1.0])),
    }
    path = tmp_path / "edge.dcz"
    write(path, recs)
    reader = Reader(path)
    for name, r in recs.items():
        assert bits_equal(reader.array(name), dense(r)), name


def test_container_stats_are_exact(tmp_path):
    path = tmp_path / "ex.dcz"
    with Writer(path) as w:
        s = w.add("w", example_record(), gap_bits=2)
    assert (s.n_kept, s.n_gap_symbols, s.n_escapes, s.gap_bits, s.code_bits) == (3, 4, 1, 2, 1)
    assert (s.code_stream_bits, s.gap_stream_bits, s.payload_bytes) == (3, 6, 2)
    assert s.table_bytes == 4 + 8 + 4 + 2 + 4 + 4  # codebook, code lengths, gap lengths
    assert s.header_bytes == 118 and s.total_bytes == 120 and w.size == 168
    info = Reader(path).info("w")
    assert (info.header_bytes, info.payload_bytes, info.table_bytes) == (118, 2, s.table_bytes)


def test_container_matches_the_worked_example_of_the_format_doc(tmp_path):
    path = tmp_path / "ex.dcz"
    with Writer(path) as w:
        w.add("w", example_record(), gap_bits=2, coder="huffman")
    assert path.read_bytes() == EXAMPLE
    out = Reader(EXAMPLE).array("w")
    assert out.tolist() == [[0, -0.5, 0.25, 0], [0, 0, 0, 0.25]]


def test_container_identical_inputs_give_identical_files(tmp_path):
    rng = np.random.default_rng(1)
    pos = np.flatnonzero(rng.random(5000) < 0.1)
    rec = TensorRecord((50, 100), pos, rng.integers(0, 32, pos.size), Codebook(rng.normal(size=32)))
    tensors = {"w": rec, "b": rng.normal(size=50).astype(np.float32), "steps": np.array([3])}
    write(tmp_path / "a.dcz", tensors, metadata={"z": "1", "a": "2"})
    write(tmp_path / "b.dcz", tensors, metadata={"a": "2", "z": "1"})
    assert (tmp_path / "a.dcz").read_bytes() == (tmp_path / "b.dcz").read_bytes()


def test_container_write_is_atomic(tmp_path):
    path = tmp_path / "m.dcz"
    with pytest.raises(RuntimeError):
        with Writer(path) as w:
            w.add("w", example_record())
            raise RuntimeError("training crashed")
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        with Writer(path) as w:
            w.add_raw("x", np.array([np.nan], np.float32))
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_container_reader_accepts_bytes(tmp_path):
    path = tmp_path / "m.dcz"
    write(path, {"w": example_record()})
    assert bits_equal(Reader(path.read_bytes()).array("w"), Reader(path).array("w"))


@pytest.mark.parametrize("bad", [
    lambda w: w.add("w", TensorRecord((4,), [2, 1], [0, 0], Codebook([1.0]))),  # not increasing
    lambda w: w.add("w", TensorRecord((4,), [4], [0], Codebook([1.0]))),  # past the end
    lambda w: w.add("w", TensorRecord((4,), [1], [3], Codebook([1.0, 2.0]))),  # code outside the table
    lambda w: w.add("w", TensorRecord((4,), [1], [0], Codebook([np.nan]))),
    lambda w: w.add("w", TensorRecord((4,), [1], [0], Affine([np.inf], [0], 2))),
    lambda w: w.add("w", TensorRecord((4,), [1], [0], Codebook([1.0])), coder="zip"),
    lambda w: w.add("w", TensorRecord((4,), [1], [0], Codebook([1.0])), gap_bits=17),
    lambda w: w.add("", TensorRecord((4,), [1], [0], Codebook([1.0]))),
    lambda w: w.add_raw("w", np.ones((1,) * 9)),
    lambda w: w.add_raw("w", np.array([1e6]), dtype="float16"),  # overflows float16
    lambda w: w.add_raw("w", np.array([1.5]), dtype="int64"),
    lambda w: (w.add_raw("w", np.ones(1)), w.add_raw("w", np.ones(1))),  # repeated name
])
def test_container_writer_refuses_what_the_reader_would_refuse(tmp_path, bad):
    with pytest.raises(ValueError):
        with Writer(tmp_path / "m.dcz") as w:
            bad(w)
    assert list(tmp_path.iterdir()) == []


def test_container_writer_without_with(tmp_path):
    w = Writer(tmp_path / "m.dcz")
    w.add("w", example_record(), gap_bits=2)
    stats, size = w.close()
    assert size == 168 and stats[0].name == "w" and (tmp_path / "m.dcz").read_bytes() == EXAMPLE
    with pytest.raises(ValueError, match="closed"):
        w.add_raw("x", np.ones(1))


def test_codec_imports_only_numpy_bitarray_and_the_stdlib():
    allowed = {"numpy", "bitarray", "compress.record", "compress.errors"}
    for path in Path(container.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for m in modules:
                ok = (m.split(".")[0] in sys.stdlib_module_names or m.split(".")[0] in allowed or m in allowed
                      or m.startswith("compress.codec"))
                assert ok, f"{path.name} imports {m}"


# --- hand-made bad files: one per reader error kind ----------------------------------------------------------

# Field offsets in EXAMPLE (see the table in docs/FORMAT.md, section 7).
DIMS, CRC, N_GAP, CODEBOOK, GAP_LENGTHS, CODE_STREAM, TABLE = 0x1B, 0x2B, 0x3A, 0x46, 0x54, 0x5C, 0x0E
FOOTER = len(EXAMPLE) - 28


def patched(data: bytes, at: int, fmt: str, *values, fix_crc: bool = True) -> bytes:
    """``data`` with ``values`` packed at ``at``; the table CRC recomputed so later checks are reached."""
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, at, *values)
    if fix_crc:
        footer = len(out) - 28
        table_at, _, _, _ = struct.unpack_from("<QQI8s", out, footer)
        struct.pack_into("<I", out, footer + 16, zlib.crc32(out[table_at:footer]))
    return bytes(out)


def expect(data: bytes, field: str, *, decode: str | None = None) -> FormatError:
    with pytest.raises(FormatError) as err:
        reader = Reader(data)
        if decode:
            reader.array(decode)
    assert field in err.value.field, err.value
    assert err.value.offset is None or 0 <= err.value.offset <= len(data)
    return err.value


def test_bad_file_magic():
    expect(b"PK\x03\x04" + EXAMPLE[4:], "header.magic")


def test_bad_file_unknown_version():
    err = expect(patched(EXAMPLE, 8, "H", 2), "header.version")
    assert err.offset == 8 and "version 2" in str(err)


def test_bad_file_flags():
    expect(patched(EXAMPLE, 10, "H", 1), "header.flags")


def test_bad_file_truncated():
    expect(EXAMPLE[:-10], "footer.magic")
    expect(EXAMPLE[:30], "file")
    expect(b"", "file")


def test_bad_file_table_offset_past_the_end():
    err = expect(patched(EXAMPLE, FOOTER, "Q", 2 ** 40, fix_crc=False), "footer.table_offset")
    assert err.offset == FOOTER


def test_bad_file_table_length():
    expect(patched(EXAMPLE, FOOTER + 8, "Q", 2 ** 63, fix_crc=False), "footer.table_length")


def test_bad_file_stream_offset_past_the_end():
    err = expect(patched(EXAMPLE, CODE_STREAM, "Q", 2 ** 62), "tensor[0] 'w'.code_stream.offset")
    assert err.offset == CODE_STREAM


def test_bad_file_stream_length_past_the_payload():
    expect(patched(EXAMPLE, CODE_STREAM + 8, "Q", 2 ** 62), "tensor[0] 'w'.code_stream.length")


def test_bad_file_shape_length_mismatch(tmp_path):
    path = tmp_path / "raw.dcz"
    write(path, {"b": np.arange(6, dtype=np.float32)})
    data = path.read_bytes()
    dims_at = 12 + 24 + 8 + 2 + 1 + 2  # payload, table count + metadata length, name, encoding, ndim
    err = expect(patched(data, dims_at, "Q", 7), "tensor[0] 'b'.data.length")
    assert "24 bytes for 7 values" in str(err)


def test_bad_file_sparse_shape_larger_than_its_gaps_cover():
    # 4 gap symbols of width 2 can span at most 15 positions
    expect(patched(EXAMPLE, DIMS + 8, "Q", 100), "tensor[0] 'w'.n_gap_symbols")
    # 12 positions pass the header bound but the gaps end 4 short: more than M = 3
    expect(patched(EXAMPLE, DIMS + 8, "Q", 6), "tensor[0] 'w'.gap_stream", decode="w")


def test_bad_file_table_crc_mismatch():
    err = expect(patched(EXAMPLE, CODEBOOK, "f", 1.0, fix_crc=False), "footer.table_crc")
    assert err.offset == FOOTER + 16


def test_bad_file_payload_crc_mismatch_is_refused_when_opened_before_any_decoding(monkeypatch):
    data = bytearray(EXAMPLE)
    data[12] ^= 0x80  # the table is intact, the payload is not
    decoded = []
    monkeypatch.setattr(container.huffman, "decode", lambda *a, **k: decoded.append(a))
    with pytest.raises(FormatError) as err:
        Reader(bytes(data))
    assert err.value.field == "tensor[0] 'w'.payload_crc" and err.value.offset == 12
    assert decoded == []


def test_bad_file_dims_multiplying_past_2_63():
    err = expect(patched(EXAMPLE, DIMS, "QQ", 2 ** 40, 2 ** 40), "tensor[0] 'w'.shape")
    assert err.offset == DIMS


def test_bad_file_empty_tensor_with_a_dimension_no_array_can_have():
    # found by `python -m compress.fuzz --cases 100000` (case 50808): zero elements, but numpy cannot make the array
    err = expect(patched(EXAMPLE, DIMS, "QQ", 0, 2 ** 64 - 1), "tensor[0] 'w'.shape")
    assert err.offset == DIMS
    with pytest.raises(ValueError, match="each dim at most"):  # the writer refuses the same shapes
        container._check_shape("w", (0, 2 ** 40))


def test_bad_file_count_of_2_60_symbols():
    expect(patched(EXAMPLE, N_GAP, "Q", 2 ** 60), "tensor[0] 'w'.gap_stream.bits")


def test_bad_file_count_of_2_32_tensors():
    expect(patched(EXAMPLE, TABLE, "I", 2 ** 32 - 1), "table.tensor_count")


def test_bad_file_huffman_lengths_violate_kraft():
    err = expect(patched(EXAMPLE, GAP_LENGTHS + 4, "4B", 1, 1, 0, 2), "tensor[0] 'w'.gap_lengths")
    assert "Kraft" in str(err)


def test_bad_file_nan_in_codebook():
    err = expect(patched(EXAMPLE, CODEBOOK + 4, "f", float("nan")), "tensor[0] 'w'.codebook")
    assert err.offset == CODEBOOK + 4  # the bad value itself


def test_bad_file_unknown_encoding_and_coder():
    expect(patched(EXAMPLE, 0x19, "B", 9), "tensor[0] 'w'.encoding")
    expect(patched(EXAMPLE, 0x2F, "B", 5), "tensor[0] 'w'.code_coder")


def test_bad_file_name_not_utf8_and_repeated(tmp_path):
    expect(patched(EXAMPLE, 0x18, "B", 0xFF), "tensor[0].name")
    path = tmp_path / "two.dcz"
    write(path, {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)})
    data = path.read_bytes()
    second = 12 + 8 + 8 + 42 + 2  # payload, count + metadata length, first entry, name_length
    expect(patched(data, second, "B", ord("a")), "tensor[1].name")


@pytest.mark.parametrize("meta", [b"[1]", b"{\"a\": 1}", b"{\"a\":\"1\",\"a\":\"2\"}", b"[" * 5000, b"\xff"])
def test_bad_file_metadata(meta):
    table = struct.pack("<II", 0, len(meta)) + meta
    data = (struct.pack("<8sHH", container.MAGIC, 1, 0) + table
            + struct.pack("<QQI8s", 12, len(table), zlib.crc32(table), container.MAGIC))
    expect(data, "table.metadata")


def test_bad_file_padding_bits_not_zero():
    data = bytearray(EXAMPLE)
    data[12] |= 0x01  # the code stream has 3 bits; bit 8 is padding
    data[CRC:CRC + 4] = struct.pack("<I", zlib.crc32(bytes(data[12:14])))
    data = patched(bytes(data), 0, "8s", container.MAGIC)  # recompute the table CRC
    expect(data, "tensor[0] 'w'.code_stream", decode="w")


def test_bad_file_decompression_bomb_is_refused_when_opened_unless_allowed(tmp_path):
    # well formed: 2**26 zeros around one weight, in 9 KB (the gap escapes cost a bit each)
    path = tmp_path / "bomb.dcz"
    write(path, {"w": TensorRecord((1 << 26,), [5], [0], Codebook([1.0]))}, gap_bits=10)
    size = path.stat().st_size
    assert size < 16_000 and container.element_budget(size) < 1 << 26
    err = expect(path.read_bytes(), "tensor[0] 'w'.shape")
    assert "more than the" in str(err) and "allow" in str(err)
    reader = Reader(path, allow_elements=1 << 26)  # a caller that expects a tensor this big
    assert reader.info("w").shape == (1 << 26,) and reader.record("w").positions.tolist() == [5]


def test_bad_file_read_of_a_missing_path(tmp_path):
    expect(str(tmp_path / "nope.dcz"), "file")


# --- fuzz ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory) -> bytes:
    rng = np.random.default_rng(3)
    pos = np.flatnonzero(rng.random(400) < 0.2)
    path = tmp_path_factory.mktemp("fuzz") / "s.dcz"
    with Writer(path, metadata={"k": "v"}) as w:
        w.add("a", TensorRecord((20, 20), pos, rng.integers(0, 8, pos.size), Codebook(rng.normal(size=8))))
        w.add("b", TensorRecord((20, 20), pos, rng.integers(0, 16, pos.size),
                                Affine(rng.random(20) + 0.1, rng.integers(0, 16, 20), 16, True)), coder="none")
        w.add_raw("c", rng.normal(size=7), dtype="float16")
        w.add_raw("d", np.arange(3), dtype="int64")
    return path.read_bytes()


def fix_crcs(data: bytearray, original: bytes) -> None:
    """Recompute every payload CRC (entries as in ``original``) and the table CRC, in place."""
    reader = Reader(original)
    for name in reader.names:
        info = reader.info(name)
        crc_at = info.offset + 2 + len(name.encode()) + 2 + 8 * len(info.shape)
        first, last = info.streams[0], info.streams[-1]
        struct.pack_into("<I", data, crc_at, zlib.crc32(data[first.offset:last.offset + last.nbytes]))
    footer = len(data) - 28
    table_at = struct.unpack_from("<Q", data, footer)[0]
    struct.pack_into("<I", data, footer + 16, zlib.crc32(data[table_at:footer]))


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_container_fuzz_flips_and_truncations_end_in_format_error_or_success(sample_file, data):
    mode = data.draw(st.sampled_from(["flip", "flip_fixed_crc", "truncate"]))
    blob = bytearray(sample_file)
    if mode == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            bit = data.draw(st.integers(0, 8 * len(blob) - 1))
            blob[bit // 8] ^= 1 << (bit % 8)
        if mode == "flip_fixed_crc":
            fix_crcs(blob, sample_file)  # so the checks behind the checksums are reached
    try:
        reader = Reader(bytes(blob))
        for name in reader.names:
            reader.info(name)
            reader.array(name)
    except FormatError:
        pass
