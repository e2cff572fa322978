"""torchvision's JPEG decoder in the model actors: the PIL stage's transform, rows and skips (no Ray).

On CPU these run torchvision's libjpeg-turbo decoder, the same code path nvjpeg takes on a GPU; the
CUDA test runs only where a GPU is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dp4tl_ray.data.decode import DecodeSpec, decode_batch
from dp4tl_ray.data.device_decode import decode_batch_on_device

SPEC = DecodeSpec.for_size(56, 64)


def _photo(w: int, h: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth gradient with noise (photo-like, so the two resamplers are compared fairly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 8, (h, w, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def _batch(items: list[bytes]) -> dict[str, np.ndarray]:
    return {"id": np.arange(len(items)) + 100, "label": np.arange(len(items)) % 3,
            "image": np.array(items, dtype=object)}


def _mixed() -> list[bytes]:
    jpegs = [_photo(300, 200), _photo(180, 240, seed=1), _photo(64, 64, seed=2)]
    png, cmyk, gray = _photo(100, 150, "PNG"), _photo(120, 90, mode="CMYK"), _photo(120, 90, mode="L")
    truncated, junk = jpegs[0][: len(jpegs[0]) // 2], b"\xff\xd8\xff but not a JPEG"
    return jpegs + [png, cmyk, gray, truncated, junk, b""]


def test_device_decode_keeps_the_pil_stages_rows_and_skips_and_its_pixels_within_a_few_levels():
    batch = _batch(_mixed())
    pil_skips, dev_skips = [], []
    pil = decode_batch(batch, spec=SPEC, on_skip=pil_skips.extend)
    dev = decode_batch_on_device(batch, spec=SPEC, device=torch.device("cpu"), on_skip=dev_skips.extend)
    assert dev["id"].tolist() == pil["id"].tolist() == [100, 101, 102, 103, 104, 105]  # PNG, CMYK, gray read too
    assert dev["label"].tolist() == pil["label"].tolist()
    assert [s[0] for s in dev_skips] == [s[0] for s in pil_skips] == [106, 107, 108]
    assert isinstance(dev["image"], torch.Tensor) and dev["image"].dtype == torch.uint8
    assert tuple(dev["image"].shape) == pil["image"].shape == (6, 56, 56, 3)
    diff = np.abs(dev["image"].numpy().astype(int) - pil["image"].astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 8  # another resampler, no DCT draft: a few levels at most


def test_skip_reasons_read_the_same_in_every_run():
    """PIL's message names a buffer by its address; the record leaves it out, so two runs agree."""
    skips = []
    decode_batch_on_device(_batch([b"\xff\xd8\xff but not a JPEG"]), spec=SPEC, device=torch.device("cpu"),
                           on_skip=skips.extend)
    decode_batch(_batch([b"\xff\xd8\xff but not a JPEG"]), spec=SPEC, on_skip=skips.extend)
    assert len(skips) == 2 and skips[0] == skips[1] and "0x" not in skips[0][2], skips


def test_a_batch_that_reads_nothing_gives_an_empty_image_tensor():
    skips = []
    out = decode_batch_on_device(_batch([b"", b"junk"]), spec=SPEC, device=torch.device("cpu"), on_skip=skips.extend)
    assert out["id"].size == 0 and tuple(out["image"].shape) == (0, 56, 56, 3) and len(skips) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg needs a CUDA GPU")
def test_nvjpeg_on_the_gpu_matches_the_cpu_decoder():
    batch = _batch(_mixed())
    cpu = decode_batch_on_device(batch, spec=SPEC, device=torch.device("cpu"))
    gpu = decode_batch_on_device(batch, spec=SPEC, device=torch.device("cuda"))
    assert gpu["image"].is_cuda and gpu["id"].tolist() == cpu["id"].tolist()
    diff = (gpu["image"].cpu().int() - cpu["image"].int()).abs()
    assert diff.float().mean() < 1.5 and diff.max() <= 8  # nvjpeg's IDCT and upsampling differ slightly
