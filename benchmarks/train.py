"""Figures P3 and P4: Ray Train pretraining throughput and the speed-up of training on keep-sets.

P3: images/s of the Ray Train supervised loop (1 worker) vs a plain PyTorch loop: same model,
    batch size, torch threads, the same augmentation function applied per batch, and a DataLoader
    with as many worker processes as Ray has CPUs left for data. When the Ray run caches the
    decoded keep-set (``cache_decoded``), the plain loop decodes once into memory too; when it
    streams, the plain loop decodes every epoch. Median over epochs 2..E; the plain loop runs
    before and after the Ray run (the machine may be shared) and both are reported.
P4: the speed-up of pretraining on a keep-set that prunes 80% of the source classes (``--p4-ratios`` adds
    others, e.g. ``0.5 0.8``), and of the whole pipeline. A keep-set is what the sweep makes: a surrogate trained on the source, the source
    and a downstream task extracted with it, LM selection (the paper's rule). As in the paper (a
    ResNet-18 surrogate prunes the source of a larger pretrained net) the surrogate is ``resnet18``
    and the pretrained net ``resnet50``; the surrogate also trains and extracts at a quarter of the
    image size (16 vs 64 px) and for one epoch (``--surrogate-size``, ``--surrogate-epochs``): a
    surrogate only has to rank source classes by downstream votes, not to be a good backbone, and its
    share of the dense cost (``surrogate_share``) is reported. Dense and pruned runs share one data path, the
    decode cache decided once from the dense size (``same_path``). Two speed-ups at 80%:
    ``speedup_0.8`` of the steady epochs (median of epochs 2..E; epoch 1 also pays the one-off start of
    Ray Data's processes, ``cold_start_s``), and ``end_to_end_speedup_0.8``: dense pretraining (the
    whole ``pretrain()`` call: Train start-up, decode cache, epochs, teardown) against surrogate
    training + both extractions + selection + pruned pretraining, each the wall time of its call.
    The source size at which these hold is in the line (``source_images``): fixed start-ups weigh
    less the larger the source, so the end-to-end figure grows with it. Each run's Train start-up
    (``pretrain()`` called -> first epoch, decode cache excluded), decode cache and the rest
    (checkpoints, teardown) are reported separately.
P3-ceiling (with ``--gpu``, or ``--only ceiling``): pretraining at 224 px (resnet50; bf16 and
    channels_last on a GPU) streamed from JPEG shards, decoded every epoch, against the same training
    step fed a synthetic batch already on the device, the compute ceiling: ``gpu_img_s`` and
    ``gpu_ceiling_img_s`` (``cpu_*`` on a CPU run), and their ``ratio``.
On a shared machine wall times follow the load; both figures also give a CPU-time cross-check
(``cpu_ratio``, ``cpu_speedup_*``): the training process's CPU seconds per epoch.
Prints a JSON line per figure.
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

from dp4tl_ray.data.decode import decode_image, stack_images  # noqa: E402
from dp4tl_ray.data.imagefolder import scan_image_folder  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.data.transforms import augment_batch  # noqa: E402
from dp4tl_ray.models import ModelSpec, build_model, to_model_input  # noqa: E402
from dp4tl_ray.train.trainer import PretrainConfig, pretrain, train_decode_spec, use_decode_cache  # noqa: E402


class _Batches(torch.utils.data.Dataset):
    """Items are whole batches (a list of ids, from a BatchSampler): decoded (or taken from memory)
    and augmented by the same UDF the Ray Data stage runs, in the DataLoader's worker processes."""

    def __init__(self, index, cfg: PretrainConfig, decoded: list[np.ndarray] | None):
        self.index, self.cfg, self.decoded = index, cfg, decoded
        self.spec = train_decode_spec(cfg)  # as the Ray loop: no centre crop before RandomResizedCrop

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, ids: list[int]):
        ids = np.sort(np.asarray(ids))
        if self.decoded is not None:
            images = stack_images([self.decoded[i] for i in ids])
        else:
            images = stack_images([decode_image((self.index.root / self.index.paths[i]).read_bytes(), self.spec) for i in ids])
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
        spec = train_decode_spec(cfg)
        decoded = [decode_image((index.root / p).read_bytes(), spec) for p in index.paths]
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


