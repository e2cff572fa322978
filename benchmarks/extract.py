"""Figure P1: images/s of the Ray Data extraction pipeline vs a plain DataLoader + model loop.

Same generated data, same model and weights, same batch size, same CPU budget (``--cpus``): Ray
gets ``ray.init(num_cpus=cpus)`` and runs the real ``extract_features`` (on CPU: a model actor pool
sized by ``InferencePool`` whose actors decode their own images and commit parquet parts); the plain loop gets a DataLoader with cpus-1
workers and one model in the main process, run with cpus-1 and with cpus torch threads, the
faster being the baseline. Both decode with the same function and write their features to parquet.

Two figures per side, from the curve "rows done by time t" (time counted from the call, so Ray's
excludes ``ray.init``, reported apart as ``ray_init_s``; the driver imports ``ray.data`` before the
call, as it imports torch before the loop's):
- steady rate: rows/s between the first output at or past ``--warmup-rows`` rows and the last row
  (Ray's rows are timed by the mtimes of the parquet parts its actors commit; the plain loop's
  by the model's output batches);
- start-up: the time to that warm-up point minus the time those rows take at the steady rate,
  i.e. the fixed cost before the pipeline runs at its steady rate (actor start, first blocks).
``steady_ratio`` = Ray's steady rate / the plain loop's; ``ratio`` is the end-to-end one (start-up
and the final write included). Optionally (default on) it also times the decode stage alone on
photo-sized JPEGs, full-size vs re-encoded at ``--max-side`` (``dp4tl data shard --max-side``).
Prints one JSON line. ``--decoders`` prints another figure instead, P1-decoders (extraction at 224 px,
PIL vs torchvision's JPEG decoder - nvjpeg where there is a GPU - against the CPU decode ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dp4tl_ray.data.decode import DecodeSpec, decode_image  # noqa: E402
from dp4tl_ray.data.imagefolder import FolderIndex, scan_image_folder  # noqa: E402
from dp4tl_ray.data.parquet import Reencode, open_shards, shard_image_folder  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.features import ExtractConfig, extract_features  # noqa: E402
from dp4tl_ray.featurestore import feature_table  # noqa: E402
from dp4tl_ray.models import ModelSpec, build_model, to_model_input  # noqa: E402


class _Images(torch.utils.data.Dataset):
    def __init__(self, index: FolderIndex, spec: DecodeSpec):
        self.index, self.spec = index, spec

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        data = (self.index.root / self.index.paths[i]).read_bytes()
        return i, int(self.index.labels[i]), torch.from_numpy(decode_image(data, self.spec))


def plain_loop(index: FolderIndex, spec: ModelSpec, decode: DecodeSpec, batch: int, workers: int, threads: int,
               out: Path) -> tuple[float, list[tuple[float, int]]]:
    """The baseline: DataLoader workers decode, the main process runs the model.

    Returns the wall seconds and the ``(seconds since start, rows done)`` point of every batch."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build_model(spec, seed=0).eval()
    loader = torch.utils.data.DataLoader(_Images(index, decode), batch_size=batch, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    tables, points, done = [], [], 0
    with torch.inference_mode():
        for ids, labels, images in loader:
            x = to_model_input(images)
            f = model.features(x)
            top_logit, top_idx = model.net.fc(f).topk(5, dim=1)
            f = torch.nn.functional.normalize(f, dim=1)
            tables.append(feature_table(ids.numpy(), labels.numpy(), f.numpy(), top_idx.numpy(), top_logit.numpy()))
            done += len(ids)
            points.append((time.perf_counter() - t0, done))
    pq.write_table(pa.concat_tables(tables), out / "plain.parquet")
    return time.perf_counter() - t0, points


def ray_points(store_dir: Path, t0_wall: float) -> list[tuple[float, int]]:
    """``(seconds since t0_wall, rows done)`` per parquet file of a FeatureStore, by the file's mtime."""
    files = sorted((f.stat().st_mtime, pq.read_metadata(f).num_rows) for f in store_dir.rglob("*.parquet"))
    done, points = 0, []
    for mtime, rows in files:
        done += rows
        points.append((mtime - t0_wall, done))
    return points


def steady_and_startup(points: list[tuple[float, int]], warmup_rows: int) -> tuple[float, float, int]:
    """Steady rows/s after ``warmup_rows`` and the start-up seconds, from ``(time, rows done)`` points.

    The warm-up point is the first at or past ``warmup_rows``; the steady rate is the rows after it
    over the time after it; start-up is the time to it minus the time its rows take at that rate.
    Also returns the rows in the steady window."""
    t_w, r_w = next((t, r) for t, r in points if r >= warmup_rows)
    t_n, r_n = points[-1]
    if r_n - r_w < warmup_rows or t_n <= t_w:
        raise SystemExit(f"too few output points after warm-up ({r_w} -> {r_n} rows); use more images")
    rate = (r_n - r_w) / (t_n - t_w)
    return rate, t_w - r_w / rate, r_n - r_w


def decode_rate(shard_dir: Path, spec: DecodeSpec, seconds: float = 3.0) -> tuple[float, int]:
    """Images/s of ``decode_image`` in this one process (one core) over a shard set's bytes, and their mean max side."""
    shards = open_shards(shard_dir)
    images = [b for f in shards.files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    from PIL import Image
    import io

    side = int(np.mean([max(Image.open(io.BytesIO(b)).size) for b in images]))
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in images:
            decode_image(b, spec)
        done += len(images)
    return done / (time.perf_counter() - t0), side


def decode_figures(work: Path, photo_size: int, max_side: int, quality: int) -> dict:
    """Decode images/s per core at 224 px (resize 256) on photo-sized JPEGs, full size vs re-encoded shards."""
    synth = generate(SynthConfig(root=str(work / "photos"), num_domains=2, classes_per_domain=5, images_per_class=10,
                                 image_size=photo_size, tasks=0, seed=1))
    index = scan_image_folder(synth.source_dir)
    spec = DecodeSpec.for_size(224)
    full, full_side = decode_rate(shard_image_folder(index, work / "photos-full").root, spec)
    small, small_side = decode_rate(shard_image_folder(index, work / "photos-small",
                                                       reencode=Reencode(max_side, quality)).root, spec)
    return {"decode_img_s_per_core_full": round(full, 1), "decode_img_s_per_core_resized": round(small, 1),
            "decode_full_side": full_side, "decode_resized_side": small_side, "decode_resized_quality": quality,
            "decode_speedup": round(small / full, 2)}


def decoder_figure(args, work: Path) -> dict:
    """P1-decoders: extraction at 224 px (resize 256) of photo-sized JPEG shards with each JPEG decoder - PIL
    (CPU tasks beside GPU actors; in the actors on a CPU pool) and torchvision's in the model actors (nvjpeg
    on a GPU) - against the node's CPU decode ceiling (one core's decode rate x its cores). Needs a fresh
    Ray (``ray.init`` here); each decoder's whole extraction call is timed, start-up included."""
    import ray

    synth = generate(SynthConfig(root=str(work / "photos224"), num_domains=max(1, args.decoder_classes // 5),
                                 classes_per_domain=5, images_per_class=args.decoder_images_per_class,
                                 image_size=args.photo_size, tasks=0, seed=2))
    index = scan_image_folder(synth.source_dir)
    shards = shard_image_folder(index, work / "photos224-shards").root
    n = len(index)
    per_core, side = decode_rate(Path(shards), DecodeSpec.for_size(224))
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rates, actors = {}, {}
    for decoder in ("pil", "torchvision"):
        cfg = ExtractConfig(source=str(shards), out=str(work / f"decoders-{decoder}"), arch=args.decoder_arch,
                            image_size=224, batch_size=args.decoder_batch_size, topk=5, jpeg_decoder=decoder)
        t0 = time.perf_counter()
        store = extract_features(cfg, progress=False)
        rates[decoder] = store.num_rows / (time.perf_counter() - t0)
        actors[decoder] = store.manifest["num_actors"]
    ray.shutdown()
    ceiling = per_core * args.cpus
    return {"figure": "P1-decoders", "device": "gpu" if gpus else "cpu", "gpus": gpus, "cpus": args.cpus,
            "images": n, "photo_side": side, "size": 224, "arch": args.decoder_arch,
            "pil_img_s": round(rates["pil"], 1), "torchvision_img_s": round(rates["torchvision"], 1),
            "torchvision_vs_pil": round(rates["torchvision"] / rates["pil"], 3),
            "cpu_decode_per_core_img_s": round(per_core, 1), "cpu_decode_ceiling_img_s": round(ceiling, 1),
            "pil_vs_ceiling": round(rates["pil"] / ceiling, 3), "torchvision_vs_ceiling": round(rates["torchvision"] / ceiling, 3),
            "actors": actors, "note": "whole extraction calls (start-up included); PIL's ceiling: the node's cores decoding"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=20)  # 20 x 600 = 12k images: >= 10k in the steady window
    p.add_argument("--images-per-class", type=int, default=600)
    p.add_argument("--warmup-rows", type=int, default=2000, help="rows before the steady-state window")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--photo-size", type=int, default=448, help="side of the JPEGs for the decode figures")
    p.add_argument("--max-side", type=int, default=256, help="re-encoded side for the decode figures")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--no-decode", action="store_true", help="skip the decode-per-core figures")
    p.add_argument("--work", type=Path, default=None, help="where to generate data (default: a temp dir)")
    p.add_argument("--decoders", action="store_true",
                   help="instead: P1-decoders, extraction at 224 px with PIL vs torchvision's JPEG decoder (nvjpeg on a GPU)")
    p.add_argument("--decoder-classes", type=int, default=20)
    p.add_argument("--decoder-images-per-class", type=int, default=100)
    p.add_argument("--decoder-arch", default="resnet18")
    p.add_argument("--decoder-batch-size", type=int, default=128)
    args = p.parse_args()
    if args.decoders:
        print(json.dumps(decoder_figure(args, args.work or Path(tempfile.mkdtemp(prefix="p1d-")))))
        return

    import ray
    import ray.data  # noqa: F401 - a library import, outside the timed window like torch's for the loop

    from dp4tl_ray.pool import InferencePool

    work = args.work or Path(tempfile.mkdtemp(prefix="p1-"))
    synth = generate(SynthConfig(root=str(work / "data"), num_domains=args.classes // 5 or 1, classes_per_domain=5,
                                 images_per_class=args.images_per_class, image_size=args.size, tasks=0, seed=0))
    index = scan_image_folder(synth.source_dir)
    n = len(index)
    spec = ModelSpec(args.arch, len(index.classes))
    decode = DecodeSpec(args.size, args.size)
    figures = decode_figures(work, args.photo_size, args.max_side, args.quality) if not args.no_decode else {}

    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init_s = time.perf_counter() - t
    pool = InferencePool.plan()
    cfg = ExtractConfig(source=str(synth.source_dir), out=str(work / f"ray-{time.time_ns()}"), arch=args.arch,
                        image_size=args.size, resize_size=args.size, batch_size=args.batch_size, topk=5)
    t0_wall, t0 = time.time(), time.perf_counter()
    store = extract_features(cfg, progress=False)
    ray_s = time.perf_counter() - t0
    assert store.num_rows == n
    ray.shutdown()
    ray_rate, ray_startup, steady_rows = steady_and_startup(ray_points(Path(cfg.out), t0_wall), args.warmup_rows)
    plain = {}  # model threads -> (steady rows/s, start-up s, wall s)
    for threads in sorted({max(1, args.cpus - 1), args.cpus}):
        wall, points = plain_loop(index, spec, decode, args.batch_size, max(1, args.cpus - 1), threads, work)
        plain[threads] = (*steady_and_startup(points, args.warmup_rows)[:2], wall)
    best = max(plain, key=lambda t: plain[t][0])
    plain_rate, plain_startup, plain_s = plain[best]
    # Same rows out of both (weights are seeded identically).
    plain_table = pq.read_table(work / "plain.parquet").sort_by("id")
    ray_feats = store.arrays()[2]
    plain_feats = np.asarray(plain_table.column("feature").combine_chunks().flatten(), np.float32).reshape(n, -1)
    max_diff = float(np.abs(ray_feats - plain_feats).max())
    print(json.dumps({"figure": "P1", "steady_ratio": round(ray_rate / plain_rate, 3), "startup_s": round(ray_startup, 2),
                      "startup_definition": "s from the extract call to the warm-up row, less those rows at the steady rate; "
                                            "ray.init excluded (ray_init_s), as are the driver's library imports "
                                            "(ray.data; torch for the loop)",
                      "ray_steady_img_s": round(ray_rate, 1), "plain_steady_img_s": round(plain_rate, 1),
                      "plain_startup_s": round(plain_startup, 2), "plain_threads": best,
                      "plain_steady_img_s_by_threads": {t: round(v[0], 1) for t, v in plain.items()},
                      "warmup_rows": args.warmup_rows, "steady_rows": steady_rows,
                      "ray_init_s": round(ray_init_s, 2), "ray_actors": pool.size, "ray_threads_per_actor": pool.threads,
                      "ray_img_s": round(n / ray_s, 1), "plain_img_s": round(n / plain_s, 1),
                      "ratio": round(plain_s / ray_s, 3), "images": n, "size": args.size, "arch": args.arch,
                      "cpus": args.cpus, "ray_wall_s": round(ray_s, 2), "plain_wall_s": round(plain_s, 2),
                      "max_feature_diff": max_diff, **figures}))


if __name__ == "__main__":
    main()
