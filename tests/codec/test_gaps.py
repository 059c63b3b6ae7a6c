"""Sparse positions <-> gap symbols: the escape rule, round trips and the width search."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from compress.codec import gaps, huffman
from compress.errors import FormatError


def test_gaps_hand_worked_example():
    # w=2, M=3: position 0 -> 0; then 8 zeros before position 9 -> 3, 3, 2
    assert gaps.to_gaps(np.array([0, 9]), 10, 2).tolist() == [0, 3, 3, 2]
    # 10 positions left after the cursor: escapes until at most M remain
    assert gaps.to_gaps(np.array([0, 9]), 20, 2).tolist() == [0, 3, 3, 2, 3, 3, 3]
    assert gaps.from_gaps(np.array([0, 3, 3, 2, 3, 3, 3]), 2, 20).tolist() == [0, 9]


def test_gaps_gap_exactly_a_multiple_of_m():
    # 6 zeros before position 6 with M=3: two escapes and a 0
    assert gaps.to_gaps(np.array([6]), 7, 2).tolist() == [3, 3, 0]


@st.composite
def sparse(draw):
    numel = draw(st.integers(0, 3000))
    mask = draw(st.lists(st.booleans(), min_size=numel, max_size=numel)) if numel < 200 else None
    if mask is None:
        density = draw(st.sampled_from([0.0, 0.001, 0.01, 0.3, 1.0]))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        mask = np.random.default_rng(seed).random(numel) < density
    positions = np.flatnonzero(np.array(mask, dtype=bool))
    return positions, numel


@settings(max_examples=150, deadline=None)
@given(sparse(), st.integers(1, 16))
def test_gaps_round_trip(case, width):
    positions, numel = case
    m = gaps.escape(width)
    symbols = gaps.to_gaps(positions, numel, width)
    assert symbols.size == 0 or (symbols.min() >= 0 and symbols.max() <= m)
    assert np.count_nonzero(symbols != m) == positions.size
    assert numel <= (symbols.size + 1) * m  # the reader's pre-allocation bound holds
    np.testing.assert_array_equal(gaps.from_gaps(symbols, width, numel), positions)
    np.testing.assert_array_equal(gaps.symbol_counts(positions, numel, width), np.bincount(symbols, minlength=m + 1))


def test_gaps_empty_and_full_tensors():
    assert gaps.to_gaps(np.zeros(0, np.int64), 0, 3).size == 0
    assert gaps.to_gaps(np.zeros(0, np.int64), 7, 3).size == 0  # 7 = M positions need no escape
    assert gaps.to_gaps(np.zeros(0, np.int64), 8, 3).tolist() == [7]
    assert gaps.to_gaps(np.arange(5), 5, 1).tolist() == [0] * 5
    assert gaps.from_gaps(np.zeros(0, np.int64), 3, 7).size == 0


@pytest.mark.parametrize("symbols, numel, why", [
    ([3, 3, 1], 7, "past the end"),  # cursor 8 > 7
    ([0], 10, "short of"),  # 9 positions left uncovered, more than M = 3
    ([4], 5, "out of range"),
])
def test_gaps_from_gaps_rejects_inconsistent_streams(symbols, numel, why):
    with pytest.raises(FormatError, match=why):
        gaps.from_gaps(np.array(symbols), 2, numel, "g", 3)


def actual_bytes(positions, numel, width, coder):
    symbols = gaps.to_gaps(positions, numel, width)
    if coder == "none":
        return (len(huffman.pack_fixed(symbols, width)) + 7) // 8
    lengths, bits = huffman.encode(symbols, 1 << width)
    used = np.flatnonzero(lengths)
    return (len(bits) + 7) // 8 + (int(used[-1]) + 1 if used.size else 0)


@settings(max_examples=25, deadline=None)
@given(sparse(), st.sampled_from(["huffman", "none"]))
def test_gaps_best_width_is_the_smallest_real_stream(case, coder):
    positions, numel = case
    sizes = {w: actual_bytes(positions, numel, w, coder) for w in range(1, 17)}
    for w, size in sizes.items():
        assert gaps.coded_bytes(positions, numel, w, coder) == size
    best = gaps.best_width(positions, numel, coder=coder)
    assert sizes[best] == min(sizes.values())
    assert best == min(w for w in sizes if sizes[w] == sizes[best])  # ties go to the narrower width


def test_gaps_best_width_respects_candidates():
    positions = np.arange(0, 10_000, 97)
    assert gaps.best_width(positions, 10_000, widths=[5]) == 5
    with pytest.raises(ValueError):
        gaps.best_width(positions, 10_000, widths=[17])


def test_gaps_large_tensor_is_vectorised():
    rng = np.random.default_rng(0)
    numel = 2_000_000
    positions = np.flatnonzero(rng.random(numel) < 0.1)
    w = gaps.best_width(positions, numel)
    np.testing.assert_array_equal(gaps.from_gaps(gaps.to_gaps(positions, numel, w), w, numel), positions)