def _timed(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the wall seconds of the call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def keepsets(args, synth, work: Path, threads: int) -> tuple[dict[float, str], dict[str, float]]:
    """LM keep-sets at 50 and 80% as a sweep makes them, and the wall seconds of each stage: the
    surrogate's training, the extraction of the source and of the task, each ratio's selection."""
    from dp4tl_ray.features import ExtractConfig, extract_features
    from dp4tl_ray.select.pipeline import SelectConfig, select_keepset

    size = args.surrogate_size
    costs: dict[str, float] = {}
    surrogate_cfg = PretrainConfig(source=str(synth.source_dir), out=str(work / "runs"), name="surrogate", arch=args.surrogate_arch,
                                   image_size=size, resize_size=size, crop_scale_min=0.5, epochs=args.surrogate_epochs,
                                   batch_size=args.batch_size, lr=0.05, cpus_per_worker=threads, shuffle_buffer=0)
    surrogate, costs["surrogate_s"] = _timed(pretrain, surrogate_cfg)

    def extract(images: Path, name: str) -> str:
        cfg = ExtractConfig(source=str(images), out=str(work / "features" / name), arch=args.surrogate_arch,
                            checkpoint=surrogate.model_path, num_classes=len(surrogate.kept_classes), image_size=size,
                            resize_size=size, num_actors=1)
        store, costs[f"extract_{name}_s"] = _timed(extract_features, cfg, progress=False)
        return str(store.path)

    source, task = extract(synth.source_dir, "source"), extract(synth.task_dirs[0] / "train", "task")
    paths = {}
    for ratio in args.p4_ratios:
        cfg = SelectConfig(method="lm", ratio=ratio, source_features=source, downstream_features=[task],
                           out=str(work / f"keep-{ratio}"))
        _, costs[f"select_{ratio}_s"] = _timed(select_keepset, cfg)
        paths[ratio] = cfg.out
    return paths, costs


def p3_figure(args, work: Path, threads: int) -> dict:
    """P3: images/s of one Ray Train run (1 worker) on the dense source vs the plain loop before and after it."""
    synth = generate(SynthConfig(root=str(work / "p3"), num_domains=max(1, args.classes // 5), classes_per_domain=5,
                                 images_per_class=args.images_per_class, image_size=args.size, tasks=0))
    index = scan_image_folder(synth.source_dir)
    cfg = PretrainConfig(source=str(synth.source_dir), out=str(work / "runs"), name="p3", arch=args.p3_arch,
                         image_size=args.size, resize_size=args.size, crop_scale_min=0.5, epochs=args.epochs,
                         batch_size=args.batch_size, lr=0.05, cpus_per_worker=threads, shuffle_buffer=0, use_gpu=args.gpu)
    cached = use_decode_cache(cfg, len(index))
    before = plain_images_per_s(index, cfg, threads, args.cpus - threads, cached)
    run = pretrain(cfg)
    ray_load = os.getloadavg()[0]
    assert run.cached == cached
    plain = [plain_images_per_s(index, cfg, threads, args.cpus - threads, cached)]  # and after the Ray run
    ray_rate = statistics.median(h["images_per_s"] for h in run.history[1:])
    plain_rates = [statistics.median(p["img_s"][1:]) for p in (before, *plain)]
    plain_rate = statistics.median([x for p in (before, *plain) for x in p["img_s"][1:]])
    # Load-independent cross-check: images per CPU-second of the training process (its data
    # threads included; the data workers' processes not, in either loop).
    ray_per_cpu = statistics.median(h["images"] / h["cpu_s"] for h in run.history[1:])
    plain_per_cpu = statistics.median([x for p in (before, *plain) for x in p["img_per_cpu_s"][1:]])
    return {"figure": "P3", "ray_img_s": round(ray_rate, 1), "plain_img_s": round(plain_rate, 1),
            "ratio": round(ray_rate / plain_rate, 3), "plain_img_s_before_after": [round(x, 1) for x in plain_rates],
            "ray_epochs_img_s": [round(h["images_per_s"], 1) for h in run.history],
            "ray_img_per_cpu_s": round(ray_per_cpu, 1), "plain_img_per_cpu_s": round(plain_per_cpu, 1),
            "cpu_ratio": round(ray_per_cpu / plain_per_cpu, 3),
            "cached_decode": cached, "use_gpu": args.gpu, "arch": args.p3_arch, "size": args.size, "threads": threads,
            "data_workers": args.cpus - threads,
            "load_1min": [round(before["load"], 2), round(ray_load, 2), round(plain[0]["load"], 2)]}


def p4_figure(args, work: Path, threads: int) -> dict:
    """P4: LM keep-sets made as a sweep makes them, then dense, 50% and 80% pretraining on one data path."""
    synth = generate(SynthConfig(root=str(work / "p4"), num_domains=max(1, args.p4_classes // 5), classes_per_domain=5,
                                 images_per_class=args.p4_images_per_class, image_size=args.p4_size, tasks=1,
                                 domains_per_task=1, classes_per_task_domain=5, train_per_class=20, test_per_class=5))
    index = scan_image_folder(synth.source_dir)
    paths, stage_s = keepsets(args, synth, work, threads)
    cfg = PretrainConfig(source=str(synth.source_dir), out=str(work / "runs"), arch=args.arch, image_size=args.p4_size,
                         resize_size=args.p4_size, crop_scale_min=0.5, epochs=args.p4_epochs, batch_size=args.batch_size,
                         lr=0.05, cpus_per_worker=threads, shuffle_buffer=0, use_gpu=args.gpu)
    # One data path for the sweep's runs, decided from the dense size (as the sweep does).
    cache = "true" if use_decode_cache(cfg, len(index)) else "false"
    runs, load = {}, {}
    for ratio in (0.0, *args.p4_ratios):
        run_cfg = PretrainConfig(**{**cfg.__dict__, "name": f"r{ratio}", "keepset": paths.get(ratio), "cache_decoded": cache})
        called = time.time()
        r = pretrain(run_cfg)
        runs[ratio] = (r, called, time.time())
        load[ratio] = os.getloadavg()[0]
    steady = {k: statistics.median(h["epoch_s"] for h in r.history[1:]) for k, (r, _, _) in runs.items()}
    steady_cpu = {k: statistics.median(h["cpu_s"] for h in r.history[1:]) for k, (r, _, _) in runs.items()}
    epochs_s = {k: sum(h["epoch_s"] for h in r.history) for k, (r, _, _) in runs.items()}
    total_s = {k: end - called for k, (_, called, end) in runs.items()}
    startup = {k: r.history[0]["started_at"] - called - r.cache_s for k, (r, called, _) in runs.items()}
    pruned = args.p4_ratios
    keepset_s = {q: stage_s["surrogate_s"] + stage_s["extract_source_s"] + stage_s["extract_task_s"] + stage_s[f"select_{q}_s"]
                 for q in pruned}
    end_to_end = {q: total_s[0.0] / (keepset_s[q] + total_s[q]) for q in pruned}

    def per_ratio(key: str, value) -> dict:
        return {f"{key}_{q}": value(q) for q in pruned}

    return {
        "figure": "P4",
        **per_ratio("speedup", lambda q: round(steady[0.0] / steady[q], 2)),
        **per_ratio("end_to_end_speedup", lambda q: round(end_to_end[q], 2)),
        "same_path": len({r.cached for r, _, _ in runs.values()}) == 1, "cached_decode": runs[0.0][0].cached,
        "source_images": len(index), "source_classes": len(index.classes), "arch": args.arch, "size": args.p4_size,
        "surrogate": {"arch": args.surrogate_arch, "size": args.surrogate_size, "epochs": args.surrogate_epochs},
        "method": "lm",
        **per_ratio("kept_images", lambda q: round(runs[q][0].images / len(index), 3)),
        **per_ratio("speedup_all_epochs", lambda q: round(epochs_s[0.0] / epochs_s[q], 2)),
        **per_ratio("speedup_pretrain_total", lambda q: round(total_s[0.0] / total_s[q], 2)),
        **per_ratio("cpu_speedup", lambda q: round(steady_cpu[0.0] / steady_cpu[q], 2)),
        "stage_s": {k: round(v, 2) for k, v in stage_s.items()},
        "surrogate_share": round(stage_s["surrogate_s"] / total_s[0.0], 3),
        "keepset_s": {str(k): round(v, 2) for k, v in keepset_s.items()},
        "pretrain_total_s": {str(k): round(v, 2) for k, v in total_s.items()},
        "steady_epoch_s": {str(k): round(v, 3) for k, v in steady.items()},
        "epoch_s": {str(k): [round(h["epoch_s"], 2) for h in r.history] for k, (r, _, _) in runs.items()},
        "epochs_s": {str(k): round(v, 2) for k, v in epochs_s.items()},
        "cold_start_s": {str(k): round(r.history[0]["epoch_s"] - steady[k], 2) for k, (r, _, _) in runs.items()},
        "startup_s": {str(k): round(v, 2) for k, v in startup.items()},
        "cache_s": {str(k): round(r.cache_s, 2) for k, (r, _, _) in runs.items()},
        "other_s": {str(k): round(total_s[k] - startup[k] - r.cache_s - epochs_s[k], 2) for k, (r, _, _) in runs.items()},
        "epochs": args.p4_epochs, "load_1min": {str(k): round(v, 2) for k, v in load.items()}}


def ceiling_images_per_s(cfg: PretrainConfig, num_classes: int, steps: int) -> float:
    """The compute ceiling: the library's training step (``train_one_epoch``: same model, optimizer, bf16
    autocast and channels_last on CUDA) fed one synthetic batch already on the device, ``steps`` times."""
    from dp4tl_ray.train.loops import METHODS, train_one_epoch

    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    method = METHODS["supervised"]
    model = method.build(ModelSpec(cfg.arch, num_classes, cfg.small_input), cfg).to(device)
    if cfg.use_gpu:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8,
                                    generator=gen).to(device),
             "label": torch.randint(0, num_classes, (cfg.batch_size,), generator=gen).to(device)}
    remap = torch.arange(num_classes, device=device)
    train_one_epoch(model, method, opt, [batch] * 3, remap, cfg, device)  # warm-up (cuDNN plans)
    if cfg.use_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    seen, _ = train_one_epoch(model, method, opt, [batch] * steps, remap, cfg, device)
    if cfg.use_gpu:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - t0)


