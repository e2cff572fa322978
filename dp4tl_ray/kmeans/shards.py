"""Shards that can assign and sum, and the k-means driver that runs over any group of them.

A ``Shard`` holds some rows and what one Lloyd step leaves for the next (running sums, Hamerly bounds).
A group of shards (``Shards``) answers each call once per shard, in a fixed order: faiss
``contrib/clustering.py``'s ``DatasetAssign`` contract (assign to the centroids, return per-centroid
sums) split over shards whose rows never leave them. ``kmeans_on_shards`` runs the seeded init, the
Lloyd iterations and the final assignment over any group: ``LocalShards`` in this process, or the Ray
actors of ``distributed.ActorShards``, with the same result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dp4tl_ray.kmeans.backends import AssignBackend, FaissCpuBackend, assign
from dp4tl_ray.kmeans.config import KMeansConfig
from dp4tl_ray.kmeans.lloyd import Bounds, bounded_assign, objective_from_sums, running_sums, update_centroids
from dp4tl_ray.kmeans.seeding import init_centroids, key_threshold, ordered_sample, rows_by_key, sample_keys, smallest
from dp4tl_ray.progress import EVERY_S, Progress



class Shard:
    """Rows of one shard (``ids``, float32 ``x``) and the Lloyd-step state kept for them between iterations.

    With ``bounds`` and a backend that offers a bounded search, a step searches only the rows whose
    nearest centroid may have changed (``bounded_assign``); otherwise every row, every step.
    """

    def __init__(self, ids: np.ndarray, x: np.ndarray, backend: AssignBackend | None = None, bounds: bool = True):
        self.ids, self.x = ids, x
        self.backend = backend or FaissCpuBackend()
        self.xq = self.backend.put(x)
        self.labels: np.ndarray | None = None  # the last step's assignment and its sums
        self.sums: np.ndarray | None = None
        self.bounded = bounds and self.backend.bounded_search
        self.bounds: Bounds | None = None  # Hamerly bounds after the last step (bounded mode)
        self.x_sq_total = float(np.einsum("ij,ij->", x, x, dtype=np.float64)) if self.bounded else 0.0
        self.searched = 0  # rows searched in full, over all steps

    def rows_searched(self) -> int:
        return self.searched

    def smallest_keys(self, seed: int, m: int) -> np.ndarray:
        return smallest(sample_keys(self.ids, seed), m)

    def sample_rows(self, seed: int, threshold: np.uint64) -> tuple[np.ndarray, np.ndarray]:
        return rows_by_key(sample_keys(self.ids, seed), self.x, threshold)

    def step(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        """One Lloyd step on the shard: ``sums, counts, objective`` and the seconds it computed."""
        t0 = time.perf_counter()
        k = len(centroids)
        if self.bounded:
            self.bounds, searched = bounded_assign(self.x, centroids, self.bounds, self.backend.search2)
            labels, sq = self.bounds.labels, None
        else:
            labels, sq = assign(self.xq, centroids, self.backend)
            searched = len(labels)
        self.searched += searched
        prev = None if self.labels is None else (self.labels, self.sums)
        self.labels, self.sums = labels, running_sums(self.x, labels, k, prev)
        counts = np.bincount(labels, minlength=k).astype(np.int64)
        objective = objective_from_sums(self.x_sq_total, centroids, self.sums, counts) if sq is None else \
            float(np.sum(sq, dtype=np.float64))
        return self.sums, counts, objective, time.perf_counter() - t0

    def final_assign(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``ids, cluster int32, sq_dist float32`` of every row for the final centroids (a full search)."""
        labels, sq = assign(self.xq, centroids, self.backend)
        return self.ids, labels.astype(np.int32), sq.astype(np.float32)


