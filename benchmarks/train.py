"""Figures P3 and P4: Ray Train pretraining throughput and the speed-up of training on keep-sets.

P3: images/s of the Ray Train supervised loop (1 worker) vs a plain PyTorch loop: same model,
    batch size, torch threads, the same augmentation function applied per batch, and a DataLoader
    with as many worker processes as Ray has CPUs left for data. When the Ray run caches the
    decoded keep-set (``cache_decoded``), the plain loop decodes once into memory too; when it
    streams, the plain loop decodes every epoch. Median over epochs 2..E; the plain loop runs
    before and after the Ray runs (the machine may be shared) and both are reported.
P4: time of the epochs themselves when pretraining on keep-sets that prune 0, 50 and 80% of the
    classes (random classes, same epochs and per-worker batch). The headline speed-up is of the
    steady epochs (median of epochs 2..E): epoch 1 also pays the one-off start of Ray Data's
    processes (their imports), reported as ``cold_start_s``; the speed-up over all epochs as
    measured is reported beside it. The fixed start-up of a Train run (``pretrain()`` called ->
    first epoch starts, decode cache excluded), the decode cache and the rest (checkpoints,
    teardown) are reported separately.
On a shared machine wall times follow the load; both figures also give a CPU-time cross-check
(``cpu_ratio``, ``cpu_speedup_*``): the training process's CPU seconds per epoch.
Prints two JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dp4tl_ray.data.decode import DecodeSpec, decode_image  # noqa: E402
from dp4tl_ray.data.imagefolder import scan_image_folder  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.data.transforms import augment_batch  # noqa: E402
from dp4tl_ray.models import ModelSpec, build_model, to_model_input  # noqa: E402
from dp4tl_ray.select.baselines import random_by_class  # noqa: E402
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta  # noqa: E402
from dp4tl_ray.train.trainer import PretrainConfig, pretrain, use_decode_cache  # noqa: E402


class _Batches(torch.utils.data.Dataset):
    """Items are whole batches (a list of ids, from a BatchSampler): decoded (or taken from memory)
    and augmented by the same UDF the Ray Data stage runs, in the DataLoader's worker processes."""

    def __init__(self, index, cfg: PretrainConfig, decoded: np.ndarray | None):
        self.index, self.cfg, self.decoded = index, cfg, decoded
        self.spec = DecodeSpec.for_size(cfg.image_size, cfg.resize_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, ids: list[int]):
        ids = np.sort(np.asarray(ids))
        if self.decoded is not None:
            images = self.decoded[ids]
        else:
            images = np.stack([decode_image((self.index.root / self.index.paths[i]).read_bytes(), self.spec) for i in ids])
        batch = {"id": ids, "label": self.index.labels[ids], "image": images}
        out = augment_batch(batch, **self.cfg.augment_kwargs())
        return torch.from_numpy(out["image"]), torch.from_numpy(out["label"].astype(np.int64))


