"""Figure P6: every selection method at ImageNet scale through ``select_keepset``, with peak memory.

Writes a synthetic source FeatureStore in the exact store schema, shard by shard (default 1.28M rows
x 512-d, 1000 classes, top-5; ``--rows 13000000 --classes 21841`` for ImageNet-21k), ``--tasks``
downstream stores of 10k rows and an EL2N/GraNd scores file (``dp4tl_ray.data.synthetic_features``:
class clusters with noise, ids class by class as an ImageNet folder scan gives them). Then each
method runs in a fresh driver process with its own local Ray, so the driver's peak RSS (VmHWM) is
that method's alone; a thread in that driver reads VmHWM of every Ray worker process under it (the
actors) every 0.2 s, the largest is the actor peak. ``wall_s`` times ``select_keepset`` alone
(``ray.init`` and imports apart, in ``startup_s``). FM's k-means result is deleted first so it is
computed, not reused. The ratio: the largest driver peak over the size of the feature matrix that
never lands on the driver. Stores go under a temp dir removed at the end, or ``--keep DIR`` (reused).

    python benchmarks/scale.py                              # 1.28M x 512, 1000 classes
    python benchmarks/scale.py --rows 13000000 --classes 21841 --keep /data/p6-21k
    python benchmarks/scale.py --rows 100000 --classes 100 --methods lm moderate
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.featurestore import MANIFEST, FeatureStore  # noqa: E402

METHODS = ("lm", "fm", "fm-classmean", "moderate", "random-class", "random-image", "el2n", "grand")
GB = 1 << 30


def _kib(status: str, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) << 10 if m else 0


def peak_rss(pid: int | str = "self") -> int:
    """VmHWM of a process, bytes (0 once it is gone)."""
    try:
        return _kib(Path(f"/proc/{pid}/status").read_text(), "VmHWM")
    except OSError:
        return 0


def ray_workers_under(root: int) -> list[int]:
    """Pids of the Ray worker processes (titles ``ray::...``) descending from ``root``: this driver's actors."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                found.append(pid)
        except OSError:
            pass
    return found


class ActorPeak(threading.Thread):
    """Samples the largest VmHWM among this driver's Ray worker processes until stopped."""

    def __init__(self, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.every_s, self.peak, self.done = every_s, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in ray_workers_under(os.getpid()):
                self.peak = max(self.peak, peak_rss(pid))
            self.done.wait(self.every_s)

    def stop(self) -> int:
        self.done.set()
        self.join()
        for pid in ray_workers_under(os.getpid()):
            self.peak = max(self.peak, peak_rss(pid))
        return self.peak


def run_method(args: argparse.Namespace) -> dict:
    """One method in this (fresh) process: ray.init, then ``select_keepset`` timed, memory sampled."""
    t0 = time.perf_counter()
    import ray

    from dp4tl_ray.select.pipeline import SelectConfig, select_keepset

    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    root = Path(args.dir)
    source = root / "source"
    shutil.rmtree(source / "kmeans", ignore_errors=True)  # FM computes its clusters, it does not reuse them
    cfg = SelectConfig(method=args.child, ratio=args.ratio, source_features=str(source),
                       downstream_features=[str(p) for p in sorted(root.glob("task_*"))], out=str(root / f"keep-{args.child}"),
                       kmeans_niter=args.niter, kmeans_actors=args.actors,
                       scores=str(root / "scores.parquet") if args.child in ("el2n", "grand") else None)
    sampler = ActorPeak()
    sampler.start()
    start = time.perf_counter()
    ks = select_keepset(cfg)
    wall = time.perf_counter() - start
    actor = sampler.stop()
    ray.shutdown()
    return {"method": args.child, "wall_s": round(wall, 2), "startup_s": round(start - t0, 2),
            "driver_peak_rss_gb": round(peak_rss() / GB, 3), "actor_peak_rss_gb": round(actor / GB, 3),
            "images_kept": ks.meta.images_kept}


def write_world(root: Path, rows: int, classes: int, dim: int, topk: int, tasks: int, task_rows: int) -> float:
    """The source store, the task stores and the scores file (skipped where ``root`` already has them); seconds."""
    from dp4tl_ray.data.synthetic_features import ClusterSpec, write_source_store, write_task_store

    t0 = time.perf_counter()
    spec = ClusterSpec(classes, dim)
    src = root / "source"
    if not ((src / MANIFEST).is_file() and FeatureStore.open(src).manifest["store_key"] == f"source-{rows}"
            and FeatureStore.open(src).dim == dim and len(FeatureStore.open(src).manifest["classes"]) == classes):
        write_source_store(src, spec, rows, topk)
    for t in range(tasks):
        if not (root / f"task_{t}" / MANIFEST).is_file():
            write_task_store(root / f"task_{t}", spec, t, rows=task_rows, topk=topk)
    scores = root / "scores.parquet"
    if not scores.is_file() or pq.read_metadata(scores).num_rows != rows:
        rng = np.random.default_rng(0)  # a given scores file, as --scores passes one
        pq.write_table(pa.table({"id": np.arange(rows, dtype=np.int64), "el2n": rng.random(rows, dtype=np.float32),
                                 "grand": rng.random(rows, dtype=np.float32)}), scores)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_280_000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--tasks", type=int, default=3, help="downstream stores (multi-task votes)")
    p.add_argument("--task-rows", type=int, default=10_000)
    p.add_argument("--niter", type=int, default=3, help="FM's k-means iterations (k = classes)")
    p.add_argument("--actors", type=int, default=2, help="actors holding the source features")
    p.add_argument("--ratio", type=float, default=0.8, help="pruning ratio (image methods keep 1 - ratio of the images)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--keep", default=None, help="write the stores here and keep them (reused when present)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_method(args)), flush=True)
        return

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="p6-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        write_s = write_world(root, args.rows, args.classes, args.dim, args.topk, args.tasks, args.task_rows)
        store_gb = sum(f.stat().st_size for f in FeatureStore.open(root / "source").files) / GB
        results = {}
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method, "--dir", str(root), "--niter", str(args.niter),
                   "--actors", str(args.actors), "--ratio", str(args.ratio)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            results[method] = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            print(f"# {results[method]}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    features_gb = args.rows * args.dim * 4 / GB
    driver = {m: r["driver_peak_rss_gb"] for m, r in results.items()}
    print(json.dumps({
        "figure": "P6", "rows": args.rows, "classes": args.classes, "dim": args.dim, "tasks": args.tasks,
        "task_rows": args.task_rows, "kmeans_niter": args.niter, "actors": args.actors, "cpus": os.cpu_count(),
        "driver_peak_rss_gb": driver, "actor_peak_rss_gb": {m: r["actor_peak_rss_gb"] for m, r in results.items()},
        "wall_s": {m: r["wall_s"] for m, r in results.items()}, "startup_s": {m: r["startup_s"] for m, r in results.items()},
        "feature_matrix_gb": round(features_gb, 3), "store_gb": round(store_gb, 3), "write_s": round(write_s, 1),
        "driver_peak_over_features": round(max(driver.values()) / features_gb, 3),
        "load_1min": round(os.getloadavg()[0], 2),
    }), flush=True)


if __name__ == "__main__":
    main()
