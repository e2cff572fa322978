"""Synthetic FeatureStores at any size: class clusters with noise, in the exact store schema, written shard by shard.

For measuring selection at ImageNet scale without extracting ImageNet (``benchmarks/scale.py``) and for
tests that need a store of a given shape. Classes get ImageNet-like sizes (0.55-1x the largest) and
spreads (0.5-1.5x), ids run class by class (the order an ImageNet folder scan gives), and each row's
stored top-k predicts its own class most of the time. A downstream task's images sit near the centres
of a few related source classes and predict them, so LM and FM find those classes. Memory holds one
shard at a time, never the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dp4tl_ray import atomic
from dp4tl_ray.featurestore import MANIFEST, FeatureStore, feature_table, write_shard

SURROGATE = {"name": "synthetic", "arch": "synthetic", "num_classes": 0, "small_input": False, "checkpoint": None,
             "random_init_seed": 0}


@dataclass(frozen=True)
class ClusterSpec:
    """The class structure every store of one synthetic world shares: centres and per-class spreads."""

    classes: int
    dim: int
    seed: int = 0
    noise: float = 0.6  # within-class noise norm relative to the unit-norm centres (times the class's spread)

    def centres(self) -> np.ndarray:
        c = np.random.default_rng(self.seed).standard_normal((self.classes, self.dim), dtype=np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def spreads(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).uniform(0.5, 1.5, self.classes).astype(np.float32)


def _rows(spec: ClusterSpec, centres: np.ndarray, spreads: np.ndarray, labels: np.ndarray, topk: int, top1_correct: float,
          candidates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features near ``centres[labels]`` and a top-k whose first entry is ``labels`` with prob. ``top1_correct``,
    the rest drawn from ``candidates`` (source class indices)."""
    noise = rng.standard_normal((len(labels), spec.dim), dtype=np.float32)
    noise *= (spec.noise * spreads[labels] / np.sqrt(spec.dim))[:, None]
    x = centres[labels] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    top = candidates[rng.integers(0, len(candidates), (len(labels), topk))]
    right = rng.random(len(labels)) < top1_correct
    top[right, 0] = labels[right]
    logit = -np.sort(-rng.standard_normal((len(labels), topk), dtype=np.float32), axis=1)  # descending
    return x, top.astype(np.int32), logit


def _write(out: Path, shards, manifest: dict) -> FeatureStore:
    """Write ``(ids, labels, feats, topk_idx, topk_logit)`` shards and the manifest atomically."""
    t0 = time.perf_counter()
    n = 0
    with atomic.directory(out) as tmp:
        for i, (ids, labels, x, top, logit) in enumerate(shards):
            write_shard(feature_table(ids, labels, x, top, logit), tmp / f"part-{i:05d}.parquet")
            n += len(ids)
        seconds = time.perf_counter() - t0
        manifest = {**manifest, "num_rows": n, "num_inputs": n, "seconds": round(seconds, 3),
                    "images_per_s": round(n / max(seconds, 1e-9), 2), "skipped": [], "num_actors": 1, "device": "cpu",
                    "format": 1, "source_format": "synthetic", "decode": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_json(tmp / MANIFEST, manifest)
    return FeatureStore(out, manifest)


def _manifest(spec: ClusterSpec, source: str, classes: list[str], topk: int, key: str) -> dict:
    return {"store_key": key, "source": source, "source_fingerprint": f"synthetic-{spec.classes}x{spec.dim}-seed{spec.seed}",
            "surrogate": {**SURROGATE, "num_classes": spec.classes}, "dim": spec.dim, "topk": topk, "classes": classes}


def class_sizes(rows: int, classes: int, seed: int) -> np.ndarray:
    """Rows per class, ImageNet-like (0.55-1x of the largest), adding up to ``rows``."""
    w = np.random.default_rng(seed + 2).uniform(0.55, 1.0, classes)
    sizes = np.floor(w / w.sum() * rows).astype(np.int64)
    sizes[: rows - sizes.sum()] += 1
    return sizes


def write_source_store(out: str | Path, spec: ClusterSpec, rows: int, topk: int = 5, rows_per_file: int = 65536,
                       top1_correct: float = 0.8) -> FeatureStore:
    """A source FeatureStore of ``rows`` rows over ``spec.classes`` classes, ids running class by class."""
    if rows < spec.classes:
        raise ValueError(f"need at least one row per class: {rows} rows for {spec.classes} classes")
    centres, spreads = spec.centres(), spec.spreads()
    bounds = np.cumsum(class_sizes(rows, spec.classes, spec.seed))
    everyone = np.arange(spec.classes)

    def shards():
        rng = np.random.default_rng(spec.seed + 3)
        for start in range(0, rows, rows_per_file):
            ids = np.arange(start, min(start + rows_per_file, rows), dtype=np.int64)
            labels = np.searchsorted(bounds, ids, side="right").astype(np.int32)
            yield ids, labels, *_rows(spec, centres, spreads, labels, topk, top1_correct, everyone, rng)

    classes = [f"n{c:08d}" for c in range(spec.classes)]
    return _write(Path(out), shards(), _manifest(spec, "synthetic/source/train", classes, topk, f"source-{rows}"))


def write_task_store(out: str | Path, spec: ClusterSpec, task: int, rows: int = 10_000, related: int = 50,
                     task_classes: int = 10, topk: int = 5, top1_correct: float = 0.7) -> FeatureStore:
    """A downstream task's FeatureStore: ``task_classes`` classes, each near a few of ``related`` source classes
    (drawn with the task's seed), whose rows predict those source classes (top-1 right w.p. ``top1_correct``)."""
    rng = np.random.default_rng(spec.seed + 100 + task)
    related_classes = rng.choice(spec.classes, size=min(related, spec.classes), replace=False)
    labels = np.sort(rng.integers(0, task_classes, rows)).astype(np.int32)
    per_class = max(1, len(related_classes) // task_classes)  # each task class sits near its own few source classes
    source_class = related_classes[(labels * per_class + rng.integers(0, per_class, rows)) % len(related_classes)]
    x, top, logit = _rows(spec, spec.centres(), spec.spreads(), source_class, topk, top1_correct, related_classes, rng)
    shard = (np.arange(rows, dtype=np.int64), labels, x, top, logit)
    manifest = _manifest(spec, f"synthetic/task_{task}/train", [f"task{task}_class{c}" for c in range(task_classes)],
                         topk, f"task-{task}-{rows}")
    return _write(Path(out), [shard], manifest)
