"""Distributed k-means over Ray: one actor per group of a FeatureStore's parquet files, reused results.

Each actor (``ShardWorker``) reads its files and keeps them; Ray only moves centroids (k x d) out and
per-centroid sums back, so features never leave an actor. The Lloyd loop is ``shards.kmeans_on_shards``,
the same as in one process. Results land next to the features in ``<store>/kmeans/<cfg.name>/``
(``centroids.npy``, ``assign.parquet``: id, cluster, sq_dist; ``kmeans.json``), written atomically.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import damaged, read_json, read_parquet, reading
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, read_rows
from dp4tl_ray.kmeans.backends import probe_backend
from dp4tl_ray.kmeans.config import KMeansConfig, KMeansResult
from dp4tl_ray.kmeans.shards import Shard, Shards, kmeans_on_shards

log = logging.getLogger(__name__)

INLINE_BYTES = 100 << 10  # arrays up to this size ride inside the task (Ray's own inline limit); larger: one ray.put
ASSIGN_SCHEMA = pa.schema([("id", pa.int64()), ("cluster", pa.int32()), ("sq_dist", pa.float32())])  # assign.parquet
RESULT_KEYS = ("objective", "backend", "sizes", "seconds")  # what a reused kmeans.json must hold besides its inputs


def read_shard(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``ids int64[n], features float32[n, d]`` of some FeatureStore parquet files, in file order (streamed:
    see :func:`dp4tl_ray.featurestore.read_rows`)."""
    ids, _, x = read_rows(paths)
    return ids, x


class ShardWorker(Shard):
    """A ``Shard`` that reads its own parquet files and picks its search backend (run as a Ray actor)."""

    def __init__(self, paths: list[str], use_gpu: bool = False, threads: int = 1, bounds: bool = True):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        t0 = time.perf_counter()
        ids, x = read_shard([Path(p) for p in paths])
        self.read_seconds = time.perf_counter() - t0
        super().__init__(ids, x, probe_backend(use_gpu), bounds)

    def info(self) -> tuple[int, str, float]:
        """Rows held, assignment backend, seconds spent reading the shard."""
        return len(self.ids), self.backend.name, self.read_seconds


class ShardHost:
    """A Ray actor holding one shard object (a ``ShardWorker``, a ``ClassRows``), built in its first call.

    Not in the actor's constructor: Ray (2.60) hands the caller an exception raised there only as the
    text of an ``ActorDiedError``, while one raised in a call arrives as itself (``RayTaskError(UserError)``,
    the ``UserError`` its ``cause``), so a damaged store file an actor reads stays the one line naming it."""

    def __init__(self, cls: type, *args):
        self.cls, self.args, self.obj = cls, args, None

    def call(self, method: str, *args):
        if self.obj is None:
            self.obj = self.cls(*self.args)
        return getattr(self.obj, method)(*args)


def start_shard_actors(cls: type, args: list[tuple], **options) -> list:
    """One :class:`ShardHost` actor of ``cls(*a)`` per ``a`` in ``args``, with Ray actor ``options``."""
    import ray

    host = ray.remote(ShardHost).options(**options)
    return [host.remote(cls, *a) for a in args]


class ActorShards(Shards):
    """Shards held by Ray actors (:func:`start_shard_actors`): a call goes to every actor at once and waits
    for all; an array larger than Ray's inline limit is put in the object store once rather than sent to each actor."""

    def __init__(self, actors: list):
        self.actors = actors

    def submit(self, method: str, *args) -> list:
        """``method(*args)`` on every actor: their object refs, in actor order."""
        import ray

        args = tuple(ray.put(a) if isinstance(a, np.ndarray) and a.nbytes > INLINE_BYTES else a for a in args)
        return [actor.call.remote(method, *args) for actor in self.actors]

    def call(self, method: str, *args) -> list:
        return self.get(self.submit(method, *args))

    def get(self, refs: list) -> list:
        """``ray.get(refs)``. When one fails the actors are stopped and every other answer fetched too:
        Ray prints an error nobody fetched again at exit, as a traceback after the one-line message."""
        import ray

        try:
            return ray.get(refs)
        except Exception:
            self.stop()
            for ref in refs:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - fetched only to mark it handled; the first error is raised
                    pass
            raise

    def stop(self) -> None:
        """End the actors (their shards go with them)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)


def file_groups(files: list[Path], num_actors: int) -> list[list[str]]:
    """The store's files cut into ``num_actors`` runs of neighbouring files (fewer when there are fewer files)."""
    return [list(g) for g in np.array_split(np.array([str(f) for f in files], dtype=object), min(num_actors, len(files)))]


def _reusable(out_dir: Path, meta: dict) -> dict | None:
    """The stored kmeans.json when ``out_dir`` holds a complete result for exactly ``meta``'s inputs."""
    path = out_dir / "kmeans.json"
    if not (path.is_file() and (out_dir / "centroids.npy").is_file() and (out_dir / "assign.parquet").is_file()):
        return None
    stored = read_json(path, result_fix(out_dir), RESULT_KEYS)
    return stored if all(stored.get(key) == value for key, value in meta.items()) else None


def result_fix(out_dir: Path) -> str:
    """What to do about a damaged k-means result directory."""
    return f"delete {out_dir} and re-run k-means (`dp4tl kmeans` or the selection that ran it)"


