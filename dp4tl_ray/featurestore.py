"""The FeatureStore: parquet shards of per-row surrogate outputs plus ``manifest.json``.

Columns ``id:int64, label:int32, feature:fixed_size_list<float32>[d]`` (L2-normalised),
``topk_idx:list<int32>, topk_logit:list<float32>``. Pure pyarrow/numpy: reading a store does not
import torch (k-means actors and selection stay light).
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
MANIFEST_KEYS = ("dim", "num_rows", "topk")  # what the store itself reads from its manifest


def feature_table(ids, labels, feats: np.ndarray, topk_idx: np.ndarray, topk_logit: np.ndarray) -> pa.Table:
    """Rows in the FeatureStore schema (``feature`` as ``fixed_size_list<float32>[d]``)."""
    n, d = feats.shape
    k = topk_idx.shape[1]

    def lists(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
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
        """The whole store as one Arrow table sorted by id (small stores, tests and tools)."""
        with reading(self.path, store_fix(self.path)):
            table = pq.ParquetDataset(self.files).read(columns=columns)
        return table.sort_by("id")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``ids, labels, features[n, d], topk_idx[n, k]`` as numpy, sorted by id."""
        t = self.read(["id", "label", "feature", "topk_idx"])
        feats = feature_matrix(t.column("feature"))
        k = int(self.manifest["topk"])
        topk = np.asarray(t.column("topk_idx").combine_chunks().flatten(), dtype=np.int32).reshape(-1, k)
        return t.column("id").to_numpy(), t.column("label").to_numpy(), feats, topk

    def dataset(self, columns: list[str] | None = None):
        """The store as a Ray Dataset (streams; nothing gathered on the driver)."""
        import ray.data

        return ray.data.read_parquet([str(f) for f in self.files], columns=columns)


def store_fix(path: Path) -> str:
    """What to do about a damaged FeatureStore at ``path``."""
    return f"delete {path} and re-run `dp4tl extract`"


def feature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``fixed_size_list<float32>[d]`` column -> ``float32[n, d]`` (no copy where possible)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, d)
