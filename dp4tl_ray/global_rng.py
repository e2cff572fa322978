"""torch's process-wide RNG, seeded for a block, safely shared between threads.

torchvision's random transforms and ``nn.init`` draw from torch's global generator, so the only way
to make them reproducible is to seed it for a block (``fork_rng`` + ``manual_seed``). That is
reproducible only while no other thread does the same at once: a training worker augments in its
data thread while its main thread builds the model, and two interleaved blocks draw from each
other's seed. Every seeded block in this package goes through :func:`seeded`, which holds one
process-wide lock for its duration.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded by ``seed``, alone among seeded blocks;
    the caller's generator state is restored afterwards."""
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = ["seeded"]