def _write_result(out_dir: Path, centroids: np.ndarray, ids: np.ndarray, labels: np.ndarray, sq: np.ndarray, doc: dict) -> None:
    with atomic.directory(out_dir) as tmp:
        np.save(tmp / "centroids.npy", centroids)
        table = pa.table({"id": ids, "cluster": labels, "sq_dist": sq}, schema=ASSIGN_SCHEMA)
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


def kmeans_distributed(store_dir: str | Path, cfg: KMeansConfig) -> KMeansResult:
    """Lloyd k-means over a FeatureStore with one Ray actor per group of shards; reuses a finished run.

    Per iteration only the centroids go out (inline when small, else one ``ray.put``) and per-actor float64
    sums, counts and objective come back, added in actor order so the same seed and data give the same centroids.
    ``phase_seconds`` splits the wall time: ``load`` (actor start-up, shard reads, init keys; of which
    ``shard_read`` is the slowest actor's read), ``init``, ``iterations`` (of which ``iteration_compute``
    is the slowest actor's Lloyd steps), ``final_assign`` and ``write``.
    """
    store = FeatureStore.open(store_dir)
    n, d = store.num_rows, store.dim
    cfg.validate(n)
    out_dir = store.path / "kmeans" / cfg.name
    meta = {"k": cfg.k, "d": d, "niter": cfg.niter, "seed": cfg.seed, "spherical": cfg.spherical, "init": cfg.init,
            "init_sample": cfg.init_sample, "n_rows": n, "manifest_sha256": atomic.sha256_file(store.path / MANIFEST)}
    stored = _reusable(out_dir, meta)
    if stored is not None:
        log.info("k-means result %s is up to date: reusing it", out_dir)
        return KMeansResult(load_centroids(out_dir, (cfg.k, d)), stored["objective"], stored["backend"],
                            np.asarray(stored["sizes"], np.int64), out_dir, stored["seconds"],
                            stored.get("phase_seconds", {}))
    files = store.files
    if not files:
        raise UserError(f"FeatureStore {store.path} has no parquet files; re-run `dp4tl extract`")
    start = time.perf_counter()
    groups = file_groups(files, cfg.num_actors)
    _check_resources(len(groups), cfg)
    actors = start_shard_actors(ShardWorker, [(g, cfg.num_gpus_per_actor > 0, int(cfg.num_cpus_per_actor), cfg.bounds)
                                              for g in groups],
                                num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor)
    shards = ActorShards(actors)
    try:
        # queued behind each actor's start-up (its shard read): one wait covers start, reads and the init keys
        answers = shards.get(shards.submit("info") + shards.submit("smallest_keys", cfg.seed, min(cfg.init_rows, n)))
        infos, keys = answers[:len(actors)], answers[len(actors):]
        if sum(i[0] for i in infos) != n:
            raise UserError(f"FeatureStore {store.path} holds {sum(i[0] for i in infos)} rows, manifest says {n}; re-extract it")
        backend = "+".join(sorted({i[1] for i in infos}))
        loaded = time.perf_counter()
        run = kmeans_on_shards(shards, cfg, n, keys)
    finally:
        shards.stop()

    if len(run.ids) > 1 and np.any(run.ids[1:] == run.ids[:-1]):
        raise UserError(f"FeatureStore {store.path} has duplicate ids; re-extract it")
    sizes = np.bincount(run.labels, minlength=cfg.k)
    end = time.perf_counter()
    phases = {"load": round(loaded - start, 3), **run.phase_seconds,
              "shard_read": round(max(i[2] for i in infos), 3),  # part of load
              "iteration_compute": round(run.compute_seconds, 3),  # part of iterations
              "rows_searched_fraction": round(run.rows_searched / (n * cfg.niter), 4)}  # < 1: bounds skipped the rest
    seconds = end - start
    log.info("k-means %d x %d, k=%d on %d actors (%s) in %.2fs: %s", n, d, cfg.k, len(actors), backend, seconds, phases)
    doc = {**meta, "objective": run.objective, "final_objective": float(np.sum(run.sq, dtype=np.float64)),
           "backend": backend, "num_actors": len(actors), "sizes": sizes.tolist(), "seconds": round(seconds, 3),
           "phase_seconds": phases}
    _write_result(out_dir, run.centroids, run.ids, run.labels, run.sq, doc)
    phases["write"] = round(time.perf_counter() - end, 3)
    return KMeansResult(run.centroids, run.objective, backend, sizes, out_dir, time.perf_counter() - start, phases)


def load_centroids(out_dir: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The ``float32[k, d]`` centroids of a finished run (of ``shape`` when given)."""
    path, fix = Path(out_dir) / "centroids.npy", result_fix(Path(out_dir))
    with reading(path, fix):
        centroids = np.load(path, allow_pickle=False)
    if centroids.ndim != 2 or (shape is not None and centroids.shape != shape):
        raise damaged(path, f"holds an array of shape {centroids.shape}, expected {shape or '(k, d)'}", fix)
    return centroids


def load_assignments(out_dir: str | Path) -> pa.Table:
    """The per-row ``id, cluster, sq_dist`` table of a finished run (sorted by id)."""
    path = Path(out_dir) / "assign.parquet"
    if not path.is_file():
        raise UserError(f"no k-means assignments at {path}; run k-means on the FeatureStore first")
    return read_parquet(path, result_fix(Path(out_dir)), ASSIGN_SCHEMA.names)
