"""Parquet shards of encoded images (``id, label, path, image`` bytes): how a source goes to object storage.

``shard_image_folder`` converts a folder tree into shards that carry the folder reader's ids and
labels, so both readers give the same ``(id, label)`` pairs. Bytes are copied as they are (no
re-encoding); unreadable files are caught later by the shared decode stage, as for folders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import parquet_metadata, read_json
from dp4tl_ray.data.imagefolder import FolderIndex, read_class_index, write_class_index
from dp4tl_ray.errors import UserError

SHARD_SCHEMA = pa.schema(
    [("id", pa.int64()), ("label", pa.int32()), ("path", pa.string()), ("image", pa.binary())]
)
SHARDS_META = "shards.json"


@dataclass(frozen=True)
class ShardSet:
    """A directory of image shards: files, class names and a fingerprint of the contents."""

    root: Path
    files: list[Path]
    classes: list[str]
    num_rows: int
    fingerprint: str
    origin_fingerprint: str | None = None  # the folder tree's, when written by shard_image_folder


def shard_image_folder(index: FolderIndex, out_dir: str | Path, rows_per_shard: int = 1000) -> ShardSet:
    """Write ``index``'s images into ``out_dir/part-XXXXX.parquet`` (atomically, as a whole directory)."""
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out_dir = Path(out_dir)
    with atomic.directory(out_dir) as tmp:
        for start in range(0, len(index), rows_per_shard):
            stop = min(start + rows_per_shard, len(index))
            paths = index.paths[start:stop]
            table = pa.table(
                {
                    "id": pa.array(range(start, stop), type=pa.int64()),
                    "label": pa.array(index.labels[start:stop], type=pa.int32()),
                    "path": pa.array(paths, type=pa.string()),
                    "image": pa.array([(index.root / p).read_bytes() for p in paths], type=pa.binary()),
                },
                schema=SHARD_SCHEMA,
            )
            pq.write_table(table, tmp / f"part-{start // rows_per_shard:05d}.parquet")
        write_class_index(index.classes, tmp / "class_index.json")
        atomic.write_json(
            tmp / SHARDS_META,
            {"num_rows": len(index), "rows_per_shard": rows_per_shard, "source": str(index.root),
             "source_fingerprint": index.fingerprint},
        )
    return open_shards(out_dir)


def open_shards(root: str | Path) -> ShardSet:
    """Open a shard directory written by :func:`shard_image_folder` (or laid out the same way)."""
    root = Path(root)
    files = sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise UserError(f"no parquet shards in {root}; create them with `dp4tl data shard`")
    index_file = root / "class_index.json"
    if not index_file.is_file():
        raise UserError(f"{root} has no class_index.json; shards need one (written by `dp4tl data shard`)")
    classes = read_class_index(index_file)
    h = hashlib.sha256("\n".join(classes).encode())
    num_rows = 0
    fix = f"re-create the shards with `dp4tl data shard` (or restore {root} from its source)"
    for f in files:
        md = parquet_metadata(f, fix, SHARD_SCHEMA.names)
        num_rows += md.num_rows
        h.update(f"\n{f.name}\t{f.stat().st_size}\t{md.num_rows}".encode())
    meta = root / SHARDS_META
    origin = read_json(meta, fix).get("source_fingerprint") if meta.is_file() else None
    return ShardSet(root, files, classes, num_rows, h.hexdigest(), origin)


def shards_dataset(shards: ShardSet):
    """A Ray Dataset of ``id, label, path, image`` rows streamed from the shards."""
    import ray.data

    return ray.data.read_parquet([str(f) for f in shards.files], columns=["id", "label", "path", "image"])
