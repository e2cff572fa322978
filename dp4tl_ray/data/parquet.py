"""Parquet shards of encoded images (``id, label, path, image`` bytes): how a source goes to object storage.

``shard_image_folder`` converts a folder tree into shards that carry the folder reader's ids and
labels, so both readers give the same ``(id, label)`` pairs. Bytes are copied as they are, or with
``max_side`` images larger than that are re-encoded smaller (JPEG, as FFCV stores ImageNet at max
side 256, because decoding full-size photos is the bottleneck of a CPU input pipeline); unreadable
files are copied as they are and caught later by the shared decode stage, as for folders.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
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
DEFAULT_QUALITY = 90  # JPEG quality of re-encoded images (FFCV's ImageNet setting)


@dataclass(frozen=True)
class Reencode:
    """Re-encode images whose longer side exceeds ``max_side`` to that side, as JPEG of ``quality``."""

    max_side: int
    quality: int = DEFAULT_QUALITY

    def __post_init__(self) -> None:
        if self.max_side < 8:
            raise UserError(f"max_side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 95:
            raise UserError(f"JPEG quality must be in [1, 95], got {self.quality}")

    def apply(self, data: bytes) -> bytes:
        """``data`` re-encoded if its longer side exceeds ``max_side``; else (or if unreadable) as is,
        so small images lose nothing and broken files stay for the decode stage to record."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                if max(img.size) <= self.max_side:
                    return data
                img.draft("RGB", (self.max_side, self.max_side))  # JPEG: DCT-domain downscale first
                img = img.convert("RGB")
                img.thumbnail((self.max_side, self.max_side), Image.LANCZOS)  # keeps the aspect ratio
                out = io.BytesIO()
                img.save(out, format="JPEG", quality=self.quality)
                return out.getvalue()
        except Exception:  # noqa: BLE001 - unreadable: left to the decode stage, which records it as skipped
            return data


@dataclass(frozen=True)
class ShardSet:
    """A directory of image shards: files, class names and a fingerprint of the contents."""

    root: Path
    files: list[Path]
    classes: list[str]
    num_rows: int
    fingerprint: str
    origin_fingerprint: str | None = None  # the folder tree's, when written by shard_image_folder
    reencode: Reencode | None = None  # how the images were re-encoded, if they were


def shard_image_folder(index: FolderIndex, out_dir: str | Path, rows_per_shard: int = 1000,
                       reencode: Reencode | None = None) -> ShardSet:
    """Write ``index``'s images into ``out_dir/part-XXXXX.parquet`` (atomically, as a whole directory),
    re-encoded by ``reencode`` if given (recorded in ``shards.json``)."""
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
                    "image": pa.array([_image_bytes(index.root / p, reencode) for p in paths], type=pa.binary()),
                },
                schema=SHARD_SCHEMA,
            )
            pq.write_table(table, tmp / f"part-{start // rows_per_shard:05d}.parquet")
        write_class_index(index.classes, tmp / "class_index.json")
        atomic.write_json(
            tmp / SHARDS_META,
            {"num_rows": len(index), "rows_per_shard": rows_per_shard, "source": str(index.root),
             "source_fingerprint": index.fingerprint, "reencode": asdict(reencode) if reencode else None},
        )
    return open_shards(out_dir)


def _image_bytes(path: Path, reencode: Reencode | None) -> bytes:
    data = path.read_bytes()
    return reencode.apply(data) if reencode else data


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
    meta_file = root / SHARDS_META
    meta = read_json(meta_file, fix) if meta_file.is_file() else {}
    reencode = Reencode(**meta["reencode"]) if meta.get("reencode") else None
    return ShardSet(root, files, classes, num_rows, h.hexdigest(), meta.get("source_fingerprint"), reencode)


def shards_dataset(shards: ShardSet):
    """A Ray Dataset of ``id, label, path, image`` rows streamed from the shards."""
    import ray.data

    return ray.data.read_parquet([str(f) for f in shards.files], columns=["id", "label", "path", "image"])