class Shards:
    """A group of shards: each call is answered once per shard, in shard order (sums are added in that
    order, so a group gives the same centroids wherever its shards live). Subclasses say how a shard is called."""

    def call(self, method: str, *args) -> list:
        """``Shard.<method>(*args)`` on every shard, answers in shard order."""
        raise NotImplementedError

    def smallest_keys(self, seed: int, m: int) -> list[np.ndarray]:
        return self.call("smallest_keys", seed, m)

    def sample_rows(self, seed: int, threshold: np.uint64) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.call("sample_rows", seed, threshold)

    def step(self, centroids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
        return self.call("step", centroids)

    def final_assign(self, centroids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self.call("final_assign", centroids)

    def rows_searched(self) -> list[int]:
        return self.call("rows_searched")


class LocalShards(Shards):
    """Shards held in this process (no Ray): the reference for what the actors compute, and the way to cluster in memory."""

    def __init__(self, shards: list[Shard]):
        self.shards = list(shards)

    def call(self, method: str, *args) -> list:
        return [getattr(shard, method)(*args) for shard in self.shards]


@dataclass
class LloydRun:
    """What ``kmeans_on_shards`` found: centroids, objective per iteration, every row's final assignment
    (sorted by id), rows searched in full, the slowest shard's compute seconds summed over iterations,
    and the seconds of its phases (``init``, ``iterations``, ``final_assign``)."""

    centroids: np.ndarray
    objective: list[float]
    ids: np.ndarray
    labels: np.ndarray
    sq: np.ndarray
    rows_searched: int
    compute_seconds: float
    phase_seconds: dict[str, float]


def init_from_shards(shards: Shards, cfg: KMeansConfig, n: int, keys: list[np.ndarray] | None = None) -> np.ndarray:
    """Starting centroids on the driver from the rows with the ``cfg.init_rows`` smallest keys gathered from the
    shards (``keys``: their ``smallest_keys`` answers, when already asked for)."""
    m = min(cfg.init_rows, n)
    threshold = key_threshold(shards.smallest_keys(cfg.seed, m) if keys is None else keys, m)
    return init_centroids(ordered_sample(shards.sample_rows(cfg.seed, threshold)), cfg)


def lloyd_iterations(shards: Shards, centroids: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, list[float], float]:
    """``cfg.niter`` Lloyd iterations: every shard assigns and sums its rows, the sums are added in shard order,
    the centroids updated. Also returns the seconds the slowest shard spent computing, summed over
    iterations (the rest of the iterations' wall time is moving centroids and sums, and the update).
    """
    rng = np.random.default_rng(cfg.seed)
    objective, compute = [], 0.0
    shown = Progress("k-means", total=cfg.niter, unit="iterations", every_s=EVERY_S)
    searched = sum(shards.rows_searched())
    for it in range(cfg.niter):
        parts = shards.step(centroids)
        sums, counts = parts[0][0].copy(), parts[0][1].copy()
        for part_sums, part_counts, *_ in parts[1:]:
            sums += part_sums
            counts += part_counts
        objective.append(float(sum(p[2] for p in parts)))
        compute += max(p[3] for p in parts)
        before, searched = searched, sum(shards.rows_searched())
        shown.update(it + 1, k=len(centroids), objective=objective[-1], rows_searched=searched - before)
        centroids = update_centroids(sums, counts, centroids, cfg.spherical, rng)
    return centroids, objective, compute


def kmeans_on_shards(shards: Shards, cfg: KMeansConfig, n: int, keys: list[np.ndarray] | None = None) -> LloydRun:
    """Seeded init, ``cfg.niter`` Lloyd iterations and the final assignment over a group of shards holding
    ``n`` rows in all (``keys``: the shards' ``smallest_keys`` answers, when already asked for)."""
    times = [time.perf_counter()]
    centroids = init_from_shards(shards, cfg, n, keys)
    times.append(time.perf_counter())
    centroids, objective, compute = lloyd_iterations(shards, centroids, cfg)
    times.append(time.perf_counter())
    parts = shards.final_assign(centroids)
    searched = sum(shards.rows_searched())
    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids, kind="stable")
    labels = np.concatenate([p[1] for p in parts])[order]
    sq = np.concatenate([p[2] for p in parts])[order]
    times.append(time.perf_counter())
    phases = dict(zip(("init", "iterations", "final_assign"), np.diff(times).round(3).tolist()))
    return LloydRun(centroids, objective, ids[order], labels, sq, searched, compute, phases)
