"""KeepSet artifact: round trip, tamper detection, determinism, atomic writes, Ray Dataset filter."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dp4tl_ray.errors import UserError
from dp4tl_ray.select import keepset as keepset_mod
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta, isin_sorted, keep_ids_for_units
from dp4tl_ray.select.voting import kept_units_for_ratio, summarize_selection, votes_from_topk


def _select(seed: int = 0, ratio: float = 0.5) -> KeepSet:
    """A small LM-like selection: 1000 rows in 10 units of unequal size, 30 downstream images."""
    rng = np.random.default_rng(123)
    unit_of_row = rng.integers(0, 10, size=1000)
    row_ids = rng.permutation(1000).astype(np.int64)
    votes = votes_from_topk(rng.integers(0, 10, size=(30, 1)), num_units=10)
    kept_units = kept_units_for_ratio(votes, ratio, seed)
    summary = summarize_selection(votes, kept_units, np.bincount(unit_of_row, minlength=10))
    meta = KeepSetMeta.from_summary(
        summary, method="lm", ratio=ratio, surrogate={"arch": "resnet18"},
        source_fingerprint="abc123", downstream=["flowers"], seed=seed, extra={"note": "test"},
    )
    return KeepSet(ids=keep_ids_for_units(unit_of_row, row_ids, kept_units), meta=meta)


def test_write_load_round_trip(tmp_path):
    ks = _select()
    path = ks.write(tmp_path / "ks")
    loaded = KeepSet.load(path)
    assert np.array_equal(loaded.ids, ks.ids) and loaded.ids.dtype == np.int64
    assert loaded.meta == ks.meta and len(loaded.meta.sha256) == 64
    assert len(loaded) == loaded.meta.images_kept
    assert loaded.meta.images_kept / loaded.meta.images_total == pytest.approx(len(loaded) / 1000)  # the kept fraction the report reads
    assert pq.read_schema(path / "keep.parquet").names == ["id"]
    assert json.loads((path / "keepset.json").read_text())["downstream"] == ["flowers"]


def test_keepsets_written_before_store_provenance_was_recorded_still_load(tmp_path):
    path = _select().write(tmp_path / "ks")
    meta = json.loads((path / "keepset.json").read_text())
    assert meta["source_features"] == "" and meta["downstream_features"] == []
    del meta["source_features"], meta["downstream_features"]  # a keep-set written before they were recorded
    (path / "keepset.json").write_text(json.dumps(meta))
    loaded = KeepSet.load(path)
    assert loaded.meta.source_features == "" and loaded.meta.downstream_features == []


def test_tampered_ids_are_refused(tmp_path):
    path = _select().write(tmp_path / "ks")
    ids = pq.read_table(path / "keep.parquet").column("id").to_numpy().copy()
    ids[:3] = [-3, -2, -1]  # still sorted and unique: only the hash can tell
    pq.write_table(pa.table({"id": ids}), path / "keep.parquet")
    with pytest.raises(UserError, match=r"corrupt or modified \(sha256 mismatch\); re-run `dp4tl select`"):
        KeepSet.load(path)


def test_unsorted_ids_are_refused_even_with_matching_hash(tmp_path):
    path = _select().write(tmp_path / "ks")
    pq.write_table(pa.table({"id": np.array([5, 1, 3], dtype=np.int64)}), path / "keep.parquet")
    meta = json.loads((path / "keepset.json").read_text())
    meta["sha256"] = keepset_mod.atomic.sha256_file(path / "keep.parquet")
    (path / "keepset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="sorted ascending and unique"):
        KeepSet.load(path)


def test_missing_keepset_is_refused(tmp_path):
    with pytest.raises(UserError, match="run `dp4tl select` first"):
        KeepSet.load(tmp_path / "nowhere")


def test_same_inputs_and_seed_give_same_ids_and_hash(tmp_path):
    a = KeepSet.load(_select(seed=7).write(tmp_path / "a"))
    b = KeepSet.load(_select(seed=7).write(tmp_path / "b"))
    assert np.array_equal(a.ids, b.ids) and a.meta.sha256 == b.meta.sha256


def test_failed_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keepset_mod.atomic, "write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        _select().write(tmp_path / "ks")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_keepset(tmp_path, monkeypatch):
    path = _select(ratio=0.5).write(tmp_path / "ks")
    before = KeepSet.load(path)
    monkeypatch.setattr(keepset_mod.atomic, "write_json", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _select(ratio=0.2).write(path)
    assert np.array_equal(KeepSet.load(path).ids, before.ids)
    assert [p.name for p in tmp_path.iterdir()] == ["ks"]


def test_unsorted_or_duplicate_ids_cannot_be_built():
    meta = _select().meta
    for ids in ([3, 1, 2], [1, 1, 2]):
        with pytest.raises(UserError, match="sorted ascending and unique"):
            KeepSet(ids=np.array(ids), meta=meta)


def test_keep_ids_for_units_selects_rows_of_kept_units_sorted():
    units = np.array([0, 1, 2, 1, 0, 2])
    ids = np.array([50, 40, 30, 20, 10, 0])
    assert keep_ids_for_units(units, ids, np.array([0, 2])).tolist() == [0, 10, 30, 50]


def test_isin_sorted_matches_numpy_isin():
    rng = np.random.default_rng(0)
    keep = np.unique(rng.integers(0, 500, size=200))
    values = rng.integers(-10, 520, size=1000)
    assert np.array_equal(isin_sorted(values, keep), np.isin(values, keep))
    assert not isin_sorted(values, keep[:0]).any()


@pytest.mark.ray
def test_filter_keeps_exactly_the_kept_ids(ray_local):
    ks = _select()
    ds = ray_local.data.range(1000, override_num_blocks=4).map_batches(
        lambda b: {"id": b["id"], "label": b["id"] % 7}, batch_format="numpy"
    )
    rows = ks.filter(ds).take_all()
    assert sorted(r["id"] for r in rows) == ks.ids.tolist()
    assert all(r["label"] == r["id"] % 7 for r in rows)
