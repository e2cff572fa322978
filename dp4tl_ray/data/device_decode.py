"""JPEG decode in the model actors with ``torchvision.io.decode_jpeg``, on the actor's device: nvjpeg
on a GPU (one batched call per batch), libjpeg-turbo on CPU. ``ExtractConfig.jpeg_decoder =
"torchvision"``; the default, ``"pil"``, is the CPU stage of decode.py (in CPU tasks beside GPU actors).

Same transform as the CPU stage: shorter side resized to ``spec.resize`` (bilinear, antialiased), centre
crop ``spec.size``. The pixels differ slightly from PIL's (no DCT-domain draft downscale, another
resampler), so the decoder is part of a FeatureStore's key. A batch that fails to decode as a whole
is decoded image by image, so a damaged file costs only itself: an image that is not a JPEG, or
that this decoder refuses (e.g. CMYK), goes through the CPU stage's PIL decode, and one that neither
reads is skipped and handed to ``on_skip``, as on CPU. (torchvision 0.29 deprecates its image decoders
in favour of TorchCodec; ``decode_jpeg`` is what the pinned stack has.)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from dp4tl_ray.data.decode import DecodeSpec, decode_image, encoded_bytes, row_where, skip_reason

if TYPE_CHECKING:
    import torch

JPEG_MAGIC = b"\xff\xd8\xff"


def resize_and_crop(image: torch.Tensor, spec: DecodeSpec) -> torch.Tensor:
    """uint8 CHW -> uint8 HWC ``[size, size, 3]``: shorter side to ``spec.resize`` (bilinear,
    antialiased), then the centre crop, on the image's device (the sizes decode_image uses)."""
    import torch

    _, h, w = image.shape
    scale = spec.resize / min(w, h)
    nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
    if (nw, nh) != (w, h):
        image = torch.nn.functional.interpolate(image[None].float(), size=(nh, nw), mode="bilinear",
                                                antialias=True, align_corners=False)[0].round_().clamp_(0, 255).byte()
    top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
    return image[:, top:top + spec.size, left:left + spec.size].permute(1, 2, 0)


def _decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """CHW uint8 RGB images on ``device``, one batched call; image by image where it fails (None: refused)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    with warnings.catch_warnings():
        # torchvision 0.29's notice that its decoders move to TorchCodec, raised on every call
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def decode_batch_on_device(batch: dict[str, np.ndarray], *, spec: DecodeSpec, device: torch.device,
                           root: str | None = None,
                           on_skip: Callable[[list[tuple[int, str, str]]], Any] | None = None) -> dict[str, Any]:
    """Rows with ``image`` bytes or ``path`` -> ``id, label`` arrays and ``image``, a uint8 NHWC tensor on
    ``device``; unreadable rows dropped and handed to ``on_skip`` as ``(id, path, error)``."""
    import torch

    if not spec.crop:
        raise ValueError("device decode is for extraction (centre-cropped images)")
    ids = np.asarray(batch["id"])
    rows, wheres, data, bad = [], [], [], []
    for i in range(len(ids)):
        where = row_where(batch, i)
        try:
            data.append(encoded_bytes(batch, i, where, root))
            rows.append(i)
            wheres.append(where)
        except OSError as e:
            bad.append((int(ids[i]), where, skip_reason(e)))
    jpeg = [k for k, d in enumerate(data) if d[:3] == JPEG_MAGIC]
    decoded: list[torch.Tensor | None] = [None] * len(data)
    for k, image in zip(jpeg, _decode_jpegs([data[k] for k in jpeg], device) if jpeg else []):
        decoded[k] = None if image is None else resize_and_crop(image, spec)
    keep = []
    for k, i in enumerate(rows):
        if decoded[k] is None:  # not a JPEG, or refused by this decoder: the CPU stage's decode
            try:
                decoded[k] = torch.from_numpy(decode_image(data[k], spec).copy()).to(device)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and recorded
                bad.append((int(ids[i]), wheres[k], skip_reason(e)))
                continue
        keep.append(k)
    if bad and on_skip is not None:
        on_skip(bad)
    kept_rows = np.asarray([rows[k] for k in keep], dtype=np.int64)
    images = (torch.stack([decoded[k] for k in keep]) if keep
              else torch.zeros((0, spec.size, spec.size, 3), dtype=torch.uint8, device=device))
    return {"id": ids[kept_rows].astype(np.int64), "label": np.asarray(batch["label"])[kept_rows].astype(np.int32),
            "image": images}


__all__ = ["JPEG_MAGIC", "decode_batch_on_device", "resize_and_crop"]
