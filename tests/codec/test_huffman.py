"""Canonical Huffman coding and the fixed-width coder: round trips, a hand-worked code, hostile lengths."""
import numpy as np
import pytest
from bitarray import bitarray
from hypothesis import given, settings, strategies as st

from compress.codec import huffman
from compress.errors import FormatError


def kraft_complete(lengths: np.ndarray) -> bool:
    used = lengths[lengths > 0].astype(np.int64)
    return used.size == 1 and used[0] == 1 or sum(2.0 ** -used) == 1.0


def test_huffman_lengths_of_a_hand_worked_example():
    # a:5 b:2 c:1 d:1 -> merge c+d (2), then b+(cd) (4), then a+(bcd): depths 1, 2, 3, 3
    lengths = huffman.lengths_from_counts(np.array([5, 2, 1, 1]))
    assert lengths.tolist() == [1, 2, 3, 3]
    code = huffman.canonical_code(lengths)
    assert {s: c.to01() for s, c in code.items()} == {0: "0", 1: "10", 2: "110", 3: "111"}
    lengths, bits = huffman.encode(np.array([0, 1, 2, 0, 0, 3, 0, 1, 0]), 4)
    assert lengths.tolist() == [1, 2, 3, 3]
    assert bits.to01() == "0" "10" "110" "0" "0" "111" "0" "10" "0"


def test_huffman_canonical_order_is_length_then_symbol():
    # symbols 5 and 2 share length 2: the smaller symbol gets the smaller code word
    lengths = np.array([0, 0, 2, 1, 0, 2], dtype=np.uint8)
    code = {s: c.to01() for s, c in huffman.canonical_code(lengths).items()}
    assert code == {3: "0", 2: "10", 5: "11"}


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300).flatmap(lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), max_size=400))))
def test_huffman_round_trip_any_distribution(case):
    alphabet, symbols = case
    symbols = np.array(symbols, dtype=np.int64)
    lengths, bits = huffman.encode(symbols, alphabet)
    assert lengths.dtype == np.uint8 and lengths.shape == (alphabet,)
    assert (lengths > 0).sum() == np.unique(symbols).size
    if symbols.size:
        assert kraft_complete(lengths)
    assert len(bits) == huffman.coded_bits(np.bincount(symbols, minlength=alphabet), lengths)
    np.testing.assert_array_equal(huffman.decode(lengths, bits, symbols.size), symbols)


def test_huffman_empty_input():
    lengths, bits = huffman.encode(np.zeros(0, np.int64), 8)
    assert not lengths.any() and len(bits) == 0
    assert huffman.decode(lengths, bits, 0).size == 0


def test_huffman_one_distinct_symbol_takes_one_bit_each():
    lengths, bits = huffman.encode(np.full(7, 3), 5)
    assert lengths.tolist() == [0, 0, 0, 1, 0]
    assert bits.to01() == "0" * 7
    assert huffman.decode(lengths, bits, 7).tolist() == [3] * 7


def test_huffman_lengths_capped_for_extremely_skewed_counts():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.lengths_from_counts(np.array(fib))
    assert lengths.max() <= huffman.MAX_LENGTH
    assert kraft_complete(lengths)
    huffman.check_lengths(lengths)


@pytest.mark.parametrize("lengths, why", [
    ([1, 1, 1], "over"),  # Kraft sum 3/2
    ([1, 2], "under"),  # Kraft sum 3/4: some bit strings decode to nothing
    ([0, 2], "lone symbol"),
    ([1, 32], "exceeds"),
])
def test_huffman_decode_rejects_bad_lengths(lengths, why):
    with pytest.raises(FormatError, match=why):
        huffman.decode(np.array(lengths, np.uint8), bitarray("0"), 1, "s", 7)


@pytest.mark.parametrize("bits, count", [
    ("0 0 0", 2),  # one symbol too many
    ("01", 3),  # count > bits
    ("0 10", 3),  # fewer symbols than stated
    ("0 1", 2),  # a cut-off code word
    ("0 10 1", 2),  # the right count, then a cut-off code word: bits left over
])
def test_huffman_decode_requires_exact_count_and_bits(bits, count):
    lengths = np.array([1, 2, 2], np.uint8)  # 0 -> 0, 1 -> 10, 2 -> 11
    with pytest.raises(FormatError) as err:
        huffman.decode(lengths, bitarray(bits.replace(" ", "")), count, "s", 7)
    assert err.value.field == "s" and err.value.offset == 7


def test_huffman_decode_lone_symbol_rejects_a_one_bit():
    with pytest.raises(FormatError):
        huffman.decode(np.array([0, 1], np.uint8), bitarray("001"), 3)


def test_huffman_decode_rejects_bits_without_symbols_and_symbols_without_lengths():
    with pytest.raises(FormatError):
        huffman.decode(np.array([1, 1], np.uint8), bitarray("0"), 0)
    with pytest.raises(FormatError):
        huffman.decode(np.zeros(3, np.uint8), bitarray("0"), 1)


