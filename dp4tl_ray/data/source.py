"""One handle for an image dataset, whichever reader it needs, and its decoded Ray Dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dp4tl_ray.data.decode import DecodeSpec, decode_batch
from dp4tl_ray.data.imagefolder import FolderIndex, read_class_index, scan_image_folder
from dp4tl_ray.data.parquet import ShardSet, open_shards
from dp4tl_ray.errors import UserError


@dataclass(frozen=True)
class ImageSource:
    """An ImageNet-style folder tree or a directory of parquet shards, opened."""

    path: Path
    format: str  # "folder" | "parquet"
    handle: FolderIndex | ShardSet

    @property
    def classes(self) -> list[str]:
        return self.handle.classes

    @property
    def num_rows(self) -> int:
        return len(self.handle) if isinstance(self.handle, FolderIndex) else self.handle.num_rows

    @property
    def fingerprint(self) -> str:
        return self.handle.fingerprint

    @property
    def identities(self) -> set[str]:
        """Fingerprints this data is known by: its own, and for shards the folder tree they came from
        (ids are the same, so a keep-set selected on either applies to both)."""
        origin = getattr(self.handle, "origin_fingerprint", None)
        return {self.fingerprint} | ({origin} if origin else set())

    def rows(self, rows_per_block: int = 256, exclude=None):
        """A Ray Dataset of undecoded ``id, label`` + ``path`` (folder) or ``image`` bytes (shards) rows:
        cheap to filter by id (a KeepSet) before any image is read. ``exclude``: sorted ids to leave out
        (a resumed extraction's finished rows): a folder's are dropped from the index it already holds,
        shards' by a filter where they are read."""
        if self.format == "parquet":
            from dp4tl_ray.data.parquet import shards_dataset
            from dp4tl_ray.select.keepset import filter_by_ids

            rows = shards_dataset(self.handle)
            return rows if exclude is None or not len(exclude) else filter_by_ids(rows, exclude, keep=False)
        from dp4tl_ray.data.imagefolder import index_dataset

        return index_dataset(self.handle, rows_per_block, exclude)

    @property
    def decode_root(self) -> str | None:
        """Where ``path`` rows are relative to (folders); None for shards, whose rows carry the bytes."""
        return None if self.format == "parquet" else str(self.handle.root)

    def decode(self, rows, spec: DecodeSpec, rows_per_block: int = 256, on_skip=None):
        """Decode ``rows`` (from :meth:`rows`, possibly filtered) into ``id, label, image`` (uint8 HxWx3).

        Unreadable images are dropped (their ``(id, path, error)`` handed to ``on_skip`` if given). Decoding runs in CPU
        tasks, streaming."""
        return rows.map_batches(
            decode_batch, fn_kwargs={"spec": spec, "root": self.decode_root, "on_skip": on_skip}, batch_size=rows_per_block,
            num_cpus=1,
            # A memory reservation sized to the decoded block; it also keeps decode in its own CPU
            # tasks (Ray does not fuse it into model actors), so decode overlaps inference.
            memory=_decode_task_memory(spec, rows_per_block),
        )

    def decoded(self, spec: DecodeSpec, rows_per_block: int = 256, on_skip=None):
        """Every image, decoded: ``decode(rows())``."""
        return self.decode(self.rows(rows_per_block), spec, rows_per_block, on_skip)


def _decode_task_memory(spec: DecodeSpec, rows: int) -> int:
    """Bytes a decode task holds, with the 25% headroom Ray Data's memory issue detector asks for (it warns
    when a task's peak USS x 1.25 exceeds the request): a worker process (135-150 MiB measured, so 200 MiB
    reserved) plus the decoded block and PIL buffers."""
    return (200 << 20) + 5 * rows * spec.resize * spec.resize * 3


def open_source(path: str | Path, format: str = "auto", class_index: str | Path | None = None) -> ImageSource:
    """Open ``path`` as a folder tree or parquet shards (``auto``: shards if it holds ``*.parquet``)."""
    src = Path(path)
    if not src.is_dir():
        raise UserError(f"source {src} does not exist; pass an image folder (e.g. <root>/train) or a shard directory")
    if format not in ("auto", "folder", "parquet"):
        raise UserError(f"format must be folder, parquet or auto, got {format!r}")
    if format == "auto":
        format = "parquet" if any(src.glob("*.parquet")) else "folder"
    if format == "parquet":
        shards = open_shards(src)
        if class_index is not None and read_class_index(class_index) != shards.classes:
            raise UserError(f"class index {class_index} differs from the shards' class_index.json; re-shard with it")
        return ImageSource(src, format, shards)
    return ImageSource(src, format, scan_image_folder(src, class_index))
