"""The Lloyd step as pure numpy: per-cluster sums of a shard's rows, kept up to date as rows move, the new
centroids from the sums over all shards, the objective without per-row distances, and Hamerly's bounds
that let a shard skip the rows whose nearest centroid cannot have changed.

A shard only assigns its rows and returns per-centroid sums (faiss ``contrib/clustering.py``'s shape);
sums over shards add up to the sums over the whole, so where the shards live does not change the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

SPLIT_EPS = 1e-3  # relative size of the nudge that splits a large cluster to re-seed an empty one
MOVED_RECOUNT = 0.25  # above this share of a shard's rows changing cluster, its sums are recounted from scratch
# Hamerly bounds are kept loose by float32 rounding: squared distances from the BLAS expansion
# |x|^2 - 2 x.c + |c|^2 carry an absolute error of a few ulps of |x|^2 + |c|^2.
BOUND_SQ_TOL = 1e-5  # relative to |x|^2 + max |c|^2, added to (taken off) a squared upper (lower) bound
BOUND_REL_TOL = 1e-6  # relative slack on exactly recomputed distances
# Rows handled at once where a step gathers rows (open rows, rows sorted by cluster): temporary copies stay
# a few tens of MB instead of the shard's size, so an actor peaks near its shard plus the bounds.
CHUNK_ROWS = 1 << 15


def _chunks(n: int):
    """``slice``s covering ``range(n)`` in runs of ``CHUNK_ROWS``."""
    return (slice(s, min(s + CHUNK_ROWS, n)) for s in range(0, n, CHUNK_ROWS))


@dataclass
class Bounds:
    """Hamerly's bounds for the rows of one shard, valid for ``centroids``: each row's nearest
    centroid ``labels``, an ``upper`` bound on its distance to it and a ``lower`` bound on its distance
    to every other centroid (float64, plain - not squared - distances)."""

    labels: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    centroids: np.ndarray


def _half_gaps(centroids: np.ndarray) -> np.ndarray:
    """Half the distance from each centroid to its nearest other one (inf when k == 1)."""
    c = centroids.astype(np.float64)
    sq = np.einsum("ij,ij->i", c, c)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0)
    np.fill_diagonal(d2, np.inf)
    return 0.5 * np.sqrt(d2.min(axis=1)) * (1 - BOUND_REL_TOL) if len(c) > 1 else np.full(1, np.inf)


def _own_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact distance of each row of ``x`` to the centroid given for it (``centroids`` row-aligned or one
    row), float64, with ``BOUND_REL_TOL`` slack upwards: a valid upper bound."""
    diff = x - centroids
    return np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float64)) * (1 + BOUND_REL_TOL)


