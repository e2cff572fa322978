"""A training worker's batches, fetched by a background thread that runs ahead across epoch ends.

Each epoch of a Ray Data shard is a new execution (executor start, first tasks, first block: a
few tenths of a second, measured). Started by the thread while the previous epoch's last batches
train and its checkpoint is written, it no longer adds to every epoch. Pure Python: no Ray here.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator


class Waits:
    """Seconds an epoch waited for batches: for its first one, and in all (diagnostics)."""

    def __init__(self) -> None:
        self.first, self.total, self.count = 0.0, 0.0, 0

    def add(self, seconds: float) -> None:
        if self.count == 0:
            self.first = seconds
        self.total += seconds
        self.count += 1


class EpochStream:
    """The batches of ``epochs``, each epoch from its own ``open_epoch(epoch)`` iterator, fetched by
    a daemon thread up to ``depth`` batches ahead of the consumer, across epoch ends. Epoch
    boundaries stay exact; an error in the thread is raised in the consumer."""

    _END = object()

    def __init__(self, open_epoch: Callable[[int], Iterator[Any]], epochs: range, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(open_epoch, epochs), name="epoch-stream", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, open_epoch: Callable[[int], Iterator[Any]], epochs: range) -> None:
        try:
            for epoch in epochs:
                for batch in open_epoch(epoch):
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, self._END)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer and raised there
            self._put((None, e))

    def batches(self, epoch: int, waits: Waits) -> Iterator[Any]:
        """Epoch ``epoch``'s batches (ask for every epoch, in order); time spent waiting goes to ``waits``."""
        while True:
            t = time.perf_counter()
            got, item = self._queue.get()
            waits.add(time.perf_counter() - t)
            if got is None:
                raise item
            if got != epoch:
                raise RuntimeError(f"epoch stream out of step: got epoch {got}, expected {epoch}")
            if item is self._END:
                return
            yield item

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; one still waiting on its source after ``timeout_s`` is left (a daemon)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.2)  # frees a pending put
            except queue.Empty:
                pass
