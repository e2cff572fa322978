"""Sizing of model actor pools for Ray Data inference (feature extraction, per-sample scores)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InferencePool:
    """One actor per GPU when the cluster has GPUs; else CPU actors sharing ``CPUs - 1`` threads,
    leaving a CPU for the decode tasks that feed them (a pool holding every CPU stalls the stream)."""

    size: int
    threads: int  # torch threads per actor (CPU actors)
    gpus: int

    @classmethod
    def plan(cls, num_actors: int | None = None) -> InferencePool:
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        size = num_actors or (gpus if gpus else max(1, cpus - 1))
        return cls(size, 1 if gpus else max(1, (cpus - 1) // size), gpus)

    def map_batches_kwargs(self) -> dict[str, Any]:
        """``compute``, ``num_gpus`` and ``num_cpus`` for ``Dataset.map_batches`` of the model class."""
        import ray.data

        return {"compute": ray.data.ActorPoolStrategy(size=self.size), "num_gpus": 1 if self.gpus else 0,
                "num_cpus": 0 if self.gpus else self.threads}
