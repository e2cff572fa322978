"""Lloyd k-means for Feature Mapping's clusters: distributed over Ray actors, with a FAISS reference.

- ``config``: ``KMeansConfig`` (validated) and ``KMeansResult``.
- ``lloyd``: the pure numpy step - per-cluster sums kept up to date as rows move, new centroids from
  the sums over all shards, the objective from the sums, Hamerly's bounds (``bounded_assign``).
- ``seeding``: seeded init sample (the same however rows are split into shards) and k-means++.
- ``backends``: nearest-centroid search (FAISS CPU, FAISS GPU, torch CUDA); each says whether it does
  a bounded search.
- ``shards``: a ``Shard`` that assigns and sums its rows, groups of them, and ``kmeans_on_shards``,
  the driver that runs over any group (in process, or Ray actors).
- ``distributed``: ``kmeans_distributed`` - Ray shard actors over a FeatureStore, results written and reused.
- ``reference``: ``kmeans_single``, single-process ``faiss.Kmeans`` from the same init.
"""

from dp4tl_ray.kmeans.backends import (
    AssignBackend,
    FaissCpuBackend,
    FaissGpuBackend,
    TorchBackend,
    assign,
    probe_backend,
)
from dp4tl_ray.kmeans.config import INITS, KMeansConfig, KMeansResult
from dp4tl_ray.kmeans.distributed import (
    ActorShards,
    ShardHost,
    ShardWorker,
    file_groups,
    kmeans_distributed,
    load_assignments,
    load_centroids,
    read_shard,
    start_shard_actors,
)
from dp4tl_ray.kmeans.lloyd import (
    Bounds,
    bounded_assign,
    cluster_sums,
    moved_sums,
    objective_from_sums,
    running_sums,
    update_centroids,
)
from dp4tl_ray.kmeans.reference import kmeans_single
from dp4tl_ray.kmeans.seeding import init_centroids, key_threshold, kmeans_plus_plus, sample_keys
from dp4tl_ray.kmeans.shards import LloydRun, LocalShards, Shard, Shards, kmeans_on_shards

__all__ = [
    "INITS", "ActorShards", "AssignBackend", "Bounds", "FaissCpuBackend", "FaissGpuBackend", "KMeansConfig", "KMeansResult",
    "LloydRun", "LocalShards", "Shard", "ShardHost", "ShardWorker", "Shards", "TorchBackend", "assign", "bounded_assign", "cluster_sums",
    "file_groups", "init_centroids", "key_threshold", "kmeans_distributed", "kmeans_on_shards", "kmeans_plus_plus",
    "kmeans_single", "load_assignments", "load_centroids", "moved_sums", "objective_from_sums", "probe_backend", "read_shard", "running_sums",
    "sample_keys", "start_shard_actors", "update_centroids",
]
