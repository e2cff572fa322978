"""The FeatureStore: parquet shards of per-row surrogate outputs plus ``manifest.json``.

Columns ``id:int64, label:int32, feature:fixed_size_list<float32>[d]`` (L2-normalised),
``topk_idx:list<int32>, topk_logit:list<float32>``. Pure pyarrow/numpy: reading a store does not
import torch (k-means actors and selection stay light).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray.errors import UserError

MANIFEST = "manifest.json"


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
        return cls(path, json.loads(mf.read_text()))

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
        table = pq.ParquetDataset(self.files).read(columns=columns)
        return table.sort_by("id")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``ids, labels, features[n, d], topk_idx[n, k]`` as numpy, sorted by id."""
        t = self.read(["id", "label", "feature", "topk_idx"])
        feats = feature_matrix(t.column("feature"))
        k = int(self.manifest["topk"])
        topk = np.asarray(t.column("topk_idx").combine_chunks().flatten(), dtype=np.int32).reshape(t.num_rows, k)
        return t.column("id").to_numpy(), t.column("label").to_numpy(), feats, topk

    def dataset(self, columns: list[str] | None = None):
        """The store as a Ray Dataset (streams; nothing gathered on the driver)."""
        import ray.data

        return ray.data.read_parquet([str(f) for f in self.files], columns=columns)


def feature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``fixed_size_list<float32>[d]`` column -> ``float32[n, d]`` (no copy where possible)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, d)
