"""The single-process reference: ``faiss.Kmeans`` on all rows at once, from the same seeded init as the shards."""

from __future__ import annotations

import time

import numpy as np

from dp4tl_ray.kmeans.backends import assign, probe_backend
from dp4tl_ray.kmeans.config import KMeansConfig, KMeansResult
from dp4tl_ray.kmeans.shards import LocalShards, Shard, init_from_shards


def kmeans_single(x: np.ndarray, cfg: KMeansConfig, ids: np.ndarray | None = None) -> KMeansResult:
    """Single-process ``faiss.Kmeans`` on all of ``x`` from the same seeded init (the reference).

    ``ids`` (default ``0..n-1``) are the rows' store ids: they draw the init rows, so passing a
    store's ids gives exactly the starting centroids that ``kmeans_distributed`` uses on it.
    ``phase_seconds`` splits the time into ``init``, ``iterations`` (faiss' training) and ``final_assign``.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    cfg.validate(n)
    times = [time.perf_counter()]
    init = init_from_shards(LocalShards([Shard(np.arange(n) if ids is None else ids, x, bounds=False)]), cfg, n)
    backend = probe_backend(use_gpu=faiss.get_num_gpus() > 0)
    gpu = backend.name == "faiss-gpu"
    times.append(time.perf_counter())
    km = faiss.Kmeans(d, cfg.k, niter=cfg.niter, seed=cfg.seed, spherical=cfg.spherical,
                      max_points_per_centroid=n, min_points_per_centroid=1, gpu=gpu)
    km.train(x, init_centroids=init)
    times.append(time.perf_counter())
    objective = [float(v) for v in km.obj]
    if cfg.spherical:  # faiss reports summed inner products; with unit centroids |x-c|^2 = |x|^2 + 1 - 2 x.c
        x_sq = float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        objective = [x_sq + n - 2 * v for v in objective]
    labels, _ = assign(x, km.centroids, backend)
    sizes = np.bincount(labels, minlength=cfg.k)
    times.append(time.perf_counter())
    phases = dict(zip(("init", "iterations", "final_assign"), np.diff(times).round(3).tolist()))
    return KMeansResult(km.centroids.copy(), objective, "faiss-gpu" if gpu else "faiss-cpu", sizes, None,
                        times[-1] - times[0], phases)
