"""Shared fixtures: one local Ray instance (2 CPUs) for every test that needs Ray.

`make test` runs two pytest-xdist processes, each with its own local Ray; a module runs whole in one of them."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Ray Train's controller polls its workers every 2 s by default (the project's runs set 0.25 s themselves,
# trainer.controller_poll_s): each run waits for a poll at start-up and after its last report. The suite's
# own, shorter value counts as a user's setting and is kept. Processes Ray starts inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, started once per test process."""
    import ray

    if not ray.is_initialized():
        # address="local": a fresh instance even when another Ray runs on this machine (ray.init() would join it)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest single-threaded, and the 2-core test machine is shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_dirty(tmp_path_factory):
    """A tiny generated dataset (4 domains x 3 classes x 10 images, 32 px) with planted broken files."""
    from dp4tl_ray.data.synthetic import SynthConfig, generate

    cfg = SynthConfig(
        root=str(tmp_path_factory.mktemp("synth") / "data"), num_domains=4, classes_per_domain=3,
        images_per_class=10, image_size=32, domains_per_task=2, classes_per_task_domain=2,
        train_per_class=6, test_per_class=4, seed=0, dirty=True,
    )
    return generate(cfg)


# Modules by their measured wall time, heaviest first (serial run: ~150, 135, 70, 55, 50, 45, 40, 35 s).
# `make test` hands whole modules to its two processes in collection order (--no-loadscope-reorder):
# started first, the long ones do not leave one process running alone at the end.
HEAVY_MODULES_FIRST = ("test_pretrain.py", "test_sweep.py", "test_select.py", "test_features.py", "test_scores.py",
                       "test_transfer.py", "test_extract_resume.py", "test_evaluate.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
