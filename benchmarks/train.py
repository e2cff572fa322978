"""Figures P3 and P4: Ray Train pretraining throughput and the speed-up of training on keep-sets.

P3: images/s of the Ray Train supervised loop (1 worker) vs a plain PyTorch loop (DataLoader with
    the same decode + augmentation, same model, batch size and threads), median over epochs 2..E.
P4: time of the epochs themselves when pretraining on keep-sets that prune 0, 50 and 80% of the
    classes (random classes, same epochs and per-worker batch): speed-up vs ratio 0, beside the
    fraction of images kept; the fixed start-up cost of a Train run is reported separately.
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
from dp4tl_ray.data.transforms import supervised_augment  # noqa: E402
from dp4tl_ray.models import ModelSpec, build_model  # noqa: E402
from dp4tl_ray.select.baselines import random_by_class  # noqa: E402
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta  # noqa: E402
from dp4tl_ray.train.trainer import PretrainConfig, pretrain  # noqa: E402


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, index, size: int, scale: float):
        self.index, self.size, self.scale = index, size, scale

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        img = decode_image((self.index.root / self.index.paths[i]).read_bytes(), DecodeSpec(self.size, self.size))
        out = supervised_augment({"id": np.array([i]), "label": np.array([0]), "image": img[None]}, self.size,
                                 scale=(self.scale, 1.0))
        return torch.from_numpy(out["image"][0]), int(self.index.labels[i])


def plain_images_per_s(index, cfg: PretrainConfig, threads: int) -> list[float]:
    """The baseline loop: DataLoader workers decode + augment, the main process trains."""
    torch.set_num_threads(threads)
    model = build_model(ModelSpec(cfg.arch, len(index.classes), cfg.small_input), seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(_Augmented(index, cfg.image_size, cfg.crop_scale_min), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=1, persistent_workers=True)
    rates = []
    for _ in range(cfg.epochs):
        t0, n = time.perf_counter(), 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.permute(0, 3, 1, 2).float().div_(255)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        rates.append(n / (time.perf_counter() - t0))
    return rates


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
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="p34-"))
    synth = generate(SynthConfig(root=str(work / "data"), num_domains=max(1, args.classes // 5), classes_per_domain=5,
                                 images_per_class=args.images_per_class, image_size=args.size, tasks=0))
    index = scan_image_folder(synth.source_dir)
    threads = max(1, args.cpus - 1)
    cfg = PretrainConfig(source=str(synth.source_dir), out=str(work / "runs"), arch=args.arch, image_size=args.size,
                         resize_size=args.size, crop_scale_min=0.5, epochs=args.epochs, batch_size=args.batch_size,
                         lr=0.05, cpus_per_worker=threads, shuffle_buffer=0)

    plain = statistics.median(plain_images_per_s(index, cfg, threads)[1:])
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    runs = {}
    for ratio in (0.0, 0.5, 0.8):
        ks = keepset_for_ratio(index, ratio, work / f"keep-{ratio}") if ratio else None
        r = pretrain(PretrainConfig(**{**cfg.__dict__, "name": f"r{ratio}", "keepset": ks}))
        runs[ratio] = r
    ray_rate = statistics.median(h["images_per_s"] for h in runs[0.0].history[1:])
    print(json.dumps({"figure": "P3", "ray_img_s": round(ray_rate, 1), "plain_img_s": round(plain, 1),
                      "ratio": round(ray_rate / plain, 3), "arch": args.arch, "size": args.size, "threads": threads}))
    epochs_s = {ratio: sum(h["epoch_s"] for h in r.history) for ratio, r in runs.items()}
    print(json.dumps({"figure": "P4",
                      "speedup_0.5": round(epochs_s[0.0] / epochs_s[0.5], 2), "speedup_0.8": round(epochs_s[0.0] / epochs_s[0.8], 2),
                      "kept_images_0.5": round(runs[0.5].images / len(index), 3),
                      "kept_images_0.8": round(runs[0.8].images / len(index), 3),
                      "epochs_s": {str(k): round(v, 2) for k, v in epochs_s.items()},
                      "startup_s": {str(k): round(r.seconds - epochs_s[k], 2) for k, r in runs.items()}}))


if __name__ == "__main__":
    main()
