"""1-D k-means for weight sharing.

Chosen: Lloyd's algorithm on the SORTED values. In one dimension every cluster
is a contiguous run of the sorted values, bounded by the midpoints between
neighbouring centroids; with prefix sums, one iteration is ``k`` binary searches
and ``k`` subtractions, O(k log n), after a single O(n log n) sort. A million
weights take milliseconds per iteration, so we can iterate to convergence.
The exact dynamic-programming optimum (O(k n) with SMAWK) buys little: Lloyd
from the paper's linear initialisation lands within a fraction of a percent
of it on trained weights (see ``python -m compress.bench kmeans``), and the
paper's accuracy depends on that initialisation, not on the global optimum.
"""
from __future__ import annotations

import enum

import numpy as np


class Init(str, enum.Enum):
    LINEAR = "linear"  # evenly over [min, max]: keeps the rare large weights (the paper's finding)
    DENSITY = "density"  # at quantiles of the distribution
    RANDOM = "random"  # Forgy: k distinct weights drawn at random


def initial_centroids(sorted_values: np.ndarray, k: int, init: Init, rng: np.random.Generator) -> np.ndarray:
    lo, hi = sorted_values[0], sorted_values[-1]
    if init is Init.LINEAR:
        return np.linspace(lo, hi, k)
    if init is Init.DENSITY:
        return np.quantile(sorted_values, (np.arange(k) + 0.5) / k)
    distinct = np.unique(sorted_values)
    return np.sort(rng.choice(distinct, size=min(k, distinct.size), replace=False))


def kmeans_1d(values: np.ndarray, k: int, init: Init = Init.LINEAR, *, seed: int = 0,
              max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D ``values`` into at most ``k`` centroids.

    Args:
        values: the weights to share (float; any order).
        k: number of centroids (2**bits).
        init: initialisation of the centroids.
        seed: for ``random`` initialisation.
        max_iter: Lloyd iterations at most; it stops earlier when assignments no longer move.

    Returns:
        ``(centroids float32 [k'] ascending, codes int64 [n])`` with ``k' <= k`` and
        ``centroids[codes]`` the shared value of each weight. Empty clusters are dropped.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(1, dtype=np.float32), np.zeros(0, dtype=np.int64)
    xs = np.sort(values)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    centroids = np.sort(initial_centroids(xs, k, init, np.random.default_rng(seed)))
    bounds = None
    for _ in range(max_iter):
        # cluster j holds xs[bounds[j]:bounds[j+1]]: the values nearer to c_j than to its neighbours
        cuts = np.searchsorted(xs, (centroids[:-1] + centroids[1:]) / 2, side="right")
        new_bounds = np.concatenate([[0], cuts, [xs.size]])
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        counts = np.diff(bounds)
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        filled = counts > 0
        centroids = np.where(filled, sums / np.maximum(counts, 1), centroids)
    counts = np.diff(bounds)
    centroids = centroids[counts > 0].astype(np.float32)
    centroids = np.unique(centroids)  # float32 rounding can merge neighbours
    return centroids, nearest(values, centroids)


def nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending ``centroids`` for every value (ties go down)."""
    mids = (centroids[:-1].astype(np.float64) + centroids[1:]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.int64)


def sse(values: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> float:
    """Sum of squared errors of a clustering."""
    return float(np.sum((np.asarray(values, np.float64) - centroids[codes].astype(np.float64)) ** 2))
