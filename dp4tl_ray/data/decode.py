"""The CPU decode stage shared by every reader: bytes or path -> resized RGB uint8, centre-cropped
for extraction and evaluation, whole (short side resized) for training's random crops.

Unreadable images (truncated, empty, not an image) are dropped from the stream and handed to the
caller's ``on_skip`` (extraction commits them next to its parts), so a run goes on and its summary
lists exactly what was skipped.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


# A training decode keeps the whole image up to this aspect ratio (longer side centre-cropped to it):
# nearly every photo fits (ImageNet's are mostly 4:3 to 16:9) and a panorama cannot blow up memory.
TRAIN_MAX_ASPECT = 2
TYPICAL_ASPECT = 4 / 3  # ImageNet's usual photo: the estimate of a training decode's size


@dataclass(frozen=True)
class DecodeSpec:
    """How images are decoded: resize the shorter side to ``resize``, then centre-crop ``size``
    (``crop``: extraction, evaluation) or keep the image whole, its shape varying with its aspect
    (training: RandomResizedCrop then draws from all of it, as the ImageNet recipe does)."""

    size: int = 224
    resize: int = 256
    crop: bool = True

    @classmethod
    def for_size(cls, size: int, resize: int | None = None, crop: bool = True) -> DecodeSpec:
        """``resize`` defaults to the usual ImageNet ratio, ``size * 8/7`` (224 -> 256)."""
        return cls(size, resize or round(size * 8 / 7), crop)

    def bytes_per_image(self) -> int:
        """Bytes of one decoded image: exact when cropped, else at :data:`TYPICAL_ASPECT`."""
        return 3 * (self.size * self.size if self.crop else self.resize * round(self.resize * TYPICAL_ASPECT))

    def __post_init__(self) -> None:
        from dp4tl_ray.errors import UserError

        if self.size < 8 or self.resize < self.size:
            raise UserError(f"bad image size {self.size}/resize {self.resize}: need 8 <= size <= resize")


def decode_image(data: bytes, spec: DecodeSpec) -> np.ndarray:
    """Decode one encoded image to ``uint8[size, size, 3]`` (eval transform: resize + centre crop), or
    without ``crop`` to ``uint8[H, W, 3]`` with the shorter side ``resize`` (the longer at most
    :data:`TRAIN_MAX_ASPECT` times it)."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (spec.resize, spec.resize))  # JPEG DCT-domain downscale: much faster decode
        img = img.convert("RGB")
        w, h = img.size
        scale = spec.resize / min(w, h)
        if (w, h) != (round(w * scale), round(h * scale)):
            img = img.resize((max(spec.size, round(w * scale)), max(spec.size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        longest = TRAIN_MAX_ASPECT * min(w, h)
        cw, ch = (spec.size, spec.size) if spec.crop else (min(w, longest), min(h, longest))
        if (cw, ch) != (w, h):
            left, top = (w - cw) // 2, (h - ch) // 2
            img = img.crop((left, top, left + cw, top + ch))
        return np.asarray(img, dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], *, spec: DecodeSpec, root: str | None = None,
                 on_skip: Callable[[list[tuple[int, str, str]]], Any] | None = None) -> dict[str, np.ndarray]:
    """Ray Data UDF: rows with ``image`` bytes (parquet) or ``path`` (folder) -> ``id, label, image``.

    Rows that fail to decode are dropped; ``on_skip`` first gets their ``(id, path, error)``. ``image`` is
    uint8 NHWC, or (uncropped images of several shapes) an object array of HWC images, which Ray
    Data stores as a variable-shaped tensor column.
    """
    ids, labels = batch["id"], batch["label"]
    keep, images, bad = [], [], []
    for i in range(len(ids)):
        where = row_where(batch, i)
        try:
            images.append(decode_image(encoded_bytes(batch, i, where, root), spec))
            keep.append(i)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and recorded
            bad.append((int(ids[i]), where, skip_reason(e)))
    if bad and on_skip is not None:
        on_skip(bad)
    keep_idx = np.asarray(keep, dtype=np.int64)
    return {
        "id": np.asarray(ids)[keep_idx].astype(np.int64),
        "label": np.asarray(labels)[keep_idx].astype(np.int32),
        "image": stack_images(images) if images else np.zeros((0, spec.size, spec.size, 3), np.uint8),
    }


def skip_reason(error: Exception) -> str:
    """A skip record's reason: the error's type and text, without the object addresses PIL puts in it
    (``<_io.BytesIO object at 0x...>``), so two runs record the same text for the same file."""
    return re.sub(r" object at 0x[0-9a-fA-F]+", " object", f"{type(error).__name__}: {error}")[:200]


def row_where(batch: dict[str, np.ndarray], i: int) -> str:
    """How a skip record names row ``i``: its path (folder rows), else its id (parquet rows)."""
    return str(batch["path"][i]) if "path" in batch else f"id={int(batch['id'][i])}"


def encoded_bytes(batch: dict[str, np.ndarray], i: int, where: str, root: str | None) -> bytes:
    """Row ``i``'s encoded image: its ``image`` bytes, else the file at ``root / where``."""
    return batch["image"][i] if "image" in batch else (Path(root) / where).read_bytes()


def stack_images(images) -> np.ndarray:
    """HWC images (a list or batches' arrays) as one uint8 NHWC array when they share a shape, else
    a 1-D object array of them: how Ray Data hands out a variable-shaped tensor column."""
    if len({img.shape for img in images}) <= 1:
        return np.stack(images)
    out = np.empty(len(images), dtype=object)
    for i, img in enumerate(images):
        out[i] = img
    return out
