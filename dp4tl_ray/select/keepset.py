"""The KeepSet artifact: the sorted ids of the source rows a selection keeps, with its provenance.

On disk a directory holding ``keep.parquet`` (one column ``id:int64``, sorted, unique) and
``keepset.json`` (:class:`KeepSetMeta`, including the sha256 of ``keep.parquet``), written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import damaged, read_json, read_parquet
from dp4tl_ray.config import record_from
from dp4tl_ray.errors import UserError
from dp4tl_ray.select.voting import SelectionSummary

if TYPE_CHECKING:
    import ray.data

IDS_FILE = "keep.parquet"
META_FILE = "keepset.json"
_SCHEMA = pa.schema([pa.field("id", pa.int64(), nullable=False)])


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class KeepSetMeta:
    """Provenance of a keep-set: how it was selected, what it keeps, and the hash of its ids."""

    method: str
    ratio: float
    units_kept: int
    units_total: int
    votes_per_unit: list[float]
    images_kept: int
    images_total: int
    surrogate: dict[str, Any] | str
    source_fingerprint: str
    downstream: list[str]
    seed: int
    created: str = field(default_factory=_now_iso)
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The FeatureStores it was selected from (absolute paths; the downstream ones in the order of
    # ``downstream``); empty in keep-sets written before they were recorded.
    source_features: str = ""
    downstream_features: list[str] = field(default_factory=list)

    @classmethod
    def from_summary(
        cls,
        summary: SelectionSummary,
        *,
        method: str,
        ratio: float,
        surrogate: dict[str, Any] | str,
        source_fingerprint: str,
        downstream: list[str],
        seed: int,
        extra: dict[str, Any] | None = None,
        source_features: str = "",
        downstream_features: list[str] | None = None,
    ) -> KeepSetMeta:
        """Meta for a unit selection: counts and votes from ``summary``, provenance from the arguments."""
        return cls(
            method=method,
            ratio=float(ratio),
            units_kept=summary.units_kept,
            units_total=summary.units_total,
            votes_per_unit=list(summary.votes_per_unit),
            images_kept=summary.images_kept,
            images_total=summary.images_total,
            surrogate=surrogate,
            source_fingerprint=source_fingerprint,
            downstream=list(downstream),
            seed=int(seed),
            extra=dict(extra or {}),
            source_features=source_features,
            downstream_features=list(downstream_features or []),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeepSetMeta:
        """The manifest (``keepset.json``) of the keep-set at ``path`` alone: its ids are neither read nor checked."""
        meta_file = Path(path) / META_FILE
        if not meta_file.is_file():
            raise UserError(f"no keep-set at {path} (no {META_FILE}); run `dp4tl select` first")
        fix = _fix(Path(path))
        return record_from(cls, read_json(meta_file, fix), meta_file, fix)


@dataclass
class KeepSet:
    """Kept source row ids (sorted, unique int64) and their metadata."""

    ids: np.ndarray
    meta: KeepSetMeta

    def __post_init__(self) -> None:
        self.ids = _checked_ids(np.asarray(self.ids), "keep-set ids")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def write(self, path: str | os.PathLike) -> Path:
        """Write the directory atomically (temp sibling, then rename); records the ids' sha256 in meta."""
        path = Path(path)
        with atomic.directory(path) as tmp:
            table = pa.Table.from_arrays([pa.array(self.ids, pa.int64())], schema=_SCHEMA)
            pq.write_table(table, tmp / IDS_FILE)
            self.meta = dataclasses.replace(self.meta, sha256=atomic.sha256_file(tmp / IDS_FILE))
            atomic.write_json(tmp / META_FILE, dataclasses.asdict(self.meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> KeepSet:
        """Read a keep-set, refusing one whose ids do not match the recorded sha256."""
        path = Path(path)
        ids_file, meta_file, fix = path / IDS_FILE, path / META_FILE, _fix(path)
        if not ids_file.is_file() or not meta_file.is_file():
            raise UserError(f"no keep-set at {path} ({IDS_FILE} + {META_FILE}); run `dp4tl select` first")
        meta = KeepSetMeta.load(path)
        if atomic.sha256_file(ids_file) != meta.sha256:
            raise UserError(
                f"keep-set {path}: {IDS_FILE} is corrupt or modified (sha256 mismatch); re-run `dp4tl select`"
            )
        table = read_parquet(ids_file, fix, _SCHEMA)
        if table.schema.names != ["id"]:
            raise damaged(ids_file, "must hold one column id:int64", fix)
        ids = _checked_ids(
            table.column("id").to_numpy(), f"keep-set {path} ids", "; re-run `dp4tl select`"
        )
        return cls(ids=ids, meta=meta)

    def filter(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        """The rows of ``dataset`` (which has an ``id`` column) whose id is kept (:func:`filter_by_ids`)."""
        return filter_by_ids(dataset, self.ids)


def _fix(path: Path) -> str:
    return f"delete {path} and re-run `dp4tl select`"


def filter_by_ids(dataset: ray.data.Dataset, sorted_ids: np.ndarray, keep: bool = True) -> ray.data.Dataset:
    """The rows of ``dataset`` whose ``id`` is in ``sorted_ids`` (``keep=False``: whose id is not), lazily
    and in parallel.

    The sorted ids go once into the object store and each batch is matched against them with a
    binary search, so the source is never gathered on the driver.
    """
    import ray

    columns = dataset.columns(fetch_if_missing=False)
    if columns is not None and "id" not in columns:
        raise UserError(f"dataset to filter has no `id` column (columns: {columns})")
    ids = _checked_ids(np.asarray(sorted_ids), "ids to filter by")
    return dataset.map_batches(
        _rows_by_id, fn_kwargs={"ids_ref": ray.put(ids), "keep": keep}, batch_format="pyarrow", batch_size=None
    )


def keep_ids_for_units(unit_of_row: np.ndarray, row_ids: np.ndarray, kept_units: np.ndarray) -> np.ndarray:
    """Sorted ids of the rows whose unit is in ``kept_units``."""
    units, ids = np.asarray(unit_of_row), np.asarray(row_ids, dtype=np.int64)
    if units.ndim != 1 or units.shape != ids.shape:
        raise UserError(
            f"unit_of_row and row_ids must be 1-D of equal length, got {units.shape} and {ids.shape}"
        )
    kept = np.sort(ids[np.isin(units, np.asarray(kept_units))])
    return _checked_ids(kept, "row ids")


def isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Boolean mask of ``values`` present in the sorted array ``sorted_ids`` (binary search)."""
    if sorted_ids.shape[0] == 0:
        return np.zeros(values.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.shape[0] - 1)
    return sorted_ids[pos] == values


def _rows_by_id(batch: pa.Table, ids_ref: Any, keep: bool) -> pa.Table:
    import ray

    # Ray Data passes fn_kwargs through as they are (an ObjectRef is not resolved): fetch it here.
    listed = isin_sorted(batch.column("id").to_numpy(), ray.get(ids_ref))
    return batch.filter(pa.array(listed if keep else ~listed))


def _checked_ids(ids: np.ndarray, what: str, fix: str = "") -> np.ndarray:
    """``ids`` as int64, refused unless 1-D, sorted ascending and unique."""
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise UserError(f"{what} must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.shape[0] > 1 and not (np.diff(ids) > 0).all():
        raise UserError(f"{what} must be sorted ascending and unique{fix}")
    return ids
