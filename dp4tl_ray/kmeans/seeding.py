"""Seeded starting centroids: every row gets a key from (id, seed), the init sample is the rows with the
smallest keys (the same however the rows are split into shards), and k-means++ (or the first k rows)
picks the centroids from it on the driver.
"""

from __future__ import annotations

import numpy as np

from dp4tl_ray.kmeans.config import KMeansConfig


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer: distinct inputs give distinct, well-spread keys."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Seeded pseudo-random ``uint64`` key per row id; the init sample is the rows with the smallest keys.

    Keys depend only on (id, seed), so the sample is the same however rows are split into shards.
    """
    salt = _splitmix64(np.array([seed], np.uint64))
    return _splitmix64(np.asarray(ids).astype(np.uint64) ^ salt)


def key_threshold(parts: list[np.ndarray], m: int) -> np.uint64:
    """The ``m``-th smallest key over all shards' smallest-key lists (all of them if fewer)."""
    keys = np.sort(np.concatenate(parts))
    return keys[min(m, len(keys)) - 1]


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding: each step draws ``2 + ln k`` D^2-weighted candidates and keeps the one
    that lowers the potential most (plain k-means++ often seeds two centroids in one planted cluster).
    Deterministic for a given ``rng`` state.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    x_sq = np.einsum("ij,ij->i", x, x)
    trials = 2 + int(np.log(k))

    def sq_dists_to(rows: np.ndarray) -> np.ndarray:
        d2 = x @ (-2 * x[rows].T)
        d2 += x_sq[:, None]
        d2 += x_sq[rows]
        return np.maximum(d2, 0, out=d2)

    chosen = [int(rng.integers(len(x)))]
    best = sq_dists_to(np.array(chosen))[:, 0].copy()
    for _ in range(1, k):
        cum = np.cumsum(best, dtype=np.float64)
        if cum[-1] > 0:
            cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), len(x) - 1)
        else:  # fewer distinct points than k: any rows will do
            cand = rng.integers(len(x), size=trials)
        new_best = np.minimum(best[:, None], sq_dists_to(cand))
        t = int(np.argmin(new_best.sum(axis=0, dtype=np.float64)))
        chosen.append(int(cand[t]))
        best = new_best[:, t].copy()
    return x[chosen].copy()


def init_centroids(sample: np.ndarray, cfg: KMeansConfig) -> np.ndarray:
    """Starting centroids from the init sample (rows ordered by key, ``cfg.init_rows`` of them):
    seeded k-means++ on it, or with ``init="random"`` the sample itself (the k rows with the smallest
    keys: a seeded random pick, as faiss.Kmeans starts). Unit-normed in spherical mode.
    """
    if cfg.init == "random":
        cents = np.array(sample[: cfg.k], np.float32)
    else:
        cents = kmeans_plus_plus(sample, cfg.k, np.random.default_rng(cfg.seed))
    if cfg.spherical:
        cents /= np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    return cents


def rows_by_key(keys: np.ndarray, x: np.ndarray, threshold: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The keys and rows of ``x`` whose key is at most ``threshold`` (a shard's part of the init sample)."""
    sel = np.flatnonzero(keys <= threshold)
    return keys[sel], x[sel]


def smallest(keys: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` smallest of ``keys``, sorted (all of them if fewer)."""
    return np.sort(keys) if len(keys) <= m else np.sort(np.partition(keys, m - 1)[:m])


def ordered_sample(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Concatenate ``(keys, rows)`` parts and order the rows by key."""
    keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    return rows[np.argsort(keys, kind="stable")]
