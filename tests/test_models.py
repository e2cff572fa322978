"""Backbones by name and safe checkpoint loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec, build_model, load_model, save_checkpoint, spec_from_checkpoint


def test_same_seed_same_initial_weights():
    a, b = build_model(ModelSpec("resnet18", 7), seed=3), build_model(ModelSpec("resnet18", 7), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_small_input_stem_keeps_resolution_and_exposes_features():
    m = build_model(ModelSpec("resnet18", 5, small_input=True)).eval()
    x = torch.rand(2, 3, 32, 32)
    assert m.features(x).shape == (2, 512) and m(x).shape == (2, 5)
    assert m.net.conv1.stride == (1, 1)


def test_plain_torchvision_state_dict_loads(tmp_path):
    tv = torchvision.models.resnet18(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    m = load_model(ModelSpec("resnet18", 10), tmp_path / "tv.pt")
    assert torch.equal(m.net.fc.weight, tv.fc.weight)


def test_own_checkpoint_round_trip_and_spec(tmp_path):
    spec = ModelSpec("resnet18", 4, small_input=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    m = build_model(spec, seed=1)
    save_checkpoint(m, tmp_path / "c.pt", {"epoch": 3})
    assert spec_from_checkpoint(tmp_path / "c.pt", ModelSpec("resnet18", 4)) == spec
    again = load_model(spec, tmp_path / "c.pt", seed=99)
    assert torch.equal(again.net.conv1.weight, m.net.conv1.weight)


def test_checkpoint_of_another_model_is_a_one_line_error(tmp_path):
    save_checkpoint(build_model(ModelSpec("resnet34", 4)), tmp_path / "r34.pt")
    with pytest.raises(UserError, match="arch='resnet34'"):
        load_model(ModelSpec("resnet18", 4), tmp_path / "r34.pt")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv10.pt")
    with pytest.raises(UserError, match="shape mismatch") as e:
        load_model(ModelSpec("resnet18", 4), tmp_path / "tv10.pt")
    assert "\n" not in str(e.value) and "--arch" in str(e.value)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    with pytest.raises(UserError, match="missing|unexpected"):
        load_model(ModelSpec("resnet18", 1000), tmp_path / "r50.pt")


class NotATensor:
    """An arbitrary object: a weights_only load must refuse to unpickle it."""


def test_unsafe_or_missing_checkpoints_are_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(ModelSpec(), tmp_path / "nope.pt")
    torch.save({"model": {}, "payload": NotATensor()}, tmp_path / "pickle.pt")
    with pytest.raises(UserError, match="cannot be read safely"):
        load_model(ModelSpec(), tmp_path / "pickle.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(UserError, match="cannot be read safely"):
        load_model(ModelSpec(), tmp_path / "garbage.pt")


def test_unknown_arch_names_the_choices():
    with pytest.raises(UserError, match="resnet18"):
        ModelSpec("vgg11")


def test_backbone_loads_under_a_new_head_from_any_checkpoint(tmp_path):
    src = build_model(ModelSpec("resnet18", 30, small_input=True, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)), seed=5)
    src.net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))  # a MoCo head
    save_checkpoint(src, tmp_path / "moco.pt")
    from dp4tl_ray.models import load_backbone

    bb = load_backbone(tmp_path / "moco.pt", "resnet18", True, num_classes=6)
    assert bb.net.fc.out_features == 6 and bb.spec.mean == (0.4, 0.4, 0.4)
    assert torch.equal(bb.net.layer4[1].conv2.weight, src.net.layer4[1].conv2.weight)
    with pytest.raises(UserError, match="small_input"):
        load_backbone(tmp_path / "moco.pt", "resnet18", False)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pt")
    with pytest.raises(UserError, match="not a resnet18 backbone"):
        load_backbone(tmp_path / "r50.pt", "resnet18", False)
