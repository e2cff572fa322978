"""Figure P2: Ray-distributed k-means vs single-process faiss.Kmeans on the same features.

Both sides cluster every row (faiss' subsampling is off) with the same k, iterations, seed and
k-means++ init. Ray's wall covers actor start-up, shard loading, init, the iterations and the
written result; ``ray.init`` is not timed. faiss gets as many OpenMP threads as the actors hold
CPUs (2 actors x 1 thread vs faiss with 2 threads; ``--faiss-threads`` overrides). Prints one
JSON line per size.

    python benchmarks/kmeans.py                      # 200k x 128, k=100, 20 iterations
    python benchmarks/kmeans.py --sweep-sizes        # 20k, 50k, 200k, 500k rows
    python benchmarks/kmeans.py --store DIR          # a real FeatureStore (its cached result is redone)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray import atomic  # noqa: E402
from dp4tl_ray.features import FeatureStore, feature_table  # noqa: E402
from dp4tl_ray.kmeans import KMeansConfig, kmeans_distributed, kmeans_single  # noqa: E402

SWEEP_SIZES = (20_000, 50_000, 200_000, 500_000)


def planted_store(path: Path, n: int, d: int, k: int, files: int, seed: int) -> None:
    """A FeatureStore of ``files`` shards: L2-normalised rows around ``k`` random unit centres, ids 0..n-1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centres[truth] + rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.5 / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    topk = truth[:, None].astype(np.int32)
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        table = feature_table(rows, truth[rows], x[rows], topk[rows], np.ones((len(rows), 1), np.float32))
        pq.write_table(table, path / f"part-{f:05d}.parquet")
    atomic.write_json(path / "manifest.json", {"dim": d, "num_rows": n, "topk": 1})


def compare(store: Path, cfg: KMeansConfig, faiss_threads: int) -> dict:
    """Time both k-means on one store and return the figure's JSON record."""
    import faiss

    shutil.rmtree(store / "kmeans" / cfg.name, ignore_errors=True)
    t0 = time.perf_counter()
    ray_res = kmeans_distributed(store, cfg)
    ray_wall = time.perf_counter() - t0

    fs = FeatureStore.open(store)
    ids, _, x, _ = fs.arrays()
    faiss.omp_set_num_threads(faiss_threads)
    ref = kmeans_single(x, cfg, ids=ids)
    return {
        "figure": "P2",
        "ray_wall_s": round(ray_wall, 3),
        "faiss_wall_s": round(ref.seconds, 3),
        "ratio_wall": round(ray_wall / ref.seconds, 3),
        "objective_rel_diff": abs(ray_res.objective[-1] - ref.objective[-1]) / ref.objective[-1],
        "n": len(x), "d": x.shape[1], "k": cfg.k, "niter": cfg.niter,
        "actors": cfg.num_actors, "faiss_threads": faiss_threads, "backend": ray_res.backend,
        "ray_phase_s": json.loads((ray_res.out_dir / "kmeans.json").read_text())["phase_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--files", type=int, default=4, help="parquet shards in a generated store")
    ap.add_argument("--init-sample", type=int, default=100_000)
    ap.add_argument("--faiss-threads", type=int, help="OpenMP threads for faiss (default: one per actor)")
    ap.add_argument("--store", type=Path, help="benchmark on this FeatureStore instead of generated features")
    ap.add_argument("--sweep-sizes", action="store_true", help=f"one line per size in {SWEEP_SIZES}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    import ray

    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    cfg = KMeansConfig(k=args.k, niter=args.niter, seed=args.seed, num_actors=args.actors, init_sample=args.init_sample)
    threads = args.faiss_threads or args.actors
    try:
        if args.store:
            print(json.dumps(compare(args.store, cfg, threads)), flush=True)
            return
        for n in SWEEP_SIZES if args.sweep_sizes else (args.n,):
            with tempfile.TemporaryDirectory(prefix="kmeans-bench-") as tmp:
                planted_store(Path(tmp), n, args.d, args.k, args.files, args.seed)
                print(json.dumps(compare(Path(tmp), cfg, threads)), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
