"""Distributed Lloyd k-means over Ray actors (Feature Mapping's clusters), with a FAISS reference.

The Lloyd step is pure numpy (``assign`` -> ``partial_sums`` -> ``update_centroids``), shaped like
faiss ``contrib/clustering.py``: a shard only has to assign its rows and return per-centroid sums.
Ray only moves centroids (k x d) to the shard actors and sums back; features never leave an actor.
Results land next to the features in ``<store>/kmeans/k<k>-seed<seed>[-spherical]/``.

On the CPU a shard skips the rows whose nearest centroid provably cannot have changed (Hamerly's
bounds, ``bounded_assign``): the assignment is the one a full search gives, at a fraction of its cost
once the centroids settle. ``KMeansConfig.bounds = False`` searches every row every iteration.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_matrix

log = logging.getLogger(__name__)

SPLIT_EPS = 1e-3  # relative size of the nudge that splits a large cluster to re-seed an empty one
MOVED_RECOUNT = 0.25  # above this share of a shard's rows changing cluster, its sums are recounted from scratch
INITS = ("kmeans++", "random")
INLINE_BYTES = 100 << 10  # centroids up to this size ride inside the task (Ray's own inline limit); larger: one ray.put
READ_BATCH_ROWS = 4096  # rows per decoded batch when a shard actor reads its files
READ_BUFFER_BYTES = 1 << 20  # parquet read buffer (streamed, not the whole column chunk at once)
TORCH_CHUNK_BYTES = 256 << 20  # GPU memory for one chunk of the (rows x k) distance matrix
# Hamerly bounds are kept loose by float32 rounding: squared distances from the BLAS expansion
# |x|^2 - 2 x.c + |c|^2 carry an absolute error of a few ulps of |x|^2 + |c|^2.
BOUND_SQ_TOL = 1e-5  # relative to |x|^2 + max |c|^2, added to (taken off) a squared upper (lower) bound
BOUND_REL_TOL = 1e-6  # relative slack on exactly recomputed distances


@dataclass
class KMeansConfig:
    """One k-means run: clusters, iterations, seed, and how many shard actors to use."""

    k: int
    niter: int = 20
    seed: int = 0
    spherical: bool = False  # unit-norm centroids (cosine k-means on L2-normalised features)
    num_actors: int = 2
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    init: str = "kmeans++"  # "kmeans++" on init_sample rows, or "random": k seeded rows (faiss.Kmeans' own init)
    init_sample: int = 100_000  # rows used for k-means++ init
    bounds: bool = True  # CPU shards skip rows whose nearest centroid cannot have changed (same result)

    def validate(self, n_rows: int) -> None:
        """Raise UserError naming the fix for a config that cannot cluster ``n_rows`` points."""
        if self.k < 1:
            raise UserError(f"k must be >= 1, got {self.k}")
        if self.k > n_rows:
            raise UserError(f"k={self.k} exceeds the {n_rows} rows to cluster; choose k <= {n_rows}")
        if self.niter < 1:
            raise UserError(f"niter must be >= 1, got {self.niter}")
        if not 0 <= self.seed < 2**31:
            raise UserError(f"seed must be in [0, 2**31), got {self.seed}")
        if self.num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise UserError("num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0")
        if self.init not in INITS:
            raise UserError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "kmeans++" and self.init_sample < self.k:
            raise UserError(f"init_sample={self.init_sample} is below k={self.k}; raise init_sample to at least k")

    @property
    def name(self) -> str:
        """Directory name of this run's result under ``<store>/kmeans/``."""
        return f"k{self.k}-seed{self.seed}" + ("-spherical" if self.spherical else "") + (
            "-random" if self.init == "random" else "")

    @property
    def init_rows(self) -> int:
        """How many seeded rows the init reads: the k-means++ sample, or the k random starting points."""
        return self.init_sample if self.init == "kmeans++" else self.k


@dataclass
class KMeansResult:
    """Centroids, objective per iteration (sum of squared L2 distances), and where the result lives."""

    centroids: np.ndarray
    objective: list[float]
    backend: str
    sizes: np.ndarray
    out_dir: Path | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)


