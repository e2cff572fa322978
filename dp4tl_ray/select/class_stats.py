"""Per-class statistics of the source FeatureStore, computed on Ray actors that hold its rows.

The driver keeps ids and labels only; the features stay on actors (``ClassRows``), which send back
per-class summaries: feature sums and counts (the class means of ``fm-classmean``) or one distance
per row (Moderate-DS). Sums need no grouping, so each actor reads a run of the store's files. A
class's coordinate-wise median needs all of the class's rows in one place, so for Moderate-DS each
actor reads the rows of a contiguous range of classes (ranges balanced by row count; row groups
holding none of the range are skipped after a pass over their label column): each actor reads the
label column of every file, the features only of the row groups holding its classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore, read_rows
from dp4tl_ray.select.baselines import distances_to_class_median
from dp4tl_ray.select.feature_mapping import class_sums


class ClassRows:
    """Rows of some store files (all of them, or those of classes ``lo <= label < hi``), run as a Ray actor."""

    def __init__(self, paths: list[str], label_range: tuple[int, int] | None = None):
        self.ids, self.labels, self.x = read_rows([Path(p) for p in paths], label_range)

    def class_sums(self, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        return class_sums(self.x, self.labels, num_classes)

    def median_distances(self) -> tuple[np.ndarray, np.ndarray]:
        """``ids`` and each row's distance to its class's median feature (every class here is whole)."""
        return self.ids, distances_to_class_median(self.x, self.labels)


def class_ranges(counts: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous class ranges ``[lo, hi)`` covering every class, with about equal rows each
    (a range ends with the class that reaches its share of the rows)."""
    counts = np.asarray(counts, np.int64)
    bounds = np.searchsorted(np.cumsum(counts), counts.sum() * np.arange(1, parts) / parts, side="left") + 1
    edges = np.unique(np.concatenate(([0], bounds, [len(counts)])))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def _on_actors(specs: list[tuple[list[str], tuple[int, int] | None]], method: str, *args) -> list:
    """``ClassRows.<method>(*args)`` on one actor per ``(paths, label_range)``, answers in that order; the actors end after."""
    from dp4tl_ray.kmeans import ActorShards, start_shard_actors

    shards = ActorShards(start_shard_actors(ClassRows, specs, num_cpus=1))
    try:
        return shards.call(method, *args)
    finally:
        shards.stop()


def _num_actors(wanted: int) -> int:
    import ray

    return max(1, min(wanted, int(ray.cluster_resources().get("CPU", 1))))


def class_means(store: FeatureStore, num_classes: int, num_actors: int) -> np.ndarray:
    """Mean feature (float32) of each source class: per-class float64 sums from actors that each hold a run of files."""
    from dp4tl_ray.kmeans import file_groups

    parts = _on_actors([(g, None) for g in file_groups(store.files, _num_actors(num_actors))], "class_sums", num_classes)
    sums, counts = parts[0][0].copy(), parts[0][1].copy()
    for s, c in parts[1:]:
        sums += s
        counts += c
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise UserError(f"class(es) {missing} have no source features; re-extract or fix the class index")
    return (sums / counts[:, None]).astype(np.float32)


def median_distances(store: FeatureStore, ids: np.ndarray, labels: np.ndarray, num_actors: int) -> np.ndarray:
    """Each row's distance to its class's median feature, aligned with ``ids`` (sorted, every id of the store)."""
    files = [str(f) for f in store.files]
    ranges = class_ranges(np.bincount(labels), _num_actors(num_actors))
    parts = _on_actors([(files, r) for r in ranges], "median_distances")
    got = np.concatenate([p[0] for p in parts])
    pos = np.searchsorted(ids, got)
    if len(got) != len(ids) or (pos >= len(ids)).any() or not np.array_equal(ids[np.minimum(pos, len(ids) - 1)], got) \
            or len(np.unique(pos)) != len(ids):
        raise UserError(f"FeatureStore {store.path} rows read by class do not match its ids (duplicates?); re-extract it")
    dist = np.empty(len(ids))
    dist[pos] = np.concatenate([p[1] for p in parts])
    return dist
