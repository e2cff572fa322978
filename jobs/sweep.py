"""Run a sweep (Ray Tune: method x ratio x surrogate x mode x task -> results table and plots).

Two ways, same command:

    python jobs/sweep.py --config jobs/configs/demo.yaml           # embedded local Ray
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/imagenet.yaml \\
        --storage-path s3://bucket/sweeps                             # on a cluster: ray.init() attaches

Running it again with the same config and name resumes: finished trials are not rerun.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.cli import add_sweep_flags, run_sweep_command  # noqa: E402
from dp4tl_ray.errors import UserError, user_message  # noqa: E402
from dp4tl_ray.ray_console import filter_native_notices  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_flags(ap)
    args = ap.parse_args()
    if not getattr(args, "verbose", False):
        filter_native_notices()  # this process owns the console: Ray's known-harmless native notices stay off it
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        run_sweep_command(args)
    except UserError as e:
        print(f"sweep: error: {user_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
