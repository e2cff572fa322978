"""Per-class statistics where the features live: Moderate-DS and fm-classmean computed on Ray actors equal the
in-memory reference, and the driver neither reads nor receives the feature matrix."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dp4tl_ray.data.synthetic_features import ClusterSpec, write_source_store, write_task_store
from dp4tl_ray.kmeans.lloyd import CHUNK_ROWS
from dp4tl_ray.select.baselines import moderate
from dp4tl_ray.select.class_stats import class_means, class_ranges
from dp4tl_ray.select.feature_mapping import class_sums, feature_mapping_votes
from dp4tl_ray.select.pipeline import SelectConfig, majority_class, select_keepset


def test_class_ranges_cover_every_class_with_about_equal_rows():
    counts = np.array([5, 5, 5, 5, 40, 5, 5, 5, 5, 20])
    assert class_ranges(counts, 2) == [(0, 5), (5, 10)]
    assert class_ranges(counts, 1) == [(0, 10)]
    ranges = class_ranges(np.random.default_rng(0).integers(1, 100, 1000), 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert class_ranges(np.array([3, 1]), 4) == [(0, 1), (1, 2)]  # never an empty range


def test_class_sums_add_every_row_of_each_class_across_chunks():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((CHUNK_ROWS * 2 + 7, 3)).astype(np.float32), rng.integers(0, 5, CHUNK_ROWS * 2 + 7)
    labels[labels == 3] = 4  # class 3 has no rows
    sums, counts = class_sums(x, labels, 6)
    assert counts.tolist() == np.bincount(labels, minlength=6).tolist() and counts[3] == 0
    assert np.allclose(sums, [x[labels == c].sum(axis=0, dtype=np.float64) for c in range(6)])


def test_majority_class_names_each_cluster_by_its_most_frequent_class():
    clusters, labels = np.array([0, 0, 0, 2, 2, 2, 2]), np.array([1, 3, 3, 0, 5, 5, 0])
    top, share = majority_class(clusters, labels, 3)
    assert top.tolist() == [3, -1, 0] and np.allclose(share, [2 / 3, 0, 0.5])  # a tie goes to the smaller class


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) << 10


def _bytes_read() -> int:
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text()).group(1))


def _on_driver(fn):
    """``fn()``, the bytes this process read meanwhile (any file or socket) and how far its peak RSS rose above
    the RSS it started from (the peak is reset first): together they catch features read from the store and
    features gathered from actors through Ray's shared-memory object store."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss, read = _status("VmRSS"), _bytes_read()
    result = fn()
    return result, _bytes_read() - read, _status("VmHWM") - rss


@pytest.mark.ray
def test_actor_class_statistics_equal_the_reference_and_stay_off_the_driver(ray_local, tmp_path):
    spec = ClusterSpec(classes=30, dim=1024)
    source = write_source_store(tmp_path / "src", spec, rows=20_000, rows_per_file=2_000)
    task = write_task_store(tmp_path / "task", spec, 0, rows=300, related=6, task_classes=3)
    feature_bytes = source.num_rows * source.dim * 4  # 80 MB
    import faiss  # noqa: F401  (its import, ~30 MB of code, is not what is measured)
    common = dict(ratio=0.0, source_features=str(source.path), downstream_features=[str(task.path)], kmeans_actors=2)
    kept, measured = {}, {}
    for name, cfg in {
        "per-class": SelectConfig(method="moderate", keep_fraction=0.3, out=str(tmp_path / "mod"), **common),
        "global": SelectConfig(method="moderate", keep_fraction=0.3, moderate_band="global", out=str(tmp_path / "modg"),
                               **common),
        "fm-classmean": SelectConfig(method="fm-classmean", out=str(tmp_path / "fmc"), **common),
    }.items():
        kept[name], read, grew = _on_driver(lambda: select_keepset(cfg))
        measured[name] = (read, grew)
    for name, (read, grew) in measured.items():
        # allowed: ids and labels of the source, the downstream store (features of 300 rows), parquet footers
        assert read < 0.1 * feature_bytes, f"{name}: the driver read {read} bytes (features: {feature_bytes})"
        assert grew < 0.4 * feature_bytes, f"{name}: the driver's peak RSS rose {grew} bytes (features: {feature_bytes})"

    ids, labels, feats, _ = source.arrays()  # the in-memory reference, after the measured runs
    budget = int(0.3 * len(ids))
    for band in ("per-class", "global"):
        assert kept[band].ids.tolist() == moderate(feats, labels, ids, budget, band).tolist()
        assert kept[band].meta.extra["moderate_band"] == band
    fractions = np.bincount(labels[np.isin(ids, kept["per-class"].ids)]) / np.bincount(labels)
    assert fractions.max() - fractions.min() < 0.01  # every class keeps ~30%
    means = np.stack([feats[labels == c].mean(axis=0, dtype=np.float64) for c in range(spec.classes)])
    assert np.allclose(class_means(source, spec.classes, 2), means, atol=1e-6)
    assert kept["fm-classmean"].meta.votes_per_unit == feature_mapping_votes(task, means.astype(np.float32)).tolist()
