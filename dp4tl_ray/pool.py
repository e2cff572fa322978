"""Sizing of model actor pools for Ray Data inference (feature extraction, per-sample scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InferencePool:
    """One actor per GPU when the cluster has GPUs; else by default one single-threaded actor per CPU.

    CPU actors together reserve ``CPUs - 1``, so a CPU always stays schedulable for the tasks that
    feed them (decode tasks, or for a pool that decodes its own inputs, the tasks that read shards or
    drop rows by id): a pool holding every CPU stalls the stream. Those tasks take a small part of a
    CPU next to the model (decoding about a tenth at 64 or 224 px), so the actors run a thread per
    core and share that core with them: on 2 CPUs a pool of one one-thread actor left half the
    machine idle, and one actor with two threads (intra-op) scales worse than two actors and
    collapses when the machine is oversubscribed."""

    size: int
    threads: int  # torch threads per actor (CPU actors)
    gpus: int
    cpus_per_actor: float = 0.0  # CPU reservation per actor (CPU actors)
    decodes: bool = False  # the actors decode their inputs themselves

    @classmethod
    def plan(cls, num_actors: int | None = None, max_inputs: int | None = None, decodes: bool = False,
             gpu_decodes: bool = False) -> InferencePool:
        """The pool for this cluster; by default no larger than ``max_inputs`` (batches to process),
        as an actor that gets no batch only costs its start-up. ``decodes``: a CPU pool's actors decode
        their own inputs; ``gpu_decodes``: a GPU pool's do (with a decoder that runs on the GPU; else CPU
        tasks decode for it, so the GPU does not wait on a CPU decode)."""
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        if not num_actors and max_inputs:
            num_actors = min(gpus or cpus, max_inputs)
        if gpus:
            return cls(num_actors or gpus, 1, gpus, decodes=gpu_decodes)
        return cpu_pool(cpus, num_actors, decodes)

    def map_batches_kwargs(self) -> dict[str, Any]:
        """``compute``, ``num_gpus`` and ``num_cpus`` for ``Dataset.map_batches`` of the model class."""
        import ray.data

        return {"compute": ray.data.ActorPoolStrategy(size=self.size), "num_gpus": 1 if self.gpus else 0,
                "num_cpus": 0 if self.gpus else self.cpus_per_actor}


def cpu_pool(cpus: int, num_actors: int | None = None, decodes: bool = False) -> InferencePool:
    """CPU actors for ``cpus`` CPUs: ``num_actors`` (default ``cpus``) sharing ``cpus - 1`` of reservation
    (rounded down to Ray's 1e-4 resource grain) and the cores as threads (at least one each): ``cpus - 1``
    of them beside CPU decode tasks, all of them when the actors decode their own inputs."""
    size = num_actors or cpus
    share = math.floor((cpus - 1) / size * 1e4) / 1e4
    return InferencePool(size, max(1, (cpus if decodes else cpus - 1) // size), 0, share, decodes)