def plain_images_per_s(index, cfg: PretrainConfig, threads: int, data_workers: int, cached: bool) -> dict:
    """The baseline loop: DataLoader workers (decode +) augment, the main process trains (on the GPU
    with ``cfg.use_gpu``: bf16 autocast and channels_last, as the Ray loop)."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model = build_model(ModelSpec(cfg.arch, len(index.classes), cfg.small_input), seed=0).train().to(device)
    if cfg.use_gpu:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    decoded = None
    if cached:
        spec = DecodeSpec.for_size(cfg.image_size, cfg.resize_size)
        decoded = np.stack([decode_image((index.root / p).read_bytes(), spec) for p in index.paths])
    cache_s = time.perf_counter() - t0
    data = _Batches(index, cfg, decoded)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), cfg.batch_size, drop_last=False)
    loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None, num_workers=data_workers,
                                         persistent_workers=True, pin_memory=cfg.use_gpu)
    rates, per_cpu_s = [], []
    for _ in range(cfg.epochs):
        t0, cpu0, n = time.perf_counter(), time.process_time(), 0
        for x, y in loader:
            x, y = to_model_input(x, device, non_blocking=True, channels_last=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.use_gpu):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        if cfg.use_gpu:
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
        per_cpu_s.append(n / (time.process_time() - cpu0))
    return {"img_s": rates, "img_per_cpu_s": per_cpu_s, "cache_s": cache_s, "load": os.getloadavg()[0]}


def keepset_for_ratio(index, ratio: float, path: Path) -> str:
    ids = random_by_class(index.labels, np.arange(len(index)), ratio, seed=0)
    meta = KeepSetMeta(method="random-class", ratio=ratio, units_kept=len(np.unique(index.labels[ids])),
                       units_total=len(index.classes), votes_per_unit=[], images_kept=len(ids), images_total=len(index),
                       surrogate="none", source_fingerprint=index.fingerprint, downstream=[], seed=0)
    KeepSet(ids, meta).write(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--images-per-class", type=int, default=60)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (both loops: bf16 autocast, channels_last)")
    args = ap.parse_args()
    if args.cpus < 2:
        ap.error("--cpus must be >= 2: one for the training worker, the rest for data")

    import ray

    work = Path(tempfile.mkdtemp(prefix="p34-"))
    synth = generate(SynthConfig(root=str(work / "data"), num_domains=max(1, args.classes // 5), classes_per_domain=5,
                                 images_per_class=args.images_per_class, image_size=args.size, tasks=0))
    index = scan_image_folder(synth.source_dir)
    threads = max(1, args.cpus - 1)
    cfg = PretrainConfig(source=str(synth.source_dir), out=str(work / "runs"), arch=args.arch, image_size=args.size,
                         resize_size=args.size, crop_scale_min=0.5, epochs=args.epochs, batch_size=args.batch_size,
                         lr=0.05, cpus_per_worker=threads, shuffle_buffer=0, use_gpu=args.gpu)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cached = use_decode_cache(cfg, len(index))
    before = plain_images_per_s(index, cfg, threads, args.cpus - threads, cached)
    runs, load = {}, {}
    for ratio in (0.0, 0.5, 0.8):
        ks = keepset_for_ratio(index, ratio, work / f"keep-{ratio}") if ratio else None
        called = time.time()
        r = pretrain(PretrainConfig(**{**cfg.__dict__, "name": f"r{ratio}", "keepset": ks}))
        runs[ratio] = (r, called, time.time())
        load[ratio] = os.getloadavg()[0]
    assert runs[0.0][0].cached == cached
    plain = [plain_images_per_s(index, cfg, threads, args.cpus - threads, cached)]  # and after the Ray runs
    ray.shutdown()
    ray_rate = statistics.median(h["images_per_s"] for h in runs[0.0][0].history[1:])
    plain_rates = [statistics.median(p["img_s"][1:]) for p in (before, *plain)]
    plain_rate = statistics.median([x for p in (before, *plain) for x in p["img_s"][1:]])
    # Load-independent cross-check: images per CPU-second of the training process (its data
    # threads included; the data workers' processes not, in either loop).
    ray_per_cpu = statistics.median(h["images"] / h["cpu_s"] for h in runs[0.0][0].history[1:])
    plain_per_cpu = statistics.median([x for p in (before, *plain) for x in p["img_per_cpu_s"][1:]])
    print(json.dumps({"figure": "P3", "ray_img_s": round(ray_rate, 1), "plain_img_s": round(plain_rate, 1),
                      "ratio": round(ray_rate / plain_rate, 3), "plain_img_s_before_after": [round(x, 1) for x in plain_rates],
                      "ray_epochs_img_s": [round(h["images_per_s"], 1) for h in runs[0.0][0].history],
                      "ray_img_per_cpu_s": round(ray_per_cpu, 1), "plain_img_per_cpu_s": round(plain_per_cpu, 1),
                      "cpu_ratio": round(ray_per_cpu / plain_per_cpu, 3),
                      "cached_decode": cached, "use_gpu": args.gpu, "arch": args.arch, "size": args.size, "threads": threads,
                      "data_workers": args.cpus - threads,
                      "load_1min": [round(before["load"], 2), round(load[0.0], 2), round(plain[0]["load"], 2)]}))
    steady = {k: statistics.median(h["epoch_s"] for h in r.history[1:]) for k, (r, _, _) in runs.items()}
    steady_cpu = {k: statistics.median(h["cpu_s"] for h in r.history[1:]) for k, (r, _, _) in runs.items()}
    epochs_s = {k: sum(h["epoch_s"] for h in r.history) for k, (r, _, _) in runs.items()}
    startup = {k: r.history[0]["started_at"] - called - r.cache_s for k, (r, called, _) in runs.items()}
    print(json.dumps({
        "figure": "P4",
        "speedup_0.5": round(steady[0.0] / steady[0.5], 2), "speedup_0.8": round(steady[0.0] / steady[0.8], 2),
        "kept_images_0.5": round(runs[0.5][0].images / len(index), 3),
        "kept_images_0.8": round(runs[0.8][0].images / len(index), 3),
        "speedup_all_epochs_0.5": round(epochs_s[0.0] / epochs_s[0.5], 2),
        "speedup_all_epochs_0.8": round(epochs_s[0.0] / epochs_s[0.8], 2),
        "cpu_speedup_0.5": round(steady_cpu[0.0] / steady_cpu[0.5], 2),
        "cpu_speedup_0.8": round(steady_cpu[0.0] / steady_cpu[0.8], 2),
        "steady_epoch_s": {str(k): round(v, 3) for k, v in steady.items()},
        "epoch_s": {str(k): [round(h["epoch_s"], 2) for h in r.history] for k, (r, _, _) in runs.items()},
        "epochs_s": {str(k): round(v, 2) for k, v in epochs_s.items()},
        "cold_start_s": {str(k): round(r.history[0]["epoch_s"] - steady[k], 2) for k, (r, _, _) in runs.items()},
        "startup_s": {str(k): round(v, 2) for k, v in startup.items()},
        "cache_s": {str(k): round(r.cache_s, 2) for k, (r, _, _) in runs.items()},
        "other_s": {str(k): round(end - called - startup[k] - r.cache_s - epochs_s[k], 2)
                    for k, (r, called, end) in runs.items()},
        "epochs": args.epochs, "load_1min": {str(k): round(v, 2) for k, v in load.items()}}))


if __name__ == "__main__":
    main()
