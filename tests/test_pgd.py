"""PGD: stays in the eps-ball and in [0, 1], raises the loss, and leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec, build_model
from dp4tl_ray.train.pgd import PGD_L2_EPS, pgd_attack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


@pytest.fixture(scope="module")
def model(data):
    """A resnet18 fitted for a few steps to the test batch, so its loss there is low and attackable."""
    x, y = data
    net = build_model(ModelSpec("resnet18", num_classes=4, small_input=True))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net


def _loss(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(x), y))


def test_linf_attack_stays_in_the_ball_and_in_the_unit_cube(model, data):
    x, y = data
    eps = 8 / 255
    x_adv = pgd_attack(model, x, y, eps=eps, steps=3, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_l2_attack_stays_in_the_ball(model, data):
    x, y = data
    eps = 0.5
    x_adv = pgd_attack(model, x, y, eps=eps, steps=3, norm="l2", generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= eps + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert PGD_L2_EPS == 3.0


@pytest.mark.parametrize("norm, eps", [("linf", 3 / 255), ("linf", 8 / 255), ("l2", 0.5)])
def test_attack_raises_the_loss(model, data, norm, eps):
    x, y = data
    x_adv = pgd_attack(model, x, y, eps=eps, steps=3, norm=norm, generator=torch.Generator().manual_seed(0))
    assert _loss(model, x_adv, y) > _loss(model, x, y) * 1.05


def test_attack_leaves_batchnorm_statistics_mode_and_grads_alone(model, data):
    x, y = data
    model.train()
    model.net.layer1.eval()  # a mixed mode must come back exactly as it was
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    pgd_attack(model, x, y)
    assert model.training and not model.net.layer1.training and model.net.layer2.training
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_attack_is_deterministic_with_a_seeded_generator(model, data):
    x, y = data
    a, b = (pgd_attack(model, x, y, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)


def test_attack_works_inside_no_grad(model, data):
    x, y = data
    with torch.no_grad():
        x_adv = pgd_attack(model, x, y, random_start=False)
    assert not torch.equal(x_adv, x)


def test_unknown_norm_is_a_clear_error(model, data):
    with pytest.raises(UserError, match="linf, l2"):
        pgd_attack(model, *data, norm="l1")
