"""Training augmentations as Ray Data CPU-stage UDFs over numpy batches (``image``: uint8 NHWC).

Every image draws its own random parameters. Outputs stay uint8 in [0, 255] and unnormalised:
the models normalise inside (:class:`dp4tl_ray.models.Surrogate`). ``generator=None`` draws a
fresh seed from the OS per call, so batches differ across tasks, workers and epochs (torch's
global RNG starts from the same seed in every process, so it must not be relied on); tests pass a
seeded ``torch.Generator``. Do not pass a generator through ``map_batches(fn_kwargs=...)``: it
would be pickled and replay the same stream in every task.

torch and torchvision are imported inside the functions that use them: Ray pickles
:func:`augment_batch` into the dataset plan by reference to this module, and the processes that
only hold the plan (Ray Train's dataset manager, the split coordinator) import the module to
unpickle it; they need not import torch and torchvision (several seconds each on a busy machine).
Only the tasks that augment do.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2

SUPERVISED_CROP_SCALE = (0.08, 1.0)  # torchvision / ImageNet RandomResizedCrop default

# MoCo v2 "aug+" recipe (Chen et al. 2020, facebookresearch/moco main_moco.py)
MOCO_V2_CROP_SCALE = (0.2, 1.0)
MOCO_V2_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
MOCO_V2_JITTER_P = 0.8
MOCO_V2_GRAYSCALE_P = 0.2
MOCO_V2_BLUR_SIGMA = (0.1, 2.0)
MOCO_V2_BLUR_P = 0.5
BLUR_KERNEL_FRACTION = 0.1  # kernel ~10% of the crop side, made odd (SimCLR's choice)

# The "shift" recipe (beyond the paper; benchmarks/real_shift.py): the supervised crop and flip, then
# augmentations covering resolution and contrast shift, so a surrogate still recognises low-resolution,
# blurred, grey or tinted downstream images (each p per image).
SHIFT_DOWN_UP = (2.0, 5.0)  # down-sample by a factor drawn here, then back up (bilinear)
SHIFT_DOWN_UP_P = 0.5
SHIFT_BLUR_SIGMA = (0.1, 2.0)  # pixels of the output image, whatever its size
SHIFT_BLUR_P = 0.5
SHIFT_BLUR_TRUNCATE = 3.0  # the kernel reaches this many sigmas (of the largest) each side, at any image size
RECIPES = ("standard", "shift")  # the supervised/adversarial augmentation; MoCo v2 keeps its own


class _GaussianBlur:
    """Gaussian blur of a float CHW image, sigma uniform in ``sigma`` per call. Separable, so several
    times cheaper than torchvision's 2-D kernel at 224 px; reflect padding, as torchvision."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float]):
        self.half, self.sigma = kernel_size // 2, sigma

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        sigma = float(torch.empty(1).uniform_(*self.sigma))
        taps = torch.exp(-0.5 * (torch.arange(-self.half, self.half + 1, dtype=img.dtype) / sigma) ** 2)
        taps = (taps / taps.sum()).expand(img.shape[0], 1, -1)
        x = F.pad(img[None], (self.half,) * 4, mode="reflect")
        x = F.conv2d(x, taps[:, :, None, :], groups=img.shape[0])
        return F.conv2d(x, taps[:, :, :, None], groups=img.shape[0])[0]


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    return img.mul(255).round_().byte()


@lru_cache(maxsize=None)
def _supervised_pipeline(size: int, scale: tuple[float, float]) -> v2.Compose:
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()])


class _DownUp:
    """Down-sample a float CHW image by a factor uniform in ``factors``, then back to its size."""

    def __init__(self, factors: tuple[float, float]):
        self.factors = factors

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        side = max(2, int(img.shape[-1] / float(torch.empty(1).uniform_(*self.factors))))
        small = F.interpolate(img[None], size=side, mode="bilinear", antialias=True)
        return F.interpolate(small, size=img.shape[-2:], mode="bilinear")[0]


def shift_blur_kernel(size: int) -> int:
    """The shift recipe's blur kernel (odd) at output ``size``: SimCLR's ~10% of the side, but never
    shorter than :data:`SHIFT_BLUR_TRUNCATE` of the largest sigma each side (13 taps), so the
    documented sigma range is what small images get too (10% of 32 px is 3 taps: a blur of at most
    ~0.8 px whatever sigma was drawn); at most ``2 * size - 1`` (reflect padding needs less than the side)."""
    import math

    half = max(int(BLUR_KERNEL_FRACTION * size) // 2, math.ceil(SHIFT_BLUR_TRUNCATE * SHIFT_BLUR_SIGMA[1]))
    return 2 * min(half, size - 1) + 1


@lru_cache(maxsize=None)
def _shift_pipeline(size: int, scale: tuple[float, float]) -> v2.Compose:
    import torch
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([_DownUp(SHIFT_DOWN_UP)], p=SHIFT_DOWN_UP_P),
        v2.RandomApply([_GaussianBlur(shift_blur_kernel(size), SHIFT_BLUR_SIGMA)], p=SHIFT_BLUR_P),
        v2.RandomApply([v2.ColorJitter(*MOCO_V2_JITTER)], p=MOCO_V2_JITTER_P),
        v2.RandomGrayscale(p=MOCO_V2_GRAYSCALE_P),
        v2.Lambda(_to_uint8),
    ])


