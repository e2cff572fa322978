"""Training augmentations: shapes, per-sample randomness, independent views, seeded determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import dp4tl_ray
from dp4tl_ray.data.decode import DecodeSpec, decode_image, stack_images
from dp4tl_ray.data.transforms import _GaussianBlur, augment_batch, finetune_augment, moco_v2_augment, supervised_augment


def _batch(n: int = 6, side: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # a smooth gradient plus noise, so different crops give visibly different pixels
    ramp = np.linspace(0, 200, side, dtype=np.float32)
    base = ramp[None, :, None, None] + ramp[None, None, :, None] + rng.uniform(0, 55, (n, side, side, 3))
    image = np.clip(base, 0, 255).astype(np.uint8)
    image.setflags(write=False)  # Ray Data hands out read-only Arrow-backed arrays
    return {"id": np.arange(n, dtype=np.int64), "label": np.arange(n, dtype=np.int32) % 3, "image": image}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_supervised_augment_gives_uint8_crops_of_the_asked_size():
    out = supervised_augment(_batch(), size=24, generator=_gen(0))
    assert out["image"].shape == (6, 24, 24, 3) and out["image"].dtype == np.uint8
    assert np.array_equal(out["id"], np.arange(6)) and np.array_equal(out["label"], _batch()["label"])


def test_moco_v2_augment_gives_two_uint8_views_and_keeps_id_label():
    out = moco_v2_augment(_batch(), size=24, generator=_gen(0))
    assert set(out) == {"id", "label", "q", "k"}
    for view in ("q", "k"):
        assert out[view].shape == (6, 24, 24, 3) and out[view].dtype == np.uint8


def test_moco_v2_views_differ():
    out = moco_v2_augment(_batch(), size=24, generator=_gen(1))
    assert all(not np.array_equal(q, k) for q, k in zip(out["q"], out["k"]))


def test_augment_is_deterministic_with_a_seeded_generator():
    a, b = moco_v2_augment(_batch(), 24, generator=_gen(7)), moco_v2_augment(_batch(), 24, generator=_gen(7))
    c = moco_v2_augment(_batch(), 24, generator=_gen(8))
    assert np.array_equal(a["q"], b["q"]) and np.array_equal(a["k"], b["k"])
    assert not np.array_equal(a["q"], c["q"])
    assert np.array_equal(supervised_augment(_batch(), 24, generator=_gen(3))["image"],
                          supervised_augment(_batch(), 24, generator=_gen(3))["image"])


def test_augment_without_generator_differs_between_calls():
    a, b = supervised_augment(_batch(), 24)["image"], supervised_augment(_batch(), 24)["image"]
    assert not np.array_equal(a, b)


def test_each_sample_gets_its_own_crop():
    same = np.repeat(_batch(1)["image"], 8, axis=0)  # one image, eight times
    out = supervised_augment({"id": np.arange(8), "label": np.zeros(8), "image": same}, 24, generator=_gen(0))
    assert len({o.tobytes() for o in out["image"]}) == 8
    views = moco_v2_augment({"id": np.arange(8), "label": np.zeros(8), "image": same}, 24, generator=_gen(0))
    assert len({o.tobytes() for o in views["q"]}) == 8


def test_augment_leaves_the_global_torch_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    moco_v2_augment(_batch(), 24, generator=_gen(0))
    assert torch.equal(torch.rand(3), expected)


def test_empty_batch_gives_empty_views():
    empty = {"id": np.zeros(0, np.int64), "label": np.zeros(0, np.int32), "image": np.zeros((0, 40, 40, 3), np.uint8)}
    assert supervised_augment(empty, 24)["image"].shape == (0, 24, 24, 3)
    assert moco_v2_augment(empty, 24)["k"].shape == (0, 24, 24, 3)


def test_finetune_augment_is_the_supervised_recipe():
    assert finetune_augment is supervised_augment


def test_separable_blur_matches_torchvision_gaussian_blur():
    img = torch.rand(3, 32, 32, generator=_gen(0))
    torch.testing.assert_close(_GaussianBlur(7, (1.3, 1.3))(img), TF.gaussian_blur(img, [7, 7], [1.3, 1.3]))


def test_shift_blur_reaches_its_largest_sigma_at_small_sizes():
    """The shift recipe's blur spreads an impulse by the sigma drawn, also at 32 px (10% of the side,
    3 taps, would cap it at ~0.8 px); at 224 px it keeps SimCLR's 10% kernel."""
    from dp4tl_ray.data.transforms import SHIFT_BLUR_SIGMA, shift_blur_kernel

    sigma = SHIFT_BLUR_SIGMA[1]
    for size in (16, 32, 64):
        impulse = torch.zeros(1, size, size)
        impulse[0, size // 2, size // 2] = 1
        out = _GaussianBlur(shift_blur_kernel(size), (sigma, sigma))(impulse)[0]
        offsets = torch.arange(size, dtype=torch.float32) - size // 2
        spread = float((out.sum(0) * offsets**2).sum().sqrt())  # std of the response along x
        assert abs(spread - sigma) < 0.1, (size, spread)
    assert shift_blur_kernel(224) == 23 and shift_blur_kernel(4) == 7


def test_augment_batch_with_a_generator_is_the_seeded_recipe():
    """A benchmark's in-process loop passes a seeded generator: augment_batch then draws exactly what the
    recipe's own function draws with it, and the same seed gives the same batch."""
    from dp4tl_ray.data.transforms import shift_augment

    kwargs = {"mode": "supervised", "size": 24, "scale": (0.35, 1.0), "recipe": "shift"}
    first = augment_batch(_batch(), **kwargs, generator=_gen(3))["image"]
    assert np.array_equal(first, augment_batch(_batch(), **kwargs, generator=_gen(3))["image"])
    assert np.array_equal(first, shift_augment(_batch(), 24, scale=(0.35, 1.0), generator=_gen(3))["image"])
    standard = augment_batch(_batch(), **{**kwargs, "recipe": "standard"}, generator=_gen(3))["image"]
    assert np.array_equal(standard, supervised_augment(_batch(), 24, scale=(0.35, 1.0), generator=_gen(3))["image"])


def test_augment_batch_gives_each_mode_its_recipe():
    moco = augment_batch(_batch(), mode="moco_v2", size=24, scale=(0.5, 1.0))
    assert set(moco) == {"id", "label", "q", "k"} and moco["q"].shape == (6, 24, 24, 3)
    for mode in ("supervised", "adversarial"):
        out = augment_batch(_batch(), mode=mode, size=20, scale=(0.5, 1.0))
        assert set(out) == {"id", "label", "image"} and out["image"].shape == (6, 20, 20, 3)


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _banded(h: int, w: int, band: int) -> np.ndarray:
    """Green, with a red band on the left edge and a blue one on the right: far from any centre crop."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = 255
    img[:, :band] = (255, 0, 0)
    img[:, w - band:] = (0, 0, 255)
    return img


def _has_colour(images: np.ndarray, channel: int) -> np.ndarray:
    """Per image: whether some pixel is (nearly) pure ``channel`` (0 red, 2 blue)."""
    others = [c for c in range(3) if c != channel]
    pure = (images[..., channel] > 200) & (images[..., others] < 60).all(-1)
    return pure.reshape(len(images), -1).any(1)


def test_training_crops_reach_pixels_outside_the_centre_crop():
    data = _png(_banded(48, 96, 16))
    whole = decode_image(data, DecodeSpec(size=24, resize=48, crop=False))  # short side 48: nothing to resize
    centre = decode_image(data, DecodeSpec(size=24, resize=48))
    assert whole.shape == (48, 96, 3) and centre.shape == (24, 24, 3)
    assert not _has_colour(centre[None], 0)[0] and not _has_colour(centre[None], 2)[0]  # the eval view: green only
    batch = lambda img: {"id": np.arange(32), "label": np.zeros(32), "image": np.repeat(img[None], 32, axis=0)}
    train = supervised_augment(batch(whole), 24, generator=_gen(0))["image"]
    assert _has_colour(train, 0).any() and _has_colour(train, 2).any()  # crops reach both edges ...
    from_centre = supervised_augment(batch(centre), 24, generator=_gen(0))["image"]
    assert not _has_colour(from_centre, 0).any() and not _has_colour(from_centre, 2).any()  # ... unlike before


def test_training_decode_keeps_each_aspect_up_to_the_cap_and_batches_mixed_shapes():
    spec = DecodeSpec(size=24, resize=40, crop=False)
    tall = decode_image(_png(_banded(80, 60, 4)), spec)
    panorama = decode_image(_png(_banded(40, 400, 4)), spec)
    assert tall.shape == (53, 40, 3)  # shorter side 40, aspect kept
    assert panorama.shape == (40, 80, 3)  # longer side capped at TRAIN_MAX_ASPECT x the shorter
    mixed = stack_images([tall, panorama])
    assert mixed.dtype == object and mixed.shape == (2,)
    assert stack_images([tall, tall]).shape == (2, 53, 40, 3)
    for out in (supervised_augment({"id": np.arange(2), "label": np.zeros(2), "image": mixed}, 24, generator=_gen(0)),
                moco_v2_augment({"id": np.arange(2), "label": np.zeros(2), "image": mixed}, 24, generator=_gen(0))):
        assert all(v.shape == (2, 24, 24, 3) and v.dtype == np.uint8 for k, v in out.items() if k in ("image", "q", "k"))


def test_importing_the_augmentations_does_not_import_torch():
    # Ray pickles augment_batch into the dataset plan by reference; the processes that only hold
    # the plan import this module to unpickle it and must not pay for torch and torchvision.
    root = str(Path(dp4tl_ray.__file__).resolve().parents[1])
    code = ("import sys, dp4tl_ray.data.transforms; "
            "sys.exit(sorted(m for m in ('torch', 'torchvision') if m in sys.modules) or None)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_shift_recipe_blurs_greys_and_tints_what_the_standard_recipe_leaves_sharp():
    """The "shift" recipe (a surrogate for shifted downstream images) keeps the crop's shape and id/label,
    and changes the pixels beyond the standard crop + flip: down-up sampling, blur, jitter, grayscale."""
    from dp4tl_ray.data.transforms import shift_augment
    from dp4tl_ray.errors import UserError
    from dp4tl_ray.train.pretrain_config import PretrainConfig

    rng = np.random.default_rng(0)
    batch = {"id": np.arange(64), "label": np.arange(64) % 3, "image": rng.integers(0, 256, (64, 40, 40, 3), np.uint8)}
    plain = supervised_augment(batch, 32, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    shifted = shift_augment(batch, 32, scale=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert shifted["image"].shape == (64, 32, 32, 3) and shifted["image"].dtype == np.uint8
    assert (shifted["id"] == batch["id"]).all() and (shifted["label"] == batch["label"]).all()
    # noise images: blur and down-up sampling remove high-frequency energy; grayscale makes channels equal
    def roughness(x):
        return np.abs(np.diff(x.astype(np.float32), axis=2)).mean(axis=(1, 2, 3))
    assert (roughness(shifted["image"]) < 0.8 * roughness(plain["image"])).mean() > 0.5
    grey = (shifted["image"][..., 0] == shifted["image"][..., 1]).all(axis=(1, 2))
    assert 0 < grey.sum() < 64
    kwargs = PretrainConfig(source="-", out="-", augment="shift").augment_kwargs()
    assert augment_batch(batch, **kwargs)["image"].shape[1:] == (224, 224, 3)
    with pytest.raises(UserError, match="augment must be one of"):
        PretrainConfig(source="-", out="-", augment="blur").validate()