def ceiling_figure(args, work: Path, threads: int) -> dict:
    """P3-ceiling: pretraining at ``--ceiling-size`` px (resnet50 by default; on a GPU bf16 and channels_last)
    streamed from JPEG shards through Ray Train - decoded and augmented by Ray Data every epoch, no decode
    cache - against the same step fed a synthetic batch already on the device (the compute ceiling)."""
    from dp4tl_ray.data.parquet import shard_image_folder

    dev = "gpu" if args.gpu else "cpu"
    synth = generate(SynthConfig(root=str(work / "ceiling"), num_domains=max(1, args.ceiling_classes // 5),
                                 classes_per_domain=5, images_per_class=args.ceiling_images_per_class,
                                 image_size=args.ceiling_photo_size, tasks=0, seed=3))
    index = scan_image_folder(synth.source_dir)
    shards = shard_image_folder(index, work / "ceiling-shards").root
    cfg = PretrainConfig(source=str(shards), out=str(work / "runs"), name="ceiling", arch=args.arch,
                         image_size=args.ceiling_size, epochs=args.ceiling_epochs, batch_size=args.ceiling_batch_size,
                         lr=0.1, cpus_per_worker=1 if args.gpu else threads, shuffle_buffer=0, use_gpu=args.gpu,
                         cache_decoded="false")
    run = pretrain(cfg)
    streamed = statistics.median(h["images_per_s"] for h in run.history[1:])
    ceiling = ceiling_images_per_s(cfg, len(index.classes), args.ceiling_steps)
    return {"figure": "P3-ceiling", "device": dev, f"{dev}_img_s": round(streamed, 1),
            f"{dev}_ceiling_img_s": round(ceiling, 1), "ratio": round(streamed / ceiling, 3),
            "epochs_img_s": [round(h["images_per_s"], 1) for h in run.history], "arch": args.arch,
            "size": args.ceiling_size, "batch_size": args.ceiling_batch_size, "images": len(index),
            "photo_side": args.ceiling_photo_size, "cpus": args.cpus, "source": "parquet JPEG shards, decoded every epoch"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=20, help="P3 source classes")
    ap.add_argument("--images-per-class", type=int, default=60, help="P3 source images per class")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--p3-arch", default="resnet18")
    ap.add_argument("--epochs", type=int, default=4, help="P3 epochs")
    ap.add_argument("--p4-classes", type=int, default=20)
    ap.add_argument("--p4-images-per-class", type=int, default=160,
                    help="20 x 160: 50 batches of 64, 10 at 80%%; fixed costs (Train start-up, the surrogate's, extraction's) weigh less the larger")
    ap.add_argument("--p4-ratios", type=float, nargs="+", default=[0.8], help="pruning ratios besides dense (e.g. 0.5 0.8)")
    ap.add_argument("--p4-size", type=int, default=64, help="P4's pretraining image size")
    ap.add_argument("--p4-epochs", type=int, default=10)
    ap.add_argument("--arch", default="resnet50", help="P4's pretrained net")
    ap.add_argument("--surrogate-arch", default="resnet18")
    ap.add_argument("--surrogate-size", type=int, default=16, help="the surrogate's image size (training and extraction)")
    ap.add_argument("--surrogate-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (both loops: bf16 autocast, channels_last)")
    ap.add_argument("--only", choices=("P3", "P4", "ceiling"),
                    help="measure one figure (P3-ceiling runs by default only with --gpu)")
    ap.add_argument("--ceiling-size", type=int, default=224, help="P3-ceiling's training image size")
    ap.add_argument("--ceiling-photo-size", type=int, default=320, help="P3-ceiling's JPEG side (resized for training)")
    ap.add_argument("--ceiling-classes", type=int, default=20)
    ap.add_argument("--ceiling-images-per-class", type=int, default=200, help="20 x 200: 15 batches of 256 an epoch")
    ap.add_argument("--ceiling-batch-size", type=int, default=256)
    ap.add_argument("--ceiling-epochs", type=int, default=4)
    ap.add_argument("--ceiling-steps", type=int, default=30, help="timed steps of the ceiling loop")
    args = ap.parse_args()
    if args.cpus < 2:
        ap.error("--cpus must be >= 2: one for the training worker, the rest for data")
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA GPU, and torch sees none here")

    import ray

    work = Path(tempfile.mkdtemp(prefix="p34-"))
    threads = max(1, args.cpus - 1)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    for figure, measure in (("P3", p3_figure), ("P4", p4_figure), ("ceiling", ceiling_figure)):
        if args.only == figure or (args.only is None and (figure != "ceiling" or args.gpu)):
            print(json.dumps(measure(args, work, threads)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
