"""Projected gradient descent (Madry et al. 2018) in pixel space, for adversarial pretraining.

Defaults follow robust-transfer practice (Salman et al. 2020, MadryLab ``robustness``): a few
steps of size 2*eps/steps from a random start, projecting onto the eps-ball and into [0, 1] after
every step. L-inf eps is 3/255; for L2 the common ImageNet radius is 3.0 (:data:`PGD_L2_EPS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dp4tl_ray.errors import UserError
from dp4tl_ray.models import unwrap_ddp

PGD_LINF_EPS = 3 / 255
PGD_L2_EPS = 3.0
PGD_STEPS = 3
NORMS = ("linf", "l2")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The point of the eps-ball around ``x`` (then of [0, 1]) nearest to ``x_adv``."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform in the L-inf cube, or uniform on the L2 sphere of radius ``eps``."""
    if norm == "linf":
        noise = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    else:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = noise * (eps / _per_sample_norm(noise))
    return _project(x + noise, x, eps, norm)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = PGD_LINF_EPS, steps: int = PGD_STEPS,
               step_size: float | None = None, norm: str = "linf", random_start: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] within ``eps`` of ``x`` (in ``norm``) that raise ``model``'s cross-entropy on ``y``.

    The model is attacked in eval mode (BatchNorm statistics untouched) and every module's mode is
    restored afterwards; only the input gets gradients. ``step_size`` defaults to ``2 * eps / steps``;
    a ``generator`` for the random start must live on ``x``'s device.
    """
    if norm not in NORMS:
        raise UserError(f"PGD norm must be one of {', '.join(NORMS)}, got {norm!r}")
    model = unwrap_ddp(model)  # the attack needs no buffer broadcast or gradient sync
    step_size = 2 * eps / steps if step_size is None else step_size
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        x = x.detach()
        x_adv = _random_start(x, eps, norm, generator) if random_start else x.clone()
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
                direction = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad)
                x_adv = _project(x_adv.detach() + step_size * direction, x, eps, norm)
    finally:
        for m, training in modes:
            m.training = training
    return x_adv.detach()


__all__ = ["NORMS", "PGD_L2_EPS", "PGD_LINF_EPS", "PGD_STEPS", "pgd_attack"]
