"""1-D k-means for weight sharing.

Chosen: Lloyd's algorithm on the SORTED values. In one dimension every cluster
is a contiguous run of the sorted values, bounded by the midpoints between
neighbouring centroids; with prefix sums, one iteration is ``k`` binary searches
and ``k`` subtractions, O(k log n), after a single O(n log n) sort. A million
weights take milliseconds per iteration, so we can iterate to convergence.
The exact optimum (``kmeans_1d_optimal``: dynamic programming over the sorted
values, O(k n log n) by divide and conquer) buys little for sharing: Lloyd from
the paper's linear initialisation lands close to it on trained-like weights
(``python -m compress.bench codec`` measures how close), and the paper's accuracy
depends on that initialisation, not on the global optimum. It is the yardstick.
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


def kmeans_1d_optimal(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact least-squares clustering of 1-D ``values`` into at most ``k`` clusters.

    In one dimension an optimal cluster is a run of the sorted values, so the optimum is a
    dynamic programme over prefixes: ``D[m][j]``, the least sum of squared errors of the
    ``j`` smallest values in ``m`` clusters, is ``min over i of D[m-1][i] + cost(i, j)``,
    with ``cost`` from prefix sums. The best ``i`` never decreases as ``j`` grows, so each
    row is found by divide and conquer in O(n log n) (Gronlund et al., "Fast exact k-means,
    k-medians and Bregman divergence clustering in 1D", 2017); one numpy pass per level of
    the recursion evaluates every candidate of that level.

    Args:
        values: the values (float; any order).
        k: clusters at most.

    Returns:
        ``(centroids float64 [k'] ascending, codes int64 [n])``: the cluster means and each
        value's cluster, ``k' = min(k, distinct values)``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return np.zeros(1), np.zeros(0, dtype=np.int64)
    distinct, inverse, weight = np.unique(values, return_inverse=True, return_counts=True)
    k = min(k, distinct.size)
    # prefix sums of the (weighted, centred) distinct values: cost of a run in O(1)
    x = distinct - distinct.mean()
    w = np.concatenate([[0], np.cumsum(weight)]).astype(np.float64)
    s1 = np.concatenate([[0.0], np.cumsum(weight * x)])
    s2 = np.concatenate([[0.0], np.cumsum(weight * x * x)])
    n = distinct.size

    def cost(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # SSE of distinct[i:j] around its mean
        d = s1[j] - s1[i]
        return np.maximum((s2[j] - s2[i]) - d * d / (w[j] - w[i]), 0.0)

    best = np.concatenate([[np.inf], cost(np.zeros(n, dtype=np.int64), np.arange(1, n + 1))])  # D[1][j]
    cut = np.zeros((k, n + 1), dtype=np.int32)  # cut[m][j]: where the last of m + 1 clusters of j values begins
    for m in range(1, k):
        best, cut[m] = _next_row(best, cost, m + 1, n)
    # walk the cuts back from the whole set
    bounds, j = [n], n
    for m in range(k - 1, 0, -1):
        j = int(cut[m][j])
        bounds.append(j)
    bounds.append(0)
    starts = np.array(bounds[::-1])
    run = np.repeat(np.arange(k), np.diff(starts))  # cluster of each distinct value
    sums = np.add.reduceat(weight * distinct, starts[:-1])
    centroids = sums / np.add.reduceat(weight, starts[:-1])
    return centroids, run[inverse].astype(np.int64)


def _next_row(prev: np.ndarray, cost, clusters: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``D[clusters][j]`` for every ``j`` from ``D[clusters - 1]``, and the best cut of each.

    Divide and conquer, breadth first: every task ``(jlo, jhi, ilo, ihi)`` asks for the best
    cut ``i`` in ``[ilo, ihi]`` of each ``j`` in ``[jlo, jhi]``; its middle ``j`` is solved by
    trying every ``i`` (all tasks of a level at once), and its halves inherit narrower ranges.
    """
    row = np.full(n + 1, np.inf)
    cut = np.zeros(n + 1, dtype=np.int32)
    jlo, jhi = np.array([clusters]), np.array([n])
    ilo, ihi = np.array([clusters - 1]), np.array([n - 1])
    while jlo.size:
        mid = (jlo + jhi) // 2
        top = np.minimum(ihi, mid - 1)
        size = top - ilo + 1
        first = np.cumsum(size) - size
        i = np.repeat(ilo - first, size) + np.arange(int(size.sum()))
        j = np.repeat(mid, size)
        value = prev[i] + cost(i, j)
        low = np.minimum.reduceat(value, first)
        # the first i that reaches each task's minimum
        hit = np.flatnonzero(value == np.repeat(low, size))
        task = np.searchsorted(first, hit, side="right") - 1
        keep = np.concatenate([[True], task[1:] != task[:-1]])
        best_i = i[hit[keep]]
        row[mid], cut[mid] = low, best_i
        left, right = jlo <= mid - 1, mid + 1 <= jhi
        jlo, jhi, ilo, ihi = (np.concatenate([a[left], b[right]]) for a, b in
                              ((jlo, mid + 1), (mid - 1, jhi), (ilo, best_i), (best_i, ihi)))
    return row, cut
