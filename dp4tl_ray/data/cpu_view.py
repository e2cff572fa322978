"""Ray Data's "no available CPUs" warning, checked against a settled resource view.

Ray Data 2.60 (``Dataset._execute``: ``materialize``, ``to_arrow_refs``) warns "The Ray cluster
currently does not have any available CPUs. The Dataset job will hang unless more CPUs are freed up"
when ``ray.available_resources()`` shows no free CPU as it starts. That view lags the cluster by tens
of milliseconds: ``materialize`` runs the dataset, then "executes" the finished blocks a second time
(no task), and on 2 CPUs the view at that second check can still count the two decode tasks that just
ended. Our stages always leave a CPU for data (Train runs and actor pools are sized so, checked up
front), so on a healthy run the warning is that lag. The filter re-reads the view for up to
:data:`SETTLE_S` when the warning fires and drops it only when a CPU is free by then: a cluster that
really has none (a CPU-less head before the autoscaler adds workers) still gets the warning.
"""

from __future__ import annotations

import logging
import time

NO_CPU_WARNING = "The Ray cluster currently does not have any available CPUs"
SETTLE_S = 1.0  # the lag measured here is 20-30 ms
RAY_DATA_LOGGER = "ray.data.dataset"  # the module logger that emits it


def cpu_frees_up(within_s: float) -> bool:
    """Whether Ray's resource view shows a free CPU within ``within_s`` seconds."""
    import ray

    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) <= 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class StaleNoCpuWarning(logging.Filter):
    """Drops Ray Data's no-CPU warning when a CPU is free within ``settle_s`` (the view was stale)."""

    def __init__(self, settle_s: float = SETTLE_S):
        super().__init__()
        self.settle_s = settle_s

    def filter(self, record: logging.LogRecord) -> bool:
        return NO_CPU_WARNING not in record.getMessage() or not cpu_frees_up(self.settle_s)


def drop_stale_no_cpu_warning() -> None:
    """Install :class:`StaleNoCpuWarning` on Ray Data's dataset logger of this process (once)."""
    logger = logging.getLogger(RAY_DATA_LOGGER)
    if not any(isinstance(f, StaleNoCpuWarning) for f in logger.filters):
        logger.addFilter(StaleNoCpuWarning())


__all__ = ["NO_CPU_WARNING", "SETTLE_S", "StaleNoCpuWarning", "cpu_frees_up", "drop_stale_no_cpu_warning"]
