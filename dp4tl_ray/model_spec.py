"""What a surrogate or pretrained model is, without torch: its architecture name, head size, stem and input
normalisation. The driver of an extraction from a seeded random init, and every plan check, need no more."""

from __future__ import annotations

from dataclasses import dataclass

from dp4tl_ray.errors import UserError

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """What a checkpoint must match: architecture, head size, stem and input normalisation."""

    arch: str = "resnet18"
    num_classes: int = 1000
    small_input: bool = False  # 3x3 stride-1 stem, no max-pool: for 32-64 px images
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {self.num_classes}")
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
