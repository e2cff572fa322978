"""Ray Data's no-CPU warning is dropped only when Ray's resource view was stale (a CPU frees up)."""

from __future__ import annotations

import logging

import pytest

from dp4tl_ray.data.cpu_view import NO_CPU_WARNING, StaleNoCpuWarning

pytestmark = pytest.mark.ray


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.data.dataset", logging.WARNING, __file__, 1, message, None, None)


def test_no_cpu_warning_is_dropped_when_a_cpu_is_free_and_kept_while_none_is(ray_local):
    ray = ray_local
    warning = _record(f"Warning: {NO_CPU_WARNING}. The Dataset job will hang unless more CPUs are freed up.")
    assert StaleNoCpuWarning(settle_s=5).filter(warning) is False  # idle cluster: the view catches up
    assert StaleNoCpuWarning(settle_s=0).filter(_record("another Ray Data warning")) is True

    @ray.remote(num_cpus=ray.cluster_resources()["CPU"])
    class HoldsEveryCpu:
        def ready(self) -> bool:
            return True

    holder = HoldsEveryCpu.remote()
    try:
        ray.get(holder.ready.remote())
        assert StaleNoCpuWarning(settle_s=0.2).filter(warning) is True  # really no CPU: the user is told
    finally:
        ray.kill(holder)
    assert StaleNoCpuWarning(settle_s=5).filter(warning) is False