def test_huffman_decode_of_a_hostile_count_allocates_nothing():
    with pytest.raises(FormatError, match="cannot fit"):
        huffman.decode(np.array([1, 1], np.uint8), bitarray("0101"), 2 ** 60)


def test_huffman_encode_rejects_symbols_outside_the_alphabet():
    with pytest.raises(ValueError):
        huffman.encode(np.array([0, 4]), 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16).flatmap(
    lambda w: st.tuples(st.just(w), st.lists(st.integers(0, 2 ** w - 1), max_size=300))))
def test_fixed_width_round_trip(case):
    width, values = case
    bits = huffman.pack_fixed(np.array(values, dtype=np.int64), width)
    assert len(bits) == width * len(values)
    np.testing.assert_array_equal(huffman.unpack_fixed(bits, width, len(values)), values)


def test_fixed_width_is_msb_first_across_bytes():
    assert huffman.pack_fixed(np.array([5, 1, 7]), 3).to01() == "101" "001" "111"
    assert huffman.fixed_width(32) == 5 and huffman.fixed_width(33) == 6 and huffman.fixed_width(1) == 1


def test_fixed_width_round_trip_across_chunks():
    values = np.arange(huffman.FIXED_CHUNK + 13) % 2048
    bits = huffman.pack_fixed(values, 11)
    np.testing.assert_array_equal(huffman.unpack_fixed(bits, 11, values.size), values)


def test_fixed_width_unpack_rejects_wrong_bit_count():
    with pytest.raises(FormatError):
        huffman.unpack_fixed(bitarray("0101"), 3, 2)


# --- the lane decoder (decode_many): the same symbols and the same refusals as the sequential one ---------

TINY_LANES = st.fixed_dictionaries({"min_symbols": st.just(1), "min_total": st.just(0),
                                    "lane_steps": st.integers(1, 12), "overlap": st.integers(0, 48)})


def complete_lengths(splits: list[int], max_length: int = huffman.MAX_LENGTH) -> np.ndarray:
    """Code lengths of a random complete binary tree: start from a two-leaf tree, split the leaf
    picked by each entry of ``splits`` (leaves at ``max_length`` are not split)."""
    leaves = [1, 1]
    for pick in splits:
        deep_enough = [i for i, d in enumerate(leaves) if d < max_length]
        if not deep_enough:
            break
        i = deep_enough[pick % len(deep_enough)]
        leaves[i:i + 1] = [leaves[i] + 1, leaves[i] + 1]
    return np.array(leaves, dtype=np.uint8)


def coded(lengths: np.ndarray, symbols: np.ndarray) -> huffman.Coded:
    bits = bitarray(endian="big")
    bits.encode(huffman.canonical_code(lengths), symbols.tolist())
    return huffman.Coded(lengths, bits.tobytes(), len(bits), symbols.size)


def sequential_or_error(stream: huffman.Coded):
    try:
        return huffman.decode_sequential(stream)
    except FormatError:
        return None


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 300).flatmap(lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=2,
                                                                          max_size=1500))), TINY_LANES)
def test_huffman_decode_many_round_trip_in_lanes(case, lanes):
    alphabet, symbols = case
    symbols = np.array(symbols)
    lengths, bits = huffman.encode(symbols, alphabet)
    [out] = huffman.decode_many([huffman.Coded(lengths, bits.tobytes(), len(bits), symbols.size)], **lanes)
    assert out.dtype == huffman.symbol_dtype(alphabet)
    np.testing.assert_array_equal(out, symbols)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=80), st.integers(2, huffman.MAX_LENGTH), st.data(), TINY_LANES)
def test_huffman_decode_many_any_complete_code_up_to_max_length(splits, max_length, data, lanes):
    # random complete codes: very skewed ones reach 31-bit words, longer than any look-up table
    lengths = complete_lengths(splits, max_length)
    symbols = np.array(data.draw(st.lists(st.integers(0, lengths.size - 1), min_size=1, max_size=600)))
    [out] = huffman.decode_many([coded(lengths, symbols)], **lanes)
    np.testing.assert_array_equal(out, symbols)


def test_huffman_decode_many_31_bit_words_and_equal_lengths_in_lanes():
    rng = np.random.default_rng(0)
    deep = np.array(list(range(1, 32)) + [31], np.uint8)  # words of 1, 2, ..., 31 and 31 bits
    huffman.check_lengths(deep)
    flat = np.full(32, 5, np.uint8)  # a fixed-width code: lanes start at multiples of 5 bits
    for lengths in (deep, flat):
        symbols = rng.integers(0, lengths.size, 5000)
        [out] = huffman.decode_many([coded(lengths, symbols)], min_symbols=1, min_total=0, lane_steps=3,
                                      overlap=0)
        np.testing.assert_array_equal(out, symbols)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 40), st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=800), st.data(), TINY_LANES)
