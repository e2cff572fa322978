"""Figure P1: images/s of the Ray Data extraction pipeline vs a plain DataLoader + model loop.

Same generated data, same model and weights, same batch size, same CPU budget (``--cpus``):
Ray gets ``ray.init(num_cpus=cpus)`` (decode tasks + one model actor with cpus-1 threads); the
plain loop gets a DataLoader with cpus-1 workers and a model with cpus-1 threads in the main
process. Both decode with the same function and write their features to parquet. Ray's wall time
includes its actor start-up but not ``ray.init``. Prints one JSON line.
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
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dp4tl_ray.data.decode import DecodeSpec, decode_image  # noqa: E402
from dp4tl_ray.data.imagefolder import FolderIndex, scan_image_folder  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.features import ExtractConfig, extract_features
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


def plain_loop(index: FolderIndex, spec: ModelSpec, decode: DecodeSpec, batch: int, workers: int, threads: int, out: Path) -> float:
    """The baseline: DataLoader workers decode, the main process runs the model. Returns seconds."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build_model(spec, seed=0).eval()
    loader = torch.utils.data.DataLoader(_Images(index, decode), batch_size=batch, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    tables = []
    with torch.inference_mode():
        for ids, labels, images in loader:
            x = to_model_input(images)
            f = model.features(x)
            top_logit, top_idx = model.net.fc(f).topk(5, dim=1)
            f = torch.nn.functional.normalize(f, dim=1)
            tables.append(feature_table(ids.numpy(), labels.numpy(), f.numpy(), top_idx.numpy(), top_logit.numpy()))
    import pyarrow as pa

    pq.write_table(pa.concat_tables(tables), out / "plain.parquet")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--work", type=Path, default=None, help="where to generate data (default: a temp dir)")
    args = p.parse_args()

    import ray

    work = args.work or Path(tempfile.mkdtemp(prefix="p1-"))
    synth = generate(SynthConfig(root=str(work / "data"), num_domains=args.classes // 5 or 1, classes_per_domain=5,
                                 images_per_class=args.images_per_class, image_size=args.size, tasks=0, seed=0))
    index = scan_image_folder(synth.source_dir)
    n = len(index)
    spec = ModelSpec(args.arch, len(index.classes))
    decode = DecodeSpec(args.size, args.size)
    workers = max(1, args.cpus - 1)

    plain_s = plain_loop(index, spec, decode, args.batch_size, workers, workers, work)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    cfg = ExtractConfig(source=str(synth.source_dir), out=str(work / f"ray-{time.time_ns()}"), arch=args.arch,
                        image_size=args.size, resize_size=args.size, batch_size=args.batch_size, num_actors=1, topk=5)
    t0 = time.perf_counter()
    store = extract_features(cfg, progress=False)
    ray_s = time.perf_counter() - t0
    assert store.num_rows == n
    ray.shutdown()
    # Same rows out of both (weights are seeded identically).
    plain = pq.read_table(work / "plain.parquet").sort_by("id")
    ray_feats = store.arrays()[2]
    plain_feats = np.asarray(plain.column("feature").combine_chunks().flatten(), np.float32).reshape(n, -1)
    max_diff = float(np.abs(ray_feats - plain_feats).max())
    print(json.dumps({"figure": "P1", "ray_img_s": round(n / ray_s, 1), "plain_img_s": round(n / plain_s, 1),
                      "ratio": round(plain_s / ray_s, 3), "images": n, "size": args.size, "arch": args.arch,
                      "cpus": args.cpus, "ray_wall_s": round(ray_s, 2), "plain_wall_s": round(plain_s, 2),
                      "max_feature_diff": max_diff}))


if __name__ == "__main__":
    main()
