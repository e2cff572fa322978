"""Ray Train pretraining on keep-sets: DDP, every mode, resume, recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dp4tl_ray.data.imagefolder import scan_image_folder
from dp4tl_ray.errors import UserError
from dp4tl_ray.models import load_backbone
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta, keep_ids_for_units
from dp4tl_ray.train.checkpoints import STATE_FILE
from dp4tl_ray.train.trainer import PretrainConfig, pretrain

pytestmark = pytest.mark.ray


def _cfg(source, out, **kw) -> PretrainConfig:
    base = dict(arch="resnet18", image_size=32, resize_size=32, crop_scale_min=0.6, epochs=3, batch_size=16,
                lr=0.05, weight_decay=5e-4, num_workers=1, cpus_per_worker=1, shuffle_buffer=64, rows_per_block=64,
                moco_k=64, moco_m=0.99)
    return PretrainConfig(source=str(source), out=str(out), **{**base, **kw})


@pytest.fixture(scope="module")
def keepset_6(synth_dirty, tmp_path_factory):
    """A keep-set of the source's first 6 classes (written with the real KeepSet artifact)."""
    index = scan_image_folder(synth_dirty.source_dir)
    kept = np.arange(6)
    ids = keep_ids_for_units(index.labels, np.arange(len(index)), kept)
    meta = KeepSetMeta(method="manual", ratio=0.5, units_kept=6, units_total=12, votes_per_unit=[1.0] * 12,
                       images_kept=len(ids), images_total=len(index), surrogate="none",
                       source_fingerprint=index.fingerprint, downstream=["test"], seed=0)
    path = tmp_path_factory.mktemp("ks") / "keep6"
    KeepSet(ids, meta).write(path)
    return path, ids


@pytest.fixture(scope="module")
def ddp_run(ray_local, synth_dirty, keepset_6, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    # lr 0.01: at 0.05 the 2-rank run (batch 16 per rank, unseeded augmentation) sometimes overshoots
    # in epoch 2 and its loss is above epoch 1's after 3 epochs.
    cfg = _cfg(synth_dirty.source_dir, out, name="ddp", keepset=str(keepset_6[0]), num_workers=2, cpus_per_worker=0.5,
               lr=0.01)
    return cfg, pretrain(cfg)


def test_ddp_supervised_trains_on_the_kept_classes_only(ddp_run, keepset_6, synth_dirty):
    cfg, r = ddp_run
    assert r.metrics["world_size"] == 2 and r.metrics["epoch"] == 3 and len(r.history) == 3
    assert r.history[-1]["loss"] < r.history[0]["loss"]
    assert r.kept_classes == list(range(6))
    broken = {str((synth_dirty.root / b).relative_to(synth_dirty.source_dir)) for b in synth_dirty.broken_files}
    assert r.images == len(keepset_6[1])
    index = scan_image_folder(synth_dirty.source_dir)
    readable_kept = sum(1 for i in keepset_6[1] if index.paths[i] not in broken)
    # 2 ranks in lock-step drop at most one short batch each per epoch
    assert readable_kept - 2 * cfg.batch_size < r.history[-1]["images"] <= readable_kept
    ckpt = torch.load(r.model_path, weights_only=True)
    assert ckpt["kept_classes"] == list(range(6)) and ckpt["spec"]["num_classes"] == 6 and ckpt["epoch"] == 3
    load_backbone(r.model_path, "resnet18", False, num_classes=4)  # evaluation can load it


def test_restarted_run_resumes_from_its_last_checkpoint(ddp_run):
    cfg, first = ddp_run
    again = pretrain(replace(cfg, epochs=5))
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4, 5]
    assert again.history[:3] == first.history  # the first three epochs are not re-run
    assert again.metrics["start_epoch"] == 3 and again.metrics["epoch"] == 5


def test_resuming_under_other_settings_is_refused(ddp_run):
    cfg, _ = ddp_run
    with pytest.raises(UserError, match="mode differ"):
        pretrain(replace(cfg, mode="adversarial"))


def _kill_first_train_worker_after_checkpoint(run_dir: Path, killed: list[int]) -> None:
    import psutil

    # Kill as soon as the controller has *registered* a checkpoint (Ray Train's snapshot file lists
    # it): a checkpoint directory alone may still be mid-report, and waiting longer risks the kill
    # landing after the last epoch, when there is nothing left to recover.
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    while time.time() < deadline:
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                os.kill(p.info["pid"], signal.SIGKILL)
                killed.append(p.info["pid"])
                return
        time.sleep(0.05)


def test_killed_worker_is_recovered_and_the_run_finishes(ray_local, synth_dirty, tmp_path):
    cfg = _cfg(synth_dirty.source_dir, tmp_path, name="crash", epochs=5, max_failures=2)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_first_train_worker_after_checkpoint, args=(tmp_path / "crash", killed))
    killer.start()
    r = pretrain(cfg)
    killer.join()
    assert killed, "the test never found a train worker to kill"
    assert r.metrics["epoch"] == 5 and [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5]
    assert r.metrics["start_epoch"] >= 1  # the last attempt started from a checkpoint, not from scratch


