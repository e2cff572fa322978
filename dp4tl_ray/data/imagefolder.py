"""ImageNet-style folder trees (``<root>/<class>/<image>``) -> a stable index and a Ray Dataset.

Row ``id`` is the position of the file in the sorted list of relative paths, so it is the same
on every run and on every reader (the parquet shards of :mod:`dp4tl_ray.data.parquet` carry it).
``label`` is the class's position in the class index (sorted class folder names unless a class
index file fixes it, e.g. the canonical ImageNet wnid order).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import damaged, read_json
from dp4tl_ray.errors import UserError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class FolderIndex:
    """Every image file of a class-folder tree with its stable id and label."""

    root: Path
    classes: list[str]  # class index: position = label
    paths: list[str]  # relative paths, sorted; position = id
    labels: np.ndarray  # int32, one per path
    fingerprint: str  # sha256 over class list and (path, size, mtime) of every file

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def table(self) -> pa.Table:
        """``id, label, path`` as an Arrow table (paths relative to ``root``)."""
        return pa.table(
            {
                "id": pa.array(np.arange(len(self.paths), dtype=np.int64)),
                "label": pa.array(self.labels, type=pa.int32()),
                "path": pa.array(self.paths, type=pa.string()),
            }
        )


def read_class_index(path: str | Path) -> list[str]:
    """Class names in label order from a ``{name: index}`` JSON file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class index file {path} not found; write one with `dp4tl data index`")
    fix = "write it again with `dp4tl data index` (or fix the JSON by hand)"
    mapping = read_json(path, fix)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in mapping.values()):
        raise damaged(path, "must map class names to integer labels", fix)
    order = sorted(mapping, key=mapping.__getitem__)
    if [mapping[c] for c in order] != list(range(len(order))):
        raise UserError(f"class index {path} must map names to 0..N-1 with no gaps or repeats")
    return order


def write_class_index(classes: list[str], path: str | Path) -> Path:
    """Write ``{name: index}`` atomically."""
    return atomic.write_json(path, {c: i for i, c in enumerate(classes)})


def scan_image_folder(root: str | Path, class_index: str | Path | list[str] | None = None) -> FolderIndex:
    """List ``root/<class>/<file>`` images (sorted) into a :class:`FolderIndex`.

    With ``class_index`` (a JSON file or list of names) labels follow it; a class folder missing
    from it is an error, while index classes with no folder are allowed (a subset of ImageNet).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; generate one with `dp4tl data synth` or pass the train/ dir")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise UserError(f"image folder {root} has no class sub-folders; expected <root>/<class>/<image> files")
    if class_index is None:
        classes = folders
    else:
        classes = class_index if isinstance(class_index, list) else read_class_index(class_index)
        missing = sorted(set(folders) - set(classes))
        if missing:
            raise UserError(
                f"class folder(s) {missing[:5]} under {root} are not in the class index; "
                "fix the index or remove the folders"
            )
    class_to_idx = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    h = hashlib.sha256("\n".join(classes).encode())
    for cls in folders:
        entries = sorted(
            (e for e in os.scandir(root / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        for e in entries:
            rel = f"{cls}/{e.name}"
            st = e.stat()
            h.update(f"\n{rel}\t{st.st_size}\t{st.st_mtime_ns}".encode())
            paths.append(rel)
            labels.append(class_to_idx[cls])
    if not paths:
        raise UserError(f"image folder {root} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderIndex(root, list(classes), paths, np.asarray(labels, dtype=np.int32), h.hexdigest())


def index_dataset(index: FolderIndex, rows_per_block: int = 256, exclude=None):
    """A Ray Dataset of ``id, label, path`` rows, in blocks of ``rows_per_block``, without the rows whose
    id is in ``exclude`` (sorted).

    ``from_blocks``, not ``from_arrow``: the driver holds the index, so the blocks' metadata is computed
    here. ``from_arrow`` runs a 1-CPU Ray task per block for it; on a small cluster those finished
    tasks still hold every CPU in Ray's resource view (it lags by tens of ms) when the next stage
    materializes the dataset (pretraining's decode cache), and Ray Data then warns that "the Ray cluster
    currently does not have any available CPUs. The Dataset job will hang ..." on a healthy run. The
    tasks also cost worker start-ups (seconds on a fresh cluster)."""
    import ray.data

    table = index.table()
    if exclude is not None and len(exclude):
        from dp4tl_ray.select.keepset import isin_sorted

        table = table.filter(pa.array(~isin_sorted(table.column("id").to_numpy(), np.asarray(exclude))))
    blocks = [table.slice(i, rows_per_block) for i in range(0, len(table), rows_per_block)]
    return ray.data.from_blocks(blocks)