def bounded_assign(x: np.ndarray, centroids: np.ndarray, prev: Bounds | None,
                   search2: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> tuple[Bounds, int]:
    """Nearest centroid of every row of ``x`` (float32), searching only the rows whose Hamerly bounds
    (Hamerly 2010, "Making k-means even faster") leave the answer open: ``(bounds, rows searched)``.

    From ``prev`` (the bounds for the previous centroids), a row keeps its label when its upper bound,
    grown by how far its centroid moved, stays below both its lower bound (shrunk by how far any other
    centroid moved) and half the gap from its centroid to the nearest other one: by the triangle
    inequality no other centroid can be nearer. Otherwise its distance to its own centroid is
    recomputed exactly and the test repeated; rows still open get a full two-nearest search
    (``search2``). Bounds carry a float32 rounding margin, so a skipped row is one a full search
    would leave where it is; the labels are those of a full search (up to exact ties).
    """
    n, k = len(x), len(centroids)
    cents = np.ascontiguousarray(centroids, dtype=np.float32)
    c_sq_max = float(np.max(np.einsum("ij,ij->i", cents, cents)))
    if prev is None or prev.centroids.shape != cents.shape:
        rows = np.arange(n)
        labels, upper, lower = np.zeros(n, np.int64), np.zeros(n), np.full(n, np.inf)
    else:
        labels = prev.labels.copy()
        delta = np.linalg.norm(cents.astype(np.float64) - prev.centroids, axis=1)
        upper = prev.upper + delta[labels]
        if k > 1:  # every other centroid moved at most the largest delta (the runner-up's, for the largest's own rows)
            first, second = np.argsort(delta)[::-1][:2]
            lower = prev.lower - np.where(labels == first, delta[second], delta[first])
        else:
            lower = prev.lower
        bound = np.maximum(lower, _half_gaps(cents)[labels])
        open_rows = np.flatnonzero(upper > bound)
        still_open = []
        for part in _chunks(len(open_rows)):  # tighten the upper bound to the exact distance, then test again
            rows_part = open_rows[part]
            exact = _own_distances(x[rows_part], cents[labels[rows_part]])
            upper[rows_part] = exact
            still_open.append(rows_part[exact > bound[rows_part]])
        rows = np.concatenate(still_open) if still_open else open_rows
    for part in _chunks(len(rows)):
        rows_part = rows[part]
        # a run of consecutive rows is a view of x; any other set of rows a chunk-sized copy
        xr = x[rows_part[0] : rows_part[-1] + 1] if rows_part[-1] - rows_part[0] + 1 == len(rows_part) else x[rows_part]
        if k > 1:
            idx, sq = search2(np.ascontiguousarray(xr), cents)
            tol = BOUND_SQ_TOL * (np.einsum("ij,ij->i", xr, xr, dtype=np.float64) + c_sq_max)
            labels[rows_part] = idx[:, 0]
            upper[rows_part] = np.sqrt(sq[:, 0].astype(np.float64) + tol)
            lower[rows_part] = np.sqrt(np.maximum(sq[:, 1].astype(np.float64) - tol, 0))
        else:  # one centroid: every row is its; the lower bound stays inf
            labels[rows_part] = 0
            upper[rows_part] = _own_distances(xr, cents[:1])
    return Bounds(labels, upper, lower, cents.astype(np.float64)), len(rows)


def objective_from_sums(x_sq_total: float, centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> float:
    """Sum over rows of ``|x - c_label|^2`` from per-cluster sums: ``sum|x|^2 - 2 sum_j c_j.S_j + sum_j n_j |c_j|^2``
    (float64; what a full search's distances add up to, without them)."""
    c = centroids.astype(np.float64)
    return float(x_sq_total - 2 * np.einsum("ij,ij->", c, sums) + np.dot(counts, np.einsum("ij,ij->i", c, c)))


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-centroid ``sums float64[k, d]`` of the rows of ``x``: each run of ``CHUNK_ROWS`` rows (in stored
    order) is sorted by cluster and summed, and the runs' sums added in order (deterministic; no copy of
    more than one run's rows)."""
    sums = np.zeros((k, x.shape[1]), np.float64)
    for part in _chunks(len(x)):
        lab = labels[part]
        counts = np.bincount(lab, minlength=k)
        # a stable sort of 16-bit keys is a radix sort: ~10x faster than sorting the int64 labels
        order = np.argsort(lab.astype(np.uint16) if k <= 1 << 16 else lab, kind="stable")
        rows = x[part].take(order, axis=0)
        present = np.flatnonzero(counts)
        starts = np.concatenate(([0], np.cumsum(counts)))[present]
        sums[present] += np.add.reduceat(rows, starts, axis=0, dtype=np.float64)
    return sums


def moved_sums(sums: np.ndarray, x: np.ndarray, old_labels: np.ndarray, new_labels: np.ndarray) -> np.ndarray:
    """The sums for ``new_labels`` from the ``sums`` for ``old_labels``: only rows that changed cluster are
    read, subtracted from their old cluster and added to their new one (float64, deterministic).

    After the first few Lloyd iterations few rows move, so this costs a fraction of ``cluster_sums``.
    """
    moved = np.flatnonzero(old_labels != new_labels)
    if len(moved) == 0:
        return sums.copy()
    rows = x.take(moved, axis=0)
    k = len(sums)
    return sums - cluster_sums(rows, old_labels[moved], k) + cluster_sums(rows, new_labels[moved], k)


def running_sums(x: np.ndarray, labels: np.ndarray, k: int, prev: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Per-centroid sums for ``labels``: moved on from ``prev`` (the previous step's labels and sums)
    while at most ``MOVED_RECOUNT`` of the rows changed cluster, else recounted by ``cluster_sums``.
    """
    if prev is not None and len(prev[1]) == k and np.count_nonzero(labels != prev[0]) <= MOVED_RECOUNT * len(labels):
        return moved_sums(prev[1], x, prev[0], labels)
    return cluster_sums(x, labels, k)


def update_centroids(
    sums: np.ndarray, counts: np.ndarray, old_centroids: np.ndarray, spherical: bool, rng: np.random.Generator
) -> np.ndarray:
    """New float32 centroids = sums / counts; each empty cluster re-seeded by splitting the largest.

    A split moves the largest cluster's centroid a small random step one way and puts the empty one
    the same step the other way, halving its count (so several empties split different clusters).
    An empty cluster with nothing to split (fewer points than clusters) keeps its old centroid.
    Spherical mode scales every centroid to unit norm.
    """
    counts = np.asarray(counts, np.int64).copy()
    cents = np.asarray(old_centroids, np.float64).copy()
    full = counts > 0
    cents[full] = sums[full] / counts[full, None]
    for e in np.flatnonzero(~full):
        j = int(np.argmax(counts))
        if counts[j] < 2:
            break
        scale = np.linalg.norm(cents[j]) or 1.0
        step = rng.standard_normal(cents.shape[1]) * (SPLIT_EPS * scale / np.sqrt(cents.shape[1]))
        cents[e], cents[j] = cents[j] + step, cents[j] - step
        counts[e] = counts[j] // 2
        counts[j] -= counts[e]
    if spherical:
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    return cents.astype(np.float32)