# MoCo's first epoch is measured against a queue of random keys (easy negatives), so its loss is
# compared from epoch 2 on, once the queue holds real keys; MoCo also needs the small learning
# rate of its recipe (0.03 per 256 images), or its MLP head collapses to a constant on tiny data.
# Both run in Ray Train's local mode (num_workers=0): the multi-worker machinery is tested above.
# MoCo: shuffle-BN closes the batch-statistics shortcut, so 56 steps at the linearly scaled recipe lr
# (0.03 x 16/256) barely move the loss; at 0.03, with the small-input stem (32 px images keep a 4x4
# map in layer4, not 1x1, for the 8-image BN groups), it falls from the second epoch on.
MODE_SETTINGS = {"adversarial": ({"epochs": 4, "lr": 0.01, "num_workers": 0}, 0),
                 "moco_v2": ({"epochs": 8, "lr": 0.03, "moco_m": 0.99, "weight_decay": 1e-4, "num_workers": 0,
                              "small_input": True}, 1)}


@pytest.mark.parametrize("mode", ["moco_v2", "adversarial"])
def test_each_mode_trains_and_its_loss_falls(ray_local, synth_dirty, tmp_path, mode):
    settings, first = MODE_SETTINGS[mode]
    r = pretrain(_cfg(synth_dirty.source_dir, tmp_path, name=mode, mode=mode, **settings))
    losses = [h["loss"] for h in r.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[first], losses
    state = torch.load(Path(r.checkpoint) / STATE_FILE, weights_only=True)
    if mode == "moco_v2":
        assert int(state["model"]["queue_ptr"]) % 16 == 0
        load_backbone(r.model_path, "resnet18", True, num_classes=3)


def test_bad_pretrain_configs_are_one_line_errors(ray_local, synth_dirty, tmp_path):
    with pytest.raises(UserError, match="unknown mode"):
        pretrain(_cfg(synth_dirty.source_dir, tmp_path, mode="simclr"))
    with pytest.raises(UserError, match="leave at least 1"):
        pretrain(_cfg(synth_dirty.source_dir, tmp_path, num_workers=2, cpus_per_worker=1))
    with pytest.raises(UserError, match="multiple of"):
        pretrain(_cfg(synth_dirty.source_dir, tmp_path, mode="moco_v2", moco_k=100))


def test_a_keepset_smaller_than_one_batch_per_worker_is_refused_before_training(ray_local, synth_dirty, keepset_6,
                                                                                 tmp_path):
    path, ids = keepset_6  # every step takes a full batch: such a run would train nothing
    with pytest.raises(UserError, match=f"keeps {len(ids)} images, fewer than one batch per worker"):
        pretrain(_cfg(synth_dirty.source_dir, tmp_path, keepset=str(path), batch_size=len(ids) + 1))
    assert not (tmp_path / "run").exists() and not list(tmp_path.iterdir())


def test_a_cluster_shortfall_is_refused_locally_but_awaited_on_an_attached_cluster(ray_local, monkeypatch, caplog):
    from dp4tl_ray.train.pretrain_config import PretrainConfig
    from dp4tl_ray.train.trainer import _check_cluster_fits

    gpu_run = PretrainConfig(source="-", out="-", num_workers=8, use_gpu=True)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="8 GPU workers asked"):
        _check_cluster_fits(gpu_run)
    # Attached to a cluster (KubeRay, the launcher): GPU workers may scale from zero, so it waits instead.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with caplog.at_level("WARNING"):
        _check_cluster_fits(gpu_run)
    assert "waiting for the autoscaler" in caplog.text


def test_the_decode_cache_prints_no_cpu_warning_on_a_healthy_cluster(ray_local, synth_dirty, tmp_path):
    """Ray Data warned "The Ray cluster currently does not have any available CPUs. The Dataset job will
    hang ..." as `make demo` cached the surrogate's images: its resource view still counted finished tasks
    (``from_arrow``'s metadata tasks, materialize's own decode tasks) on an idle 2-CPU cluster."""
    import logging

    from ray.util.debug import reset_log_once

    from dp4tl_ray.data.cpu_view import NO_CPU_WARNING, RAY_DATA_LOGGER
    from dp4tl_ray.train.trainer import decode_once, training_dataset

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(RAY_DATA_LOGGER)
    logger.addHandler(handler)
    reset_log_once("cpu_warning")  # Ray Data says it once per process
    try:
        decoded, _, _, images = training_dataset(_cfg(synth_dirty.source_dir, tmp_path, rows_per_block=16))
        broken = sum(f.startswith("source/") for f in synth_dirty.broken_files)
        assert decode_once(decoded).count() == images - broken
    finally:
        logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if NO_CPU_WARNING in r.getMessage()]


def test_the_train_controller_polls_small_runs_often_and_leaves_a_users_setting(monkeypatch):
    from dp4tl_ray.train import trainer

    assert trainer.controller_poll_s(1) == 0.25  # each start-up step and the run's end wait for a poll
    assert 0.25 < trainer.controller_poll_s(16) < 2.0  # one call per worker: slower with more workers
    assert trainer.controller_poll_s(256) == 2.0  # Ray's own default
    monkeypatch.delenv(trainer.POLL_ENV, raising=False)
    monkeypatch.setattr(trainer, "_poll_we_set", None)
    trainer._set_controller_poll(1)
    assert os.environ[trainer.POLL_ENV] == "0.25"
    trainer._set_controller_poll(16)  # our own value follows the run's size
    assert os.environ[trainer.POLL_ENV] == str(trainer.controller_poll_s(16))
    monkeypatch.setenv(trainer.POLL_ENV, "3")  # a user's value is kept
    trainer._set_controller_poll(1)
    assert os.environ[trainer.POLL_ENV] == "3"
