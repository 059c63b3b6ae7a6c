import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from compress.kmeans1d import Init, kmeans_1d, kmeans_1d_optimal, nearest, sse


def test_kmeans_1d_separates_obvious_clusters():
    values = np.array([1.0, 1.1, 0.9, 5.0, 5.2, 4.8])
    centroids, codes = kmeans_1d(values, 2)
    np.testing.assert_allclose(centroids, [1.0, 5.0], rtol=1e-6)
    assert codes.tolist() == [0, 0, 0, 1, 1, 1]


def test_kmeans_1d_worked_example_lloyd_from_linear_init():
    # linear init over [0, 10] with k=3: 0, 5, 10; cluster {0, 1, 2}, {6}, {10} -> means 1, 6, 10
    centroids, codes = kmeans_1d(np.array([0.0, 1.0, 2.0, 6.0, 10.0]), 3)
    np.testing.assert_allclose(centroids, [1.0, 6.0, 10.0])
    assert codes.tolist() == [0, 0, 0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(values=hnp.arrays(np.float32, st.integers(1, 400), elements=st.floats(-4, 4, width=32)),
       bits=st.integers(1, 6), init=st.sampled_from(list(Init)))
def test_kmeans_1d_at_most_2_bits_values_and_codes_are_nearest(values, bits, init):
    centroids, codes = kmeans_1d(values, 2 ** bits, init, seed=1)
    assert 1 <= centroids.size <= 2 ** bits
    assert np.all(np.diff(centroids) > 0)
    assert codes.min() >= 0 and codes.max() < centroids.size
    # every value sits at its nearest centroid (Lloyd's fixed point, and what the codes claim)
    dist = np.abs(values[:, None].astype(np.float64) - centroids[None, :].astype(np.float64))
    chosen = dist[np.arange(values.size), codes]
    assert np.all(chosen <= dist.min(axis=1) + 1e-12)


def test_kmeans_1d_linear_init_beats_or_matches_a_single_centroid():
    x = np.random.default_rng(0).laplace(size=10_000)
    c1, k1 = kmeans_1d(x, 1)
    c32, k32 = kmeans_1d(x, 32)
    assert sse(x, c32, k32) < sse(x, c1, k1) / 50


def test_kmeans_1d_empty_and_constant_inputs():
    c, codes = kmeans_1d(np.zeros(0), 8)
    assert codes.size == 0 and c.size == 1
    c, codes = kmeans_1d(np.full(10, 0.5), 8)
    assert c.tolist() == [0.5] and codes.tolist() == [0] * 10


def test_nearest_breaks_ties_down():
    assert nearest(np.array([0.5]), np.array([0.0, 1.0], dtype=np.float32)).tolist() == [0]


def test_kmeans_1d_is_deterministic_for_random_init():
    x = np.random.default_rng(3).normal(size=5000)
    a = kmeans_1d(x, 16, Init.RANDOM, seed=7)
    b = kmeans_1d(x, 16, Init.RANDOM, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def brute_force_sse(values: np.ndarray, k: int) -> float:
    """The least SSE over every split of the sorted values into min(k, distinct) runs."""
    xs = np.sort(values)
    k = min(k, np.unique(xs).size)
    best = np.inf
    for cuts in itertools.combinations(range(1, xs.size), k - 1):
        bounds = [0, *cuts, xs.size]
        best = min(best, sum(float(((xs[a:b] - xs[a:b].mean()) ** 2).sum()) for a, b in zip(bounds, bounds[1:])))
    return best


@settings(max_examples=200, deadline=None)
@given(values=hnp.arrays(np.float64, st.integers(1, 9), elements=st.sampled_from([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0])
                         | st.floats(-4, 4)), k=st.integers(1, 5))
def test_kmeans_1d_optimal_matches_brute_force(values, k):
    centroids, codes = kmeans_1d_optimal(values, k)
    assert centroids.size == min(k, np.unique(values).size) and np.all(np.diff(centroids) > 0)
    for c in range(centroids.size):  # each centroid is the mean of its cluster
        np.testing.assert_allclose(centroids[c], values[codes == c].mean(), rtol=1e-12, atol=1e-12)
    assert sse(values, centroids, codes) == pytest.approx(brute_force_sse(values, k), rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(values=hnp.arrays(np.float32, st.integers(1, 2000), elements=st.floats(-4, 4, width=32)),
       bits=st.integers(1, 5), init=st.sampled_from(list(Init)))
def test_kmeans_1d_lloyd_never_beats_the_optimum(values, bits, init):
    c_opt, k_opt = kmeans_1d_optimal(values, 2 ** bits)
    c, codes = kmeans_1d(values, 2 ** bits, init, seed=2)
    assert sse(values, c, codes) >= sse(values, c_opt, k_opt) * (1 - 1e-9) - 1e-9


def test_kmeans_1d_optimal_worked_example():
    # {0, 1, 2} {10, 11} {30}: two gaps far wider than the runs
    centroids, codes = kmeans_1d_optimal(np.array([11.0, 0.0, 30.0, 2.0, 10.0, 1.0]), 3)
    np.testing.assert_allclose(centroids, [1.0, 10.5, 30.0])
    assert codes.tolist() == [1, 0, 2, 0, 1, 0]
