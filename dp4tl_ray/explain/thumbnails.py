"""Small inline thumbnails of the images behind a FeatureStore's row ids, read from the source it names.

The store's manifest names the folder tree or parquet shards it was extracted from; the rows' ids index
them as every reader does (:mod:`dp4tl_ray.data.imagefolder`). Thumbnails are data URIs, so the page
that shows them is one self-contained file.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Collection
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from dp4tl_ray.data.decode import DecodeSpec, decode_image
from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.data.parquet import open_shards
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import FeatureStore

THUMB_PX = 64


def image_bytes(store: FeatureStore, ids: Collection[int]) -> dict[int, bytes]:
    """Encoded bytes of the source images with these ids (folder files or parquet ``image`` cells)."""
    m = store.manifest
    root = Path(m["source"])
    fix = f"restore it (or re-extract {store.path} from where the images are now)"
    if not root.is_dir():
        raise UserError(f"the images of FeatureStore {store.path} are not at {root}; {fix}")
    wanted = sorted({int(i) for i in ids})
    if m.get("source_format") == "parquet":
        shards = open_shards(root)
        fingerprints = {shards.fingerprint, shards.origin_fingerprint}
    else:
        index = scan_image_folder(root, list(m["classes"]))
        fingerprints = {index.fingerprint}
    if m["source_fingerprint"] not in fingerprints:
        raise UserError(f"the images at {root} changed since FeatureStore {store.path} was extracted; {fix}")
    if not wanted:
        return {}
    if m.get("source_format") == "parquet":
        table = pq.ParquetDataset(shards.files, filters=[("id", "in", wanted)]).read(columns=["id", "image"])
        return dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist()))
    return {i: (root / index.paths[i]).read_bytes() for i in wanted}


def thumbnail_uri(data: bytes, px: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the image as the surrogate saw it (shorter side resized, centre crop), ``px``
    square; None for bytes that do not decode."""
    try:
        pixels = decode_image(data, DecodeSpec(px, px))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnails(store: FeatureStore, ids: Collection[int], px: int = THUMB_PX) -> dict[int, str]:
    """Data URIs of the images behind ``ids``; unreadable images are left out."""
    uris = {i: thumbnail_uri(data, px) for i, data in image_bytes(store, ids).items()}
    return {i: uri for i, uri in uris.items() if uri is not None}
