"""A Ray Train run's epochs as progress lines on the driver.

Train reports each epoch to its controller (an actor), whose output reaches the driver only when
worker logs do (a sweep keeps them off). So a Train callback forwards rank 0's metrics through a
Ray queue, and a thread on the driver prints one line per epoch as it arrives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dp4tl_ray.progress import Progress


def epoch_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    """What an epoch line shows beyond the count: loss and images/s."""
    return {"loss": metrics.get("loss"), "images/s": metrics.get("images_per_s")}


def _forwarder(queue):
    from ray.train import UserCallback

    class ForwardEpochs(UserCallback):
        """Puts rank 0's metrics of every report on ``queue`` (runs in the Train controller)."""

        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            if metrics:
                queue.put(dict(metrics[0]))

    return ForwardEpochs()


@contextmanager
def epoch_lines(stage: str, epochs: int, start: int = 0) -> Iterator[Any]:
    """Yields a Train callback for the run's ``RunConfig``; while the block runs, prints
    ``[stage] epoch/epochs | ETA | loss | images/s`` on the driver for every epoch reported
    (``start``: epochs a resumed run had done before)."""
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})  # must not wait for a CPU the run's workers hold
    shown = Progress(stage, total=epochs, unit="epochs", start=start)
    stop = threading.Event()

    def show(block: bool) -> bool:
        try:
            m = queue.get(block=block, timeout=0.5 if block else None)
        except Empty:
            return False
        shown.update(int(m.get("epoch", 0)), **epoch_fields(m))
        return True

    def drain() -> None:
        while not stop.is_set():
            show(block=True)

    thread = threading.Thread(target=drain, name=f"epochs-{stage}", daemon=True)
    thread.start()
    try:
        yield _forwarder(queue)
    finally:
        stop.set()
        thread.join()
        while show(block=False):  # reports that arrived after the thread's last look
            pass
        queue.shutdown()


__all__ = ["epoch_fields", "epoch_lines"]
