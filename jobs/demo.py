"""The demo, end to end on an embedded local Ray: generate data -> extract surrogate features.

    python jobs/demo.py --out out/demo [--config jobs/configs/demo.yaml]

Later stages (selection, pretraining, evaluation, report) join this job as they land.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.cli import format_extract_summary  # noqa: E402
from dp4tl_ray.config import from_dict, load_yaml  # noqa: E402
from dp4tl_ray.data.synthetic import SynthConfig, generate  # noqa: E402
from dp4tl_ray.errors import UserError  # noqa: E402
from dp4tl_ray.features import ExtractConfig, extract_features  # noqa: E402


def run_demo(out: Path, config: Path) -> None:
    import ray

    preset = load_yaml(config)
    t0 = time.perf_counter()
    synth = generate(from_dict(SynthConfig, {**preset["synth"], "root": str(out / "data")}, "synth"))
    print(f"[1/2] data: {synth.num_classes} source classes, {synth.num_images} images, "
          f"{len(synth.broken_files)} planted broken files -> {synth.root}")
    ray.init(num_cpus=min(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    source = extract_features(from_dict(ExtractConfig, {**preset["extract"], "source": str(synth.source_dir),
                                                        "out": str(out / "features" / "source")}, "extract"))
    task = synth.task_dirs[0]
    downstream = extract_features(from_dict(ExtractConfig, {
        **preset["extract"], "source": str(task / "train"), "out": str(out / "features" / task.name),
        "num_classes": source.manifest["surrogate"]["num_classes"]}, "extract"))
    print("[2/2] features:")
    print(format_extract_summary(source))
    print(format_extract_summary(downstream))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; artifacts under {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / "demo.yaml")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    try:
        run_demo(args.out, args.config)
    except UserError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
