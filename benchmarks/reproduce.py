"""Figure P5: a mini reproduction of the paper's headline on generated data, CPU only.

Runs the sweep of jobs/configs/reproduce.yaml (source ~100 classes, one downstream task; dense,
random-class, moderate, LM and FM at pruning ratios 0.5 and 0.8; supervised pretraining; LP), prints
the report's tables and one JSON line with the accuracy differences at ratio 0.8, in points:

    {"figure": "P5", "lm_minus_dense": .., "fm_minus_dense": .., "lm_minus_random": .., "fm_minus_random": ..}

Targets: LM/FM within 1 point of dense and >= 10 points above random (class-level random pruning).
Running it again reuses every finished stage and trial (it is a sweep: same name, same storage).
``--seeds 0 1 2`` (with ``--methods``/``--ratios`` to narrow it) averages over seeds: the seed drives
the k-means init, every random choice of the selection, pretraining and the probe. With one seed the
LP numbers carry about +-2.5 points of noise (400 test images, one training run per cell).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.cli import init_ray  # noqa: E402
from dp4tl_ray.report import ok_trials  # noqa: E402
from dp4tl_ray.results import load_results  # noqa: E402
from dp4tl_ray.sweep import load_plan, run_sweep  # noqa: E402

RATIO = 0.8


def lp_points(records: list[dict], method: str, ratio: float | None) -> float | None:
    """Mean LP test top-1 (percent) of ``method`` at ``ratio`` over seeds (dense: any ratio)."""
    vals = [r["lp_acc"] for r in ok_trials(records)
            if r["method"] == method and (ratio is None or abs(r["ratio"] - ratio) < 1e-9) and r["lp_acc"] is not None]
    return 100 * statistics.fmean(vals) if vals else None


def p5_figure(records: list[dict]) -> dict:
    dense, random = lp_points(records, "dense", None), lp_points(records, "random-class", RATIO)
    out: dict = {"figure": "P5", "ratio": RATIO,
                 "seeds": len({r["seed"] for r in ok_trials(records) if r["method"] == "dense"})}
    for m in ("lm", "fm"):
        acc = lp_points(records, m, RATIO)
        out[f"{m}_minus_dense"] = None if acc is None or dense is None else round(acc - dense, 2)
        out[f"{m}_minus_random"] = None if acc is None or random is None else round(acc - random, 2)
    accs = {m: lp_points(records, m, None if m == "dense" else RATIO) for m in ("dense", "lm", "fm", "moderate", "random-class")}
    out["lp_acc_pct"] = {m: None if a is None else round(a, 2) for m, a in accs.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "reproduce.yaml"))
    ap.add_argument("--storage-path", default="out/reproduce")
    ap.add_argument("--seeds", type=int, nargs="+", help="override sweep.seeds (the figure is the mean over seeds)")
    ap.add_argument("--methods", nargs="+", help="override sweep.methods (keep dense, lm, fm, random-class for the figure)")
    ap.add_argument("--ratios", type=float, nargs="+", help="override sweep.ratios (the figure reads ratio 0.8)")
    ap.add_argument("--name", help="sweep name; default: the config's, with a suffix when anything is overridden "
                                   "(a sweep directory belongs to one config)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"seeds": args.seeds, "methods": args.methods, "ratios": args.ratios}
    name = args.name
    if name is None and any(v is not None for v in overrides.values()):
        name = load_plan(args.config).sweep.name + "-" + "-".join(
            f"{k}{'_'.join(str(x) for x in v)}" for k, v in overrides.items() if v is not None)
    plan = load_plan(args.config, {"storage_path": args.storage_path, "name": name, **overrides})
    init_ray(worker_logs=False)
    t0 = time.perf_counter()
    summary = run_sweep(plan)
    records = load_results(summary["sweep"])
    if summary.get("report"):
        print(Path(summary["report"]["report.md"]).read_text())
    fig = p5_figure(records)
    fig["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    fig["trials_ok"] = f"{summary['ok']}/{summary['trials']}"
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
