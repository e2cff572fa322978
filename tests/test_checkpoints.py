"""Pretraining checkpoints without Ray: the state round-trips, the newest is found, resumes are checked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dp4tl_ray.errors import UserError
from dp4tl_ray.models import ModelSpec, build_model, load_backbone
from dp4tl_ray.train.checkpoints import (LOCAL_DIR, MODEL_FILE, TrainState, check_resume, latest_checkpoint, resume_settings,
                                         staged_checkpoint, write_checkpoint)
from dp4tl_ray.train.pretrain_config import PretrainConfig


def _checkpoint(run_dir, cfg: PretrainConfig, epoch: int, local_mode: bool):
    model = build_model(ModelSpec("resnet18", 3, small_input=True), seed=epoch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    state = TrainState(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch,
                       history=[{"epoch": e + 1, "loss": 1.0 / (e + 1)} for e in range(epoch)], resume_keys=resume_settings(cfg))
    with staged_checkpoint(str(run_dir), epoch, local_mode) as d:
        write_checkpoint(d, state, model, cfg, kept_classes=[0, 2, 5])
        return state, TrainState.read(d), load_backbone(f"{d}/{MODEL_FILE}", "resnet18", True, num_classes=3)


def test_state_round_trips_and_the_newest_local_checkpoint_is_found(tmp_path, one_torch_thread):
    cfg = PretrainConfig(source="src", out=str(tmp_path), arch="resnet18", small_input=True)
    for epoch in (10, 3):  # the newest by epoch, not the last written
        written, read, backbone = _checkpoint(tmp_path, cfg, epoch, local_mode=True)
        assert read.epoch == epoch and read.history == written.history and read.resume_keys == written.resume_keys
        assert all(torch.equal(read.model[k], v) for k, v in written.model.items())
        assert backbone.net.conv1.weight.shape[-1] == 3  # model.pt loads as a backbone
    assert latest_checkpoint(tmp_path) == tmp_path / LOCAL_DIR / "checkpoint_epoch00010"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_resume_under_other_settings_names_them(tmp_path):
    cfg = PretrainConfig(source="src", out=str(tmp_path), name="r", arch="resnet18", small_input=True)
    state = TrainState(model={}, optimizer={}, scheduler={}, epoch=1, history=[], resume_keys=resume_settings(cfg))
    check_resume(state, replace(cfg, epochs=200, lr=0.5))  # epochs may grow; lr is not a resume setting
    with pytest.raises(UserError, match=r"run r .*\(mode, seed differ\)"):
        check_resume(state, replace(cfg, mode="moco_v2", seed=1))