@lru_cache(maxsize=None)
def _moco_v2_pipeline(size: int) -> v2.Compose:
    import torch
    from torchvision.transforms import v2

    kernel = int(BLUR_KERNEL_FRACTION * size) // 2 * 2 + 1
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=MOCO_V2_CROP_SCALE, antialias=True),
        v2.ToDtype(torch.float32, scale=True),  # colour ops convert uint8 to float anyway: do it once
        v2.RandomApply([v2.ColorJitter(*MOCO_V2_JITTER)], p=MOCO_V2_JITTER_P),
        v2.RandomGrayscale(p=MOCO_V2_GRAYSCALE_P),
        v2.RandomApply([_GaussianBlur(kernel, MOCO_V2_BLUR_SIGMA)], p=MOCO_V2_BLUR_P),
        v2.RandomHorizontalFlip(),
        v2.Lambda(_to_uint8),
    ])


def _views(images: np.ndarray, pipeline: v2.Compose, size: int, n_views: int,
           generator: torch.Generator | None) -> list[np.ndarray]:
    """``n_views`` independently augmented copies of ``images`` (uint8 NHWC), each uint8[N, size, size, 3]."""
    import torch

    from dp4tl_ray.global_rng import seeded

    if len(images) == 0:
        return [np.zeros((0, size, size, 3), np.uint8) for _ in range(n_views)]
    seed = secrets.randbits(63) if generator is None else int(torch.randint(2**63 - 1, (1,), generator=generator))
    chw = [torch.tensor(img).permute(2, 0, 1) for img in images]  # copies: Arrow-backed arrays are read-only
    # torchvision samples from torch's global RNG: seed it for this block only, and not while another
    # thread (the training worker's main thread building its model) does the same.
    with seeded(seed):
        return [torch.stack([pipeline(img) for img in chw]).permute(0, 2, 3, 1).contiguous().numpy() for _ in range(n_views)]


def supervised_augment(batch: dict[str, np.ndarray], size: int, scale: tuple[float, float] = SUPERVISED_CROP_SCALE,
                       generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """RandomResizedCrop(``size``, ``scale``) + horizontal flip; ``image`` becomes uint8[N, size, size, 3]."""
    (image,) = _views(batch["image"], _supervised_pipeline(size, tuple(scale)), size, 1, generator)
    return {**batch, "image": image}


finetune_augment = supervised_augment  # downstream full finetuning uses the same recipe


def moco_v2_augment(batch: dict[str, np.ndarray], size: int, generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """Two independent MoCo v2 views ``q`` and ``k`` (uint8[N, size, size, 3]) replace ``image``."""
    q, k = _views(batch["image"], _moco_v2_pipeline(size), size, 2, generator)
    return {**{c: v for c, v in batch.items() if c != "image"}, "q": q, "k": k}


def shift_augment(batch: dict[str, np.ndarray], size: int, scale: tuple[float, float] = SUPERVISED_CROP_SCALE,
                  generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """The supervised crop and flip, then down-up sampling, blur, colour jitter and grayscale (the "shift" recipe)."""
    (image,) = _views(batch["image"], _shift_pipeline(size, tuple(scale)), size, 1, generator)
    return {**batch, "image": image}


def augment_batch(batch: dict[str, np.ndarray], *, mode: str, size: int, scale: tuple[float, float],
                  recipe: str = "standard", generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """A pretraining mode's augmentation of a decoded batch (fresh random draws every call unless a
    seeded ``generator`` is given, as a benchmark's in-process loop does): the Ray Data stage's UDF on
    the streamed path, called by the worker itself on a cached keep-set.
    ``moco_v2``: two MoCo v2 views; the other modes: RandomResizedCrop(``size``, ``scale``) + flip,
    with ``recipe="shift"`` followed by the shift-covering augmentations."""
    if mode == "moco_v2":
        return moco_v2_augment(batch, size, generator=generator)
    if recipe == "shift":
        return shift_augment(batch, size, scale=scale, generator=generator)
    return supervised_augment(batch, size, scale=scale, generator=generator)


__all__ = [
    "BLUR_KERNEL_FRACTION", "MOCO_V2_BLUR_P", "MOCO_V2_BLUR_SIGMA", "MOCO_V2_CROP_SCALE", "MOCO_V2_GRAYSCALE_P",
    "MOCO_V2_JITTER", "MOCO_V2_JITTER_P", "RECIPES", "SHIFT_BLUR_SIGMA", "SHIFT_BLUR_TRUNCATE", "SHIFT_DOWN_UP",
    "SUPERVISED_CROP_SCALE", "augment_batch", "finetune_augment", "moco_v2_augment", "shift_augment", "shift_blur_kernel",
    "supervised_augment",
]
