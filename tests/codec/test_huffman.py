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
