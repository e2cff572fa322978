"""The FeatureStore: parquet shards of per-row surrogate outputs plus ``manifest.json``.

Columns ``id:int64, label:int32, feature:fixed_size_list<float32>[d]`` (L2-normalised),
``topk_idx:list<int32>, topk_logit:list<float32>``. Pure pyarrow/numpy: reading a store does not
import torch (k-means actors and selection stay light).

Shards carry a CRC32 per page (:func:`write_shard`) and every reader checks it (:func:`open_shard`):
without it bytes damaged inside a data page (a bad disk or copy; the footer intact) read back as
other features without any error. A damaged shard is one line naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray.artifact_io import damaged, parquet_metadata, read_json, reading
from dp4tl_ray.errors import UserError

MANIFEST = "manifest.json"
READ_BATCH_ROWS = 4096  # rows per decoded batch when an actor reads store files
READ_BUFFER_BYTES = 1 << 20  # parquet read buffer (streamed, not the whole column chunk at once)
MANIFEST_KEYS = ("dim", "num_rows", "topk")  # what the store itself reads from its manifest


def feature_table(ids, labels, feats: np.ndarray, topk_idx: np.ndarray, topk_logit: np.ndarray) -> pa.Table:
    """Rows in the FeatureStore schema (``feature`` as ``fixed_size_list<float32>[d]``)."""
    n, d = feats.shape
    k = topk_idx.shape[1]

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)  # k = 0: a surrogate without a classifier
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))

    return pa.table(
        {
            "id": pa.array(np.asarray(ids, dtype=np.int64)),
            "label": pa.array(np.asarray(labels, dtype=np.int32)),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), type=pa.float32()), d),
            "topk_idx": lists(topk_idx.astype(np.int32), pa.int32()),
            "topk_logit": lists(topk_logit.astype(np.float32), pa.float32()),
        }
    )


def write_shard(table: pa.Table, path: str | Path) -> None:
    """Write FeatureStore rows as one parquet shard, each page with its CRC32 (checked on every read)."""
    pq.write_table(table, path, write_page_checksum=True)


def open_shard(path: str | Path, **options: Any) -> pq.ParquetFile:
    """A shard opened for reading with its pages' CRC32s checked (shards written before they had them read as before)."""
    return pq.ParquetFile(path, page_checksum_verification=True, **options)


@dataclass
class FeatureStore:
    """An opened FeatureStore directory and its manifest."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise UserError(f"{path} is not a FeatureStore (no {MANIFEST}); create it with `dp4tl extract`")
        store = cls(path, read_json(mf, store_fix(path), MANIFEST_KEYS))
        store.check_shards()
        return store

    def check_shards(self) -> None:
        """Refuse shards that are truncated, garbled or of another schema, or rows the manifest does not
        count (footers only: cheap)."""
        fix = store_fix(self.path)
        columns = [pa.field("id", pa.int64()), pa.field("feature", pa.list_(pa.float32(), self.dim)), "label",
                   "topk_idx", "topk_logit"]
        rows = sum(parquet_metadata(f, fix, columns).num_rows for f in self.files)
        if rows != self.num_rows:
            raise damaged(self.path, f"shards hold {rows} rows, {MANIFEST} says {self.num_rows}", fix)

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.path.glob("*.parquet") if not p.name.startswith("."))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The whole store (or ``columns`` of it) as one Arrow table sorted by id."""
        tables = []
        for f in self.files:
            with reading_shard(f), open_shard(f) as shard:
                tables.append(shard.read(columns=columns))
        if not tables:
            raise damaged(self.path, "holds no parquet shard", store_fix(self.path))
        return pa.concat_tables(tables).sort_by("id")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``ids, labels, features[n, d], topk_idx[n, k]`` as numpy, sorted by id."""
        t = self.read(["id", "label", "feature", "topk_idx"])
        feats = feature_matrix(t.column("feature"))
        k = int(self.manifest["topk"])
        topk = np.asarray(t.column("topk_idx").combine_chunks().flatten(), dtype=np.int32).reshape(t.num_rows, k)
        return t.column("id").to_numpy(), t.column("label").to_numpy(), feats, topk


def store_fix(path: Path) -> str:
    """What to do about a damaged FeatureStore at ``path``."""
    return f"delete {path} and re-run `dp4tl extract`"


def reading_shard(path: Path):
    """:func:`~dp4tl_ray.artifact_io.reading` for a shard of a store: a failure names the file and the store's fix."""
    return reading(path, store_fix(path.parent))


def feature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``fixed_size_list<float32>[d]`` column -> ``float32[n, d]`` (no copy where possible)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, d)


def read_rows(paths: list[Path], label_range: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ids int64[n], labels int32[n], features float32[n, d]`` of some FeatureStore parquet files, in file order;
    with ``label_range = (lo, hi)`` only the rows with ``lo <= label < hi``.

    Streamed in small batches into arrays sized up front (from the footers, or from a first pass over the
    label column when filtering, which also skips row groups holding none of the range), so the only
    sizeable new memory is the result: Arrow's decode buffers stay small and are reused batch after batch
    (reading whole row groups allocated ~5x the features in transient buffers). ``ParquetFile`` also skips
    the ``pyarrow.dataset`` import that ``pq.read_table`` pays on first use. A damaged file (a k-means or
    class-statistics actor reads its files in its first call) is the one-line error naming it.
    """
    files = []
    for p in paths:
        with reading_shard(p):
            files.append(open_shard(p, buffer_size=READ_BUFFER_BYTES, pre_buffer=False))
    groups = [list(range(f.num_row_groups)) for f in files]
    if label_range is None:
        n = sum(f.metadata.num_rows for f in files)
    else:
        lo, hi = label_range
        n = 0
        for p, f, rgs in zip(paths, files, groups):
            wanted = []
            for rg in rgs:
                with reading_shard(p):
                    labels = f.read_row_group(rg, columns=["label"], use_threads=False).column(0).to_numpy()
                hits = int(np.count_nonzero((labels >= lo) & (labels < hi)))
                if hits:
                    wanted.append(rg)
                    n += hits
            rgs[:] = wanted
    d = files[0].schema_arrow.field("feature").type.list_size
    ids, labels, x = np.empty(n, np.int64), np.empty(n, np.int32), np.empty((n, d), np.float32)
    start = 0
    for p, f, rgs in zip(paths, files, groups):
        if not rgs:
            continue
        with reading_shard(p):
            for batch in f.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=rgs, columns=["id", "label", "feature"],
                                        use_threads=False):
                lab = batch.column(1).to_numpy()
                keep = slice(None) if label_range is None else (lab >= label_range[0]) & (lab < label_range[1])
                b_ids, b_x = batch.column(0).to_numpy()[keep], feature_matrix(batch.column(2))[keep]
                end = start + len(b_ids)
                ids[start:end], labels[start:end], x[start:end] = b_ids, lab[keep], b_x
                start = end
    return ids, labels, x