def test_huffman_decode_many_refuses_exactly_what_sequential_refuses(alphabet, raw, data, lanes):
    symbols = np.array(raw) % alphabet
    lengths, bits = huffman.encode(symbols, alphabet)
    if (lengths > 0).sum() < 2:
        return
    stream = bytearray(bits.tobytes())
    nbits, count = len(bits), symbols.size
    damage = data.draw(st.sampled_from(["flip", "count", "cut", "garbage"]))
    if damage == "flip":
        for at in data.draw(st.lists(st.integers(0, nbits - 1), min_size=1, max_size=3)):
            stream[at // 8] ^= 0x80 >> at % 8
    elif damage == "count":
        count = data.draw(st.integers(1, nbits))
    elif damage == "cut":
        nbits = data.draw(st.integers(1, nbits))
        count = min(count, nbits)
    else:
        stream = bytearray(data.draw(st.binary(min_size=(nbits + 7) // 8, max_size=(nbits + 7) // 8)))
    if nbits % 8:
        stream[(nbits - 1) // 8] &= 0xFF << 8 - nbits % 8 & 0xFF
    damaged = huffman.Coded(lengths, bytes(stream[:(nbits + 7) // 8]), nbits, count, "s", 9)
    expected = sequential_or_error(damaged)
    if expected is None:
        with pytest.raises(FormatError) as err:
            huffman.decode_many([damaged], **lanes)
        assert err.value.field == "s" and err.value.offset == 9
    else:
        np.testing.assert_array_equal(huffman.decode_many([damaged], **lanes)[0], expected)


def test_huffman_decode_many_batch_equals_one_by_one_and_names_the_bad_stream():
    rng = np.random.default_rng(1)
    streams = []
    for alphabet, n in ((32, 20_000), (8, 30_000), (300, 9_000), (70_000, 12_000), (5, 3)):
        symbols = rng.geometric(0.3, n) % alphabet  # skewed: long words in the tail
        lengths, bits = huffman.encode(symbols, alphabet)
        streams.append((symbols, huffman.Coded(lengths, bits.tobytes(), len(bits), n, f"t{alphabet}", alphabet)))
    decoded = huffman.decode_many([s for _, s in streams], min_total=0)
    for (symbols, _), out in zip(streams, decoded):
        np.testing.assert_array_equal(out, symbols)
    symbols, bad = streams[1]
    cut = huffman.Coded(bad.lengths, bad.data, bad.nbits - 1, bad.count, bad.field, bad.offset)
    with pytest.raises(FormatError) as err:
        huffman.decode_many([streams[0][1], cut, streams[2][1]], min_total=0)
    assert err.value.field == "t8" and err.value.offset == 8


def test_huffman_decode_many_out_of_budget_lanes_fall_back_to_sequential():
    rng = np.random.default_rng(2)
    symbols = rng.integers(0, 3, 4000)
    lengths = np.array([1, 2, 2], np.uint8)  # 0 -> 0, 1 -> 10, 2 -> 11: lanes started mid-word need repairs
    stream = coded(lengths, symbols)
    [lanes] = huffman.decode_lanes([stream], lane_steps=2, overlap=0, budget=0)
    assert lanes is None  # some lane needed a repair, and none was allowed
    [out] = huffman.decode_many([stream], min_symbols=1, min_total=0, lane_steps=2, overlap=0, budget=0)
    np.testing.assert_array_equal(out, symbols)


def test_huffman_decode_many_lone_symbol_and_empty_streams():
    lone = np.array([0, 0, 1], np.uint8)
    [out, empty] = huffman.decode_many([huffman.Coded(lone, b"\x00\x00", 13, 13),
                                        huffman.Coded(lone, b"", 0, 0)], min_symbols=1)
    assert out.tolist() == [2] * 13 and empty.size == 0
    with pytest.raises(FormatError):
        huffman.decode_many([huffman.Coded(lone, b"\x00\x08", 13, 13)], min_symbols=1)  # a 1 bit


def test_huffman_decode_many_of_a_hostile_count_allocates_nothing():
    lengths = np.array([1, 1], np.uint8)
    with pytest.raises(FormatError, match="cannot fit"):
        huffman.decode_many([huffman.Coded(lengths, b"\x55", 8, 2 ** 60)], min_symbols=1)


def test_huffman_decode_many_splits_batches_and_sends_huge_streams_to_bitarray(monkeypatch):
    rng = np.random.default_rng(3)
    streams = []
    for n in (3000, 9000, 4000, 2500):
        symbols = rng.geometric(0.2, n) % 40
        lengths, bits = huffman.encode(symbols, 40)
        streams.append((symbols, huffman.Coded(lengths, bits.tobytes(), len(bits), n)))
    # batches of at most 20,000 bits: the 9,000-symbol stream (about 27,000 bits) is decoded alone by bitarray
    monkeypatch.setattr(huffman, "LANE_MAX_BITS", 20_000)
    calls = []
    lanes = huffman.decode_lanes
    monkeypatch.setattr(huffman, "decode_lanes", lambda batch, **kw: calls.append(len(batch)) or lanes(batch, **kw))
    decoded = huffman.decode_many([s for _, s in streams], min_symbols=1, min_total=0)
    for (symbols, _), out in zip(streams, decoded):
        np.testing.assert_array_equal(out, symbols)
    assert sum(calls) == 3 and len(calls) >= 2