# --- assignment backends ---------------------------------------------------------------------------


class FaissCpuBackend:
    """Exact nearest centroid with FAISS brute force on the CPU (BLAS, OpenMP threads)."""

    name = "faiss-cpu"

    def put(self, x: np.ndarray):
        return x

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        sq, labels = faiss.knn(x, centroids, 1)
        return labels.ravel(), np.maximum(sq.ravel(), 0)

    def search2(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The two nearest centroids of each row: ``labels int64[n, 2], sq_dists float32[n, 2]`` (k >= 2)."""
        import faiss

        sq, labels = faiss.knn(x, centroids, 2)
        return labels, np.maximum(sq, 0)


class FaissGpuBackend(FaissCpuBackend):
    """FAISS brute force on GPU 0 (needs a faiss-gpu build with kernels for this GPU)."""

    name = "faiss-gpu"

    def __init__(self):
        import faiss

        self.res = faiss.StandardGpuResources()

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        sq, labels = faiss.knn_gpu(self.res, x, centroids, 1)
        return labels.ravel().astype(np.int64), np.maximum(sq.ravel(), 0)


class TorchBackend:
    """Chunked ``|x|^2 - 2 x.c + |c|^2`` matmul + argmin with torch (fp32, no TF32); ``torch-cuda`` on a GPU."""

    def __init__(self, device: str = "cuda", chunk_bytes: int = TORCH_CHUNK_BYTES):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"torch-{self.device.type}"
        self.chunk_bytes = chunk_bytes

    def put(self, x: np.ndarray):
        """Keep the shard on the device when it fits; otherwise chunks are copied each search."""
        try:
            return self.torch.from_numpy(x).to(self.device)
        except self.torch.OutOfMemoryError:
            return x

    def search(self, x, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)
        c_sq = (c * c).sum(1)
        rows = max(1, self.chunk_bytes // (4 * len(c)))
        labels, sq = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            for s in range(0, len(x), rows):
                xb = torch.as_tensor(x[s : s + rows], device=self.device)
                dist = (xb * xb).sum(1, keepdim=True) - 2 * (xb @ c.T) + c_sq
                best, idx = dist.min(1)
                labels[s : s + rows] = idx.cpu().numpy()
                sq[s : s + rows] = best.clamp_min_(0).cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return labels, sq


AssignBackend = FaissCpuBackend | FaissGpuBackend | TorchBackend


def _search_works(backend: AssignBackend) -> bool:
    """Probe a backend on a tiny problem whose answer is known."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    x = c[::-1] + np.float32(1e-3)
    try:
        labels, _ = backend.search(backend.put(np.ascontiguousarray(x)), c)
    except Exception as e:  # e.g. CUDA "no kernel image is available for execution on the device"
        log.warning("k-means backend %s failed its probe: %s", backend.name, str(e).splitlines()[0] if str(e) else e)
        return False
    return np.array_equal(labels, np.arange(16)[::-1])


@functools.cache
def probe_backend(use_gpu: bool) -> AssignBackend:
    """The assignment backend for this process: FAISS GPU, else torch CUDA, else FAISS CPU (logged)."""
    backend: AssignBackend = FaissCpuBackend()
    if use_gpu:
        import faiss

        candidates = []
        if faiss.get_num_gpus() > 0:
            candidates.append(FaissGpuBackend)
        try:
            import torch

            if torch.cuda.is_available():
                candidates.append(TorchBackend)
        except ImportError:
            pass
        for make in candidates:
            try:
                cand = make()
            except Exception as e:
                log.warning("k-means backend %s unavailable: %s", make.__name__, e)
                continue
            if _search_works(cand):
                backend = cand
                break
    log.info("k-means assignment backend: %s", backend.name)
    return backend


# --- the Lloyd step (pure numpy) -------------------------------------------------------------------


def assign(x, centroids: np.ndarray, backend: AssignBackend | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per row: ``labels int64[n], sq_dists float32[n]`` (squared L2).

    ``x`` is a float32 matrix, or what ``backend.put`` returned for it (a GPU tensor for torch).
    """
    backend = backend or FaissCpuBackend()
    return backend.search(x, np.ascontiguousarray(centroids, dtype=np.float32))


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
        if len(open_rows):  # tighten the upper bound to the exact distance, then test again
            exact = _own_distances(x[open_rows], cents[labels[open_rows]])
            upper[open_rows] = exact
            open_rows = open_rows[exact > bound[open_rows]]
        rows = open_rows
    if len(rows):
        xr = x[rows] if len(rows) < n else x
        if k > 1:
            idx, sq = search2(np.ascontiguousarray(xr), cents)
            tol = BOUND_SQ_TOL * (np.einsum("ij,ij->i", xr, xr, dtype=np.float64) + c_sq_max)
            labels[rows] = idx[:, 0]
            upper[rows] = np.sqrt(sq[:, 0].astype(np.float64) + tol)
            lower[rows] = np.sqrt(np.maximum(sq[:, 1].astype(np.float64) - tol, 0))
        else:  # one centroid: every row is its; the lower bound stays inf
            labels[rows] = 0
            upper[rows] = _own_distances(xr, cents[:1])
    return Bounds(labels, upper, lower, cents.astype(np.float64)), len(rows)


def objective_from_sums(x_sq_total: float, centroids: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> float:
    """Sum over rows of ``|x - c_label|^2`` from per-cluster sums: ``sum|x|^2 - 2 sum_j c_j.S_j + sum_j n_j |c_j|^2``
    (float64; what a full search's distances add up to, without them)."""
    c = centroids.astype(np.float64)
    return float(x_sq_total - 2 * np.einsum("ij,ij->", c, sums) + np.dot(counts, np.einsum("ij,ij->i", c, c)))


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per-centroid ``sums float64[k, d]`` of the rows of ``x``, added in stored order within each cluster."""
    counts = np.bincount(labels, minlength=k)
    # a stable sort of 16-bit keys is a radix sort: ~10x faster than sorting the int64 labels
    order = np.argsort(labels.astype(np.uint16) if k <= 1 << 16 else labels, kind="stable")
    rows = x.take(order, axis=0)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    sums = np.zeros((k, x.shape[1]), np.float64)
    for j in np.flatnonzero(counts):
        sums[j] = rows[bounds[j] : bounds[j + 1]].sum(axis=0, dtype=np.float64)
    return sums


def partial_sums(x: np.ndarray, labels: np.ndarray, sq_dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-centroid ``sums float64[k, d]``, ``counts int64[k]`` and the shard's objective.

    Rows are added in their stored order within each cluster, in float64, so the result is the
    same on every run; sums over shards add up to the sums over the whole.
    """
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return cluster_sums(x, labels, k), counts, float(np.sum(sq_dists, dtype=np.float64))


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


def key_threshold(smallest_keys: list[np.ndarray], m: int) -> np.uint64:
    """The ``m``-th smallest key over all shards' smallest-key lists (all of them if fewer)."""
    keys = np.sort(np.concatenate(smallest_keys))
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


def _rows_by_key(keys: np.ndarray, x: np.ndarray, threshold: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    sel = np.flatnonzero(keys <= threshold)
    return keys[sel], x[sel]


def _smallest(keys: np.ndarray, m: int) -> np.ndarray:
    return np.sort(keys) if len(keys) <= m else np.sort(np.partition(keys, m - 1)[:m])


def _sample_from(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Concatenate ``(keys, rows)`` parts and order the rows by key."""
    keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    return rows[np.argsort(keys, kind="stable")]


# --- Ray plumbing ----------------------------------------------------------------------------------


def read_shard(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``ids int64[n], features float32[n, d]`` of some FeatureStore parquet files, in file order.

    Streamed in small batches into arrays sized from the footers, so the only sizeable new memory
    is the result: Arrow's decode buffers stay small and are reused batch after batch (reading
    whole row groups allocated ~5x the features in transient buffers, and fresh memory is slow to
    touch on VMs that hand idle memory back). ``ParquetFile`` also skips the ``pyarrow.dataset``
    import that ``pq.read_table`` pays on first use.
    """
    files = [pq.ParquetFile(p, buffer_size=READ_BUFFER_BYTES, pre_buffer=False) for p in paths]
    n = sum(f.metadata.num_rows for f in files)
    d = files[0].schema_arrow.field("feature").type.list_size
    ids, x = np.empty(n, np.int64), np.empty((n, d), np.float32)
    start = 0
    for f in files:
        for batch in f.iter_batches(batch_size=READ_BATCH_ROWS, columns=["id", "feature"], use_threads=False):
            end = start + batch.num_rows
            ids[start:end] = batch.column(0).to_numpy()
            x[start:end] = feature_matrix(batch.column(1))
            start = end
    return ids, x


class ShardWorker:
    """Holds one group of parquet files in memory and runs the Lloyd step on it (a Ray actor)."""

    def __init__(self, paths: list[str], use_gpu: bool = False, threads: int = 1, bounds: bool = True):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        t0 = time.perf_counter()
        self.ids, self.x = read_shard([Path(p) for p in paths])
        self.read_seconds = time.perf_counter() - t0
        self.backend = probe_backend(use_gpu)
        self.xq = self.backend.put(self.x)
        self.labels: np.ndarray | None = None  # the last step's assignment and its sums
        self.sums: np.ndarray | None = None
        self.bounded = bounds and type(self.backend) is FaissCpuBackend  # GPU backends search in full: cheap there
        self.bounds: Bounds | None = None  # Hamerly bounds after the last step (bounded mode)
        self.x_sq_total = float(np.einsum("ij,ij->", self.x, self.x, dtype=np.float64)) if self.bounded else 0.0
        self.searched = 0  # rows searched in full, over all steps

    def info(self) -> tuple[int, str, float]:
        """Rows held, assignment backend, seconds spent reading the shard."""
        return len(self.ids), self.backend.name, self.read_seconds

    def rows_searched(self) -> int:
        return self.searched

    def smallest_keys(self, seed: int, m: int) -> np.ndarray:
        return _smallest(sample_keys(self.ids, seed), m)

    def sample_rows(self, seed: int, threshold: np.uint64) -> tuple[np.ndarray, np.ndarray]:
        return _rows_by_key(sample_keys(self.ids, seed), self.x, threshold)

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
        labels, sq = assign(self.xq, centroids, self.backend)
        return self.ids, labels.astype(np.int32), sq.astype(np.float32)


def _reusable(out_dir: Path, meta: dict) -> dict | None:
    """The stored kmeans.json when ``out_dir`` holds a complete result for exactly ``meta``'s inputs."""
    path = out_dir / "kmeans.json"
    if not (path.is_file() and (out_dir / "centroids.npy").is_file() and (out_dir / "assign.parquet").is_file()):
        return None
    stored = json.loads(path.read_text())
    return stored if all(stored.get(key) == value for key, value in meta.items()) else None


def _write_result(out_dir: Path, centroids: np.ndarray, ids: np.ndarray, labels: np.ndarray, sq: np.ndarray, doc: dict) -> None:
    with atomic.directory(out_dir) as tmp:
        np.save(tmp / "centroids.npy", centroids)
        table = pa.table({"id": pa.array(ids, pa.int64()), "cluster": pa.array(labels, pa.int32()),
                          "sq_dist": pa.array(sq, pa.float32())})
        pq.write_table(table, tmp / "assign.parquet")
        atomic.write_json(tmp / "kmeans.json", doc)


def _check_resources(num_actors: int, cfg: KMeansConfig) -> None:
    """Fail fast instead of waiting forever for actors the Ray cluster can never place."""
    import ray

    have = ray.cluster_resources()
    for res, per_actor, knob in (("CPU", cfg.num_cpus_per_actor, "num_cpus_per_actor"),
                                 ("GPU", cfg.num_gpus_per_actor, "num_gpus_per_actor")):
        if num_actors * per_actor > have.get(res, 0):
            raise UserError(f"{num_actors} k-means actors x {per_actor} {res} exceed the cluster's "
                            f"{have.get(res, 0):g} {res}; lower num_actors or {knob}")


def _init_from_actors(actors: list, cfg: KMeansConfig, n: int, smallest: list | None = None) -> np.ndarray:
    """Starting centroids on the driver from the rows with the ``cfg.init_rows`` smallest keys, gathered
    from the actors (``smallest``: their already requested ``smallest_keys`` refs)."""
    import ray

    m = min(cfg.init_rows, n)
    smallest = smallest or [a.smallest_keys.remote(cfg.seed, m) for a in actors]
    threshold = key_threshold(ray.get(smallest), m)
    return init_centroids(_sample_from(ray.get([a.sample_rows.remote(cfg.seed, threshold) for a in actors])), cfg)


def _lloyd_on_actors(actors: list, centroids: np.ndarray, cfg: KMeansConfig) -> tuple[np.ndarray, list[float], float]:
    """``cfg.niter`` Lloyd iterations: broadcast centroids, add the actors' sums in actor order, update.

    Also returns the seconds the slowest actor spent computing, summed over iterations (the rest of
    the iterations' wall time is Ray's messaging and the driver's update).
    """
    import ray

    rng = np.random.default_rng(cfg.seed)
    objective, compute = [], 0.0
    for it in range(cfg.niter):
        ref = centroids if centroids.nbytes <= INLINE_BYTES else ray.put(centroids)
        parts = ray.get([a.step.remote(ref) for a in actors])
        sums, counts = parts[0][0].copy(), parts[0][1].copy()
        for part_sums, part_counts, *_ in parts[1:]:
            sums += part_sums
            counts += part_counts
        objective.append(float(sum(p[2] for p in parts)))
        compute += max(p[3] for p in parts)
        log.debug("k-means iteration %d: objective %.6g", it, objective[-1])
        centroids = update_centroids(sums, counts, centroids, cfg.spherical, rng)
    return centroids, objective, compute


def kmeans_distributed(store_dir: str | Path, cfg: KMeansConfig) -> KMeansResult:
    """Lloyd k-means over a FeatureStore with one Ray actor per group of shards; reuses a finished run.

    Per iteration only the centroids go out (inline when small, else one ``ray.put``) and per-actor float64
    sums, counts and objective come back, added in actor order so the same seed and data give the same centroids.
    ``phase_seconds`` splits the wall time: ``load`` (actor start-up, shard reads, init keys; of which
    ``shard_read`` is the slowest actor's read), ``init``, ``iterations`` (of which ``iteration_compute``
    is the slowest actor's Lloyd steps), ``final_assign`` and ``write``; ``ray.init`` (when this call
    starts Ray) is not counted.
    """
    import ray

    store = FeatureStore.open(store_dir)
    n, d = store.num_rows, store.dim
    cfg.validate(n)
    out_dir = store.path / "kmeans" / cfg.name
    meta = {"k": cfg.k, "d": d, "niter": cfg.niter, "seed": cfg.seed, "spherical": cfg.spherical, "init": cfg.init,
            "init_sample": cfg.init_sample, "n_rows": n, "manifest_sha256": atomic.sha256_file(store.path / MANIFEST)}
    stored = _reusable(out_dir, meta)
    if stored is not None:
        log.info("k-means result %s is up to date: reusing it", out_dir)
        return KMeansResult(np.load(out_dir / "centroids.npy"), stored["objective"], stored["backend"],
                            np.asarray(stored["sizes"], np.int64), out_dir, stored["seconds"],
                            stored.get("phase_seconds", {}))
    files = store.files
    if not files:
        raise UserError(f"FeatureStore {store.path} has no parquet files; re-run `dp4tl extract`")

    times = [time.perf_counter()]
    groups = np.array_split(np.array([str(f) for f in files], dtype=object), min(cfg.num_actors, len(files)))
    _check_resources(len(groups), cfg)
    worker = ray.remote(ShardWorker).options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
    actors = [worker.remote(list(g), cfg.num_gpus_per_actor > 0, int(cfg.num_cpus_per_actor), cfg.bounds) for g in groups]
    try:
        # queued behind each actor's start-up: one wait covers start, shard reads and the init keys
        info_refs = [a.info.remote() for a in actors]
        smallest = [a.smallest_keys.remote(cfg.seed, min(cfg.init_rows, n)) for a in actors]
        infos = ray.get(info_refs)
        if sum(i[0] for i in infos) != n:
            raise UserError(f"FeatureStore {store.path} holds {sum(i[0] for i in infos)} rows, manifest says {n}; re-extract it")
        backend = "+".join(sorted({i[1] for i in infos}))
        ray.wait(smallest, num_returns=len(smallest))
        times.append(time.perf_counter())
        centroids = _init_from_actors(actors, cfg, n, smallest)
        times.append(time.perf_counter())
        centroids, objective, compute = _lloyd_on_actors(actors, centroids, cfg)
        times.append(time.perf_counter())
        ref = ray.put(centroids)
        parts = ray.get([a.final_assign.remote(ref) for a in actors])
        searched = sum(ray.get([a.rows_searched.remote() for a in actors]))
    finally:
        for a in actors:
            ray.kill(a)

    ids = np.concatenate([p[0] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise UserError(f"FeatureStore {store.path} has duplicate ids; re-extract it")
    labels = np.concatenate([p[1] for p in parts])[order]
    sq = np.concatenate([p[2] for p in parts])[order]
    sizes = np.bincount(labels, minlength=cfg.k)
    times.append(time.perf_counter())
    phases = dict(zip(("load", "init", "iterations", "final_assign"), np.diff(times).round(3).tolist()))
    phases["shard_read"] = round(max(i[2] for i in infos), 3)  # part of load
    phases["iteration_compute"] = round(compute, 3)  # part of iterations
    phases["rows_searched_fraction"] = round(searched / (n * cfg.niter), 4)  # < 1: bounds skipped the rest
    seconds = times[-1] - times[0]
    log.info("k-means %d x %d, k=%d on %d actors (%s) in %.2fs: %s", n, d, cfg.k, len(actors), backend, seconds, phases)
    doc = {**meta, "objective": objective, "final_objective": float(np.sum(sq, dtype=np.float64)), "backend": backend,
           "num_actors": len(actors), "sizes": sizes.tolist(), "seconds": round(seconds, 3), "phase_seconds": phases}
    _write_result(out_dir, centroids, ids, labels, sq, doc)
    phases["write"] = round(time.perf_counter() - times[-1], 3)
    return KMeansResult(centroids, objective, backend, sizes, out_dir, time.perf_counter() - times[0], phases)


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
    keys = sample_keys(np.arange(n) if ids is None else ids, cfg.seed)
    m = min(cfg.init_rows, n)
    init = init_centroids(_sample_from([_rows_by_key(keys, x, key_threshold([_smallest(keys, m)], m))]), cfg)
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


def load_assignments(out_dir: str | Path) -> pa.Table:
    """The per-row ``id, cluster, sq_dist`` table of a finished run (sorted by id)."""
    path = Path(out_dir) / "assign.parquet"
    if not path.is_file():
        raise UserError(f"no k-means assignments at {path}; run k-means on the FeatureStore first")
    return pq.read_table(path)


__all__ = [
    "Bounds", "FaissCpuBackend", "FaissGpuBackend", "KMeansConfig", "KMeansResult", "ShardWorker", "TorchBackend", "assign",
    "bounded_assign", "cluster_sums", "init_centroids", "key_threshold", "kmeans_distributed", "kmeans_plus_plus", "kmeans_single",
    "load_assignments", "moved_sums", "objective_from_sums", "partial_sums", "probe_backend", "read_shard", "running_sums", "sample_keys",
    "update_centroids",
]
