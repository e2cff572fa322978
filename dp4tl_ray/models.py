"""torchvision backbones by name, and safe loading of local checkpoints (never downloads).

A :class:`Surrogate` wraps a torchvision ResNet-family net, takes float images in [0, 1] and
normalises inside the model (so attacks and augmentations work in pixel space). Its inner
``net`` keeps torchvision's state-dict keys, so a local torchvision weights file loads as is.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dp4tl_ray.artifact_io import reading
from dp4tl_ray.errors import UserError
from dp4tl_ray.global_rng import seeded
from dp4tl_ray.model_spec import ARCHS, IMAGENET_MEAN, IMAGENET_STD, ModelSpec  # noqa: F401 - the spec lives torch-free
from dp4tl_ray.torchvision_import import import_torchvision

torchvision = import_torchvision()  # without torch._dynamo: ~1 CPU-s less per process (see the module)

class Surrogate(nn.Module):
    """A torchvision ResNet with in-model normalisation and access to its penultimate features."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        net = getattr(torchvision.models, spec.arch)(weights=None, num_classes=spec.num_classes)
        if spec.small_input:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.net = net
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.net.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features of images ``x`` in [0, 1], shape ``[N, feature_dim]``."""
        n = self.net
        x = (x - self.mean) / self.std
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.features(x))


def to_model_input(images: torch.Tensor, device: torch.device | str | None = None, *, non_blocking: bool = False,
                   channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC images -> float NCHW in [0, 1], what every model here takes (it normalises inside).

    ``device``: moved there first (uint8 is a quarter of float's bytes). ``channels_last`` keeps the
    NHWC memory layout: no transposing copy, and faster convolutions on GPU (and on CPU: ~10% a
    training step for ResNet-18 at 32 px, measured)."""
    if device is not None:
        images = images.to(device, non_blocking=non_blocking)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (Ray Train's ``prepare_model`` wraps
    only when there are several workers), else ``model`` itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def build_model(spec: ModelSpec, seed: int | None = 0) -> Surrogate:
    """A freshly initialised model; ``seed`` makes the initial weights reproducible."""
    if seed is not None:
        with seeded(seed):
            return Surrogate(spec)
    return Surrogate(spec)


def save_checkpoint(model: Surrogate, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``{"model": net state dict, "spec": ..., **extra}`` atomically."""
    from dp4tl_ray import atomic

    payload = {"model": model.net.state_dict(), "spec": asdict(model.spec), **(extra or {})}
    with atomic.file_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a local checkpoint safely (``weights_only=True``); plain state dicts are wrapped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a local .pt file (nothing is downloaded)")
    fix = "it cannot be read safely as a checkpoint; pass an intact state-dict .pt file"
    with reading(path, fix):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if "model" not in obj and "state_dict" not in obj:
        obj = {"model": obj}
    state = obj.get("model", obj.get("state_dict"))
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} holds a {type(state).__name__} as its model, not a state dict")
    obj["model"] = {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}
    return obj


def load_model(spec: ModelSpec, checkpoint: str | Path | None, seed: int = 0) -> Surrogate:
    """Build ``spec`` and load ``checkpoint`` into it; a checkpoint of another model is a one-line error."""
    model = build_model(spec, seed)
    if checkpoint is None:
        return model
    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("spec")
    if isinstance(saved, dict):
        for key in ("arch", "num_classes", "small_input"):
            if key in saved and saved[key] != getattr(spec, key):
                raise UserError(
                    f"checkpoint {checkpoint} is {key}={saved[key]!r} but {key}={getattr(spec, key)!r} was asked; "
                    f"pass --{key.replace('_', '-')} {saved[key]} or the right checkpoint"
                )
    own = model.net.state_dict()
    state = ckpt["model"]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {keys[:3]}" for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys
        )
        raise UserError(f"checkpoint {checkpoint} does not fit {spec.arch} with {spec.num_classes} classes ({detail}); pass the matching --arch/--num-classes")
    model.net.load_state_dict(state)
    return model


def load_backbone(checkpoint: str | Path, arch: str, small_input: bool, num_classes: int = 1) -> Surrogate:
    """The backbone of any pretrained checkpoint (supervised, MoCo, adversarial) under a new
    ``num_classes`` head: every non-``fc`` weight must be there and fit; the old head is dropped."""
    ckpt = load_checkpoint(checkpoint)
    saved = ckpt.get("spec") if isinstance(ckpt.get("spec"), dict) else {}
    spec = ModelSpec(arch, num_classes, small_input, saved.get("mean", IMAGENET_MEAN), saved.get("std", IMAGENET_STD))
    for key in ("arch", "small_input"):
        if key in saved and saved[key] != getattr(spec, key):
            raise UserError(f"checkpoint {checkpoint} is {key}={saved[key]!r} but {key}={getattr(spec, key)!r} was asked; "
                            f"pass --{key.replace('_', '-')} {saved[key]} or the right checkpoint")
    model = build_model(spec)
    own = {k: v for k, v in model.net.state_dict().items() if not k.startswith("fc.")}
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise UserError(f"checkpoint {checkpoint} is not a {arch} backbone (missing {missing[:3]}, shape mismatch {wrong[:3]}); "
                        "pass the matching --arch/--small-input")
    model.net.load_state_dict({**model.net.state_dict(), **{k: state[k] for k in own}})
    return model


def spec_from_checkpoint(path: str | Path, default: ModelSpec) -> ModelSpec:
    """The spec a checkpoint was saved with (our own checkpoints), else ``default``."""
    saved = load_checkpoint(path).get("spec")
    if not isinstance(saved, dict):
        return default
    fields = {k: saved[k] for k in asdict(default) if k in saved}
    return ModelSpec(**{**asdict(default), **fields})


__all__ = ["ARCHS", "ModelSpec", "Surrogate", "build_model", "load_backbone", "load_model", "load_checkpoint", "save_checkpoint", "spec_from_checkpoint",
           "to_model_input", "unwrap_ddp"]
