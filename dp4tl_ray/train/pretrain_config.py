"""The settings of one pretraining run: what the driver validates and every worker receives.

Its own module (below both the driver, :mod:`~dp4tl_ray.train.trainer`, and the worker loop,
:mod:`~dp4tl_ray.train.loops`) so that each can import it without importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from dp4tl_ray.data.transforms import RECIPES
from dp4tl_ray.errors import UserError

# The MoCo v2 defaults of facebookresearch/moco ``main_moco.py`` (--moco-dim, --moco-k, --moco-m, --moco-t):
# the one place they are written (dp4tl_ray.train.moco uses them; this module stays torch-free).
MOCO_DIM = 128  # output feature dimension
MOCO_K = 65536  # queue size (number of negative keys)
MOCO_M = 0.999  # key-encoder momentum
MOCO_T = 0.2  # softmax temperature (MoCo v2; v1 used 0.07)

MODES = ("supervised", "moco_v2", "adversarial")
# Pretraining modes that learn no classifier: their checkpoints hold a backbone (and a projection
# head), so they give features but no class predictions.
SELF_SUPERVISED_MODES = ("moco_v2",)


@dataclass
class PretrainConfig:
    """One pretraining run. Defaults are the usual ImageNet recipe; presets scale them down."""

    source: str  # the source images: folder tree or parquet shards
    out: str  # Ray Train storage path (local dir, NFS, or s3://); checkpoints go under out/name
    name: str = "pretrain"  # stable run name: the same out + name resumes
    mode: str = "supervised"  # supervised | moco_v2 | adversarial
    keepset: str | None = None  # KeepSet directory; None = the whole source (dense)
    class_index: str | None = None
    arch: str = "resnet50"
    small_input: bool = False
    image_size: int = 224
    resize_size: int | None = None  # shorter side after decode (image kept whole for the random crop); default image_size * 8/7
    crop_scale_min: float = 0.08  # RandomResizedCrop lower scale (MoCo v2 uses 0.2)
    # supervised/adversarial augmentation: "standard" (crop + flip) or "shift" (then down-up sampling, blur,
    # colour jitter, grayscale: a surrogate for shifted downstream images, see README "When the downstream
    # images are shifted"); MoCo v2 keeps its own
    augment: str = "standard"
    epochs: int = 90
    batch_size: int = 256  # per worker
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_workers: int = 1  # 0 = Ray Train's local mode: the loop runs in this process (debugging, quick tests)
    use_gpu: bool = False
    cpus_per_worker: float = 1  # fractions allowed (e.g. 0.5 to fit 2 workers + data on 2 CPUs)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always checkpoints)
    keep_checkpoints: int = 2
    max_failures: int = 1
    shuffle_buffer: int = 2048  # rows in each worker's local shuffle buffer (0 = off)
    prefetch_batches: int = 2  # batches each worker's data thread runs ahead, across epoch ends
    rows_per_block: int = 256
    # Decode the kept images once and keep them (resized uint8, before augmentation) in the object
    # store for every epoch: "auto" = when they fit CACHE_STORE_FRACTION of it, "true", "false".
    cache_decoded: str = "auto"
    seed: int = 0
    # MoCo v2 (He et al. 2020 / Chen et al. 2020): feature dim, queue size, key momentum, temperature
    moco_dim: int = MOCO_DIM
    moco_k: int = MOCO_K
    moco_m: float = MOCO_M
    moco_t: float = MOCO_T
    # PGD adversarial training (Madry et al.; the paper's robust pretraining): L-inf eps 3/255, 3 steps
    adv_eps: float = 3 / 255
    adv_steps: int = 3
    adv_norm: str = "linf"

    def augment_kwargs(self) -> dict:
        """The keyword arguments of ``data.transforms.augment_batch`` for this run (streamed and cached paths alike)."""
        return {"mode": self.mode, "size": self.image_size, "scale": (self.crop_scale_min, 1.0), "recipe": self.augment}

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.cpus_per_worker <= 0:
            raise UserError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0 = local mode), got {self.num_workers}")
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "prefetch_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise UserError(f"max_failures must be >= -1 (-1 = retry forever), got {self.max_failures}")
        if not 0 < self.crop_scale_min <= 1:
            raise UserError(f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.augment not in RECIPES:
            raise UserError(f"augment must be one of {', '.join(RECIPES)}, got {self.augment!r}")
        if self.lr <= 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.cache_decoded not in ("auto", "true", "false"):
            raise UserError(f"cache_decoded must be auto, true or false, got {self.cache_decoded!r}")
        if self.adv_norm not in ("linf", "l2"):
            raise UserError(f"adv_norm must be linf or l2, got {self.adv_norm!r}")
        global_batch = self.batch_size * max(1, self.num_workers)
        if self.mode == "moco_v2" and self.moco_k % global_batch:
            raise UserError(f"moco_k={self.moco_k} must be a multiple of batch_size x num_workers = {global_batch}")
        if "/" in self.name or not self.name:
            raise UserError(f"name must be a plain directory name, got {self.name!r}")


__all__ = ["MODES", "PretrainConfig"]
