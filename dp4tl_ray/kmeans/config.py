"""What a k-means run is asked for (``KMeansConfig``, checked at the edge) and what it gives back (``KMeansResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dp4tl_ray.errors import UserError

INITS = ("kmeans++", "random")


@dataclass
class KMeansConfig:
    """One k-means run: clusters, iterations, seed, and how many shard actors to use."""

    k: int
    niter: int = 20
    seed: int = 0
    spherical: bool = False  # unit-norm centroids (cosine k-means on L2-normalised features)
    num_actors: int = 2
    num_cpus_per_actor: float = 1
    num_gpus_per_actor: float = 0
    init: str = "kmeans++"  # "kmeans++" on init_sample rows, or "random": k seeded rows (faiss.Kmeans' own init)
    init_sample: int = 100_000  # rows used for k-means++ init
    bounds: bool = True  # CPU shards skip rows whose nearest centroid cannot have changed (same result)

    def validate(self, n_rows: int) -> None:
        """Raise UserError naming the fix for a config that cannot cluster ``n_rows`` points."""
        if self.k < 1:
            raise UserError(f"k must be >= 1, got {self.k}")
        if self.k > n_rows:
            raise UserError(f"k={self.k} exceeds the {n_rows} rows to cluster; choose k <= {n_rows}")
        if self.niter < 1:
            raise UserError(f"niter must be >= 1, got {self.niter}")
        if not 0 <= self.seed < 2**31:
            raise UserError(f"seed must be in [0, 2**31), got {self.seed}")
        if self.num_actors < 1:
            raise UserError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise UserError("num_cpus_per_actor must be > 0 and num_gpus_per_actor >= 0")
        if self.init not in INITS:
            raise UserError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "kmeans++" and self.init_sample < self.k:
            raise UserError(f"init_sample={self.init_sample} is below k={self.k}; raise init_sample to at least k")

    @property
    def name(self) -> str:
        """Directory name of this run's result under ``<store>/kmeans/``."""
        return f"k{self.k}-seed{self.seed}" + ("-spherical" if self.spherical else "") + (
            "-random" if self.init == "random" else "")

    @property
    def init_rows(self) -> int:
        """How many seeded rows the init reads: the k-means++ sample, or the k random starting points."""
        return self.init_sample if self.init == "kmeans++" else self.k


@dataclass
class KMeansResult:
    """Centroids, objective per iteration (sum of squared L2 distances), and where the result lives."""

    centroids: np.ndarray
    objective: list[float]
    backend: str
    sizes: np.ndarray
    out_dir: Path | None
    seconds: float
    phase_seconds: dict[str, float] = field(default_factory=dict)
