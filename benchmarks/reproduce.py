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

``--v2`` runs Figure P5 v2 instead (jobs/configs/reproduce_v2.yaml): the generator's harder regime, where
relevance is graded over four domains, class sizes differ, look-alike distractor domains compete for the
votes and other domains help a little, so no keep-set is the answer by construction. It sweeps dense,
random-class, Moderate-DS, EL2N, LM, FM and LM-reverse (the least-voted classes: the sanity check that the
votes carry the signal) over ratios 0.2-0.9 with 3 seeds, and prints one JSON line:

    {"figure": "P5v2", "seeds": 3, "curves": {method: {ratio: [mean, std]}}, "lm_minus_random_0.8": ..,
     "fm_minus_random_0.8": .., "lm_minus_reverse_0.8": .., ...}

(LP test top-1 in percent; dense under ratio 0). Target: LM and FM >= random-class + 5 points at 0.8 and
above LM-reverse, in 40 minutes on 2 cores. The report's table and plot carry the spread over seeds.
Every method pretrains supervised there; ``--v2 --config jobs/configs/reproduce_v2_ssl.yaml`` is the SSL arm
(FM under MoCo v2, its published pairing; the same JSON keys, its header says what it measured on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.cli import init_ray  # noqa: E402
from dp4tl_ray.config import load_yaml  # noqa: E402
from dp4tl_ray.featurestore import FeatureStore  # noqa: E402
from dp4tl_ray.ray_console import filter_native_notices  # noqa: E402
from dp4tl_ray.report import mean_std, ok_trials  # noqa: E402
from dp4tl_ray.results import load_results  # noqa: E402
from dp4tl_ray.select.keepset import KeepSet  # noqa: E402
from dp4tl_ray.sweep import load_plan, run_sweep  # noqa: E402

RATIO = 0.8
CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def lp_values(records: list[dict], method: str, ratio: float | None) -> list[float]:
    """LP test top-1 (percent) of ``method`` at ``ratio``, one per seed (dense: any ratio)."""
    return [100 * r["lp_acc"] for r in ok_trials(records)
            if r["method"] == method and (ratio is None or abs(r["ratio"] - ratio) < 1e-9) and r["lp_acc"] is not None]


def lp_points(records: list[dict], method: str, ratio: float | None) -> float | None:
    """Mean LP test top-1 (percent) of ``method`` at ``ratio`` over seeds (dense: any ratio)."""
    vals = lp_values(records, method, ratio)
    return statistics.fmean(vals) if vals else None


def _seeds(records: list[dict]) -> int:
    """Seeds behind every mean of the figure: the fewest finished seeds of any (method, ratio) cell."""
    cells: dict[tuple, set] = {}
    for r in ok_trials(records):
        cells.setdefault((r["method"], r["ratio"]), set()).add(r["seed"])
    return min((len(s) for s in cells.values()), default=0)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 2)


def p5_figure(records: list[dict]) -> dict:
    dense, random = lp_points(records, "dense", None), lp_points(records, "random-class", RATIO)
    out: dict = {"figure": "P5", "ratio": RATIO, "seeds": _seeds(records)}
    for m in ("lm", "fm"):
        acc = lp_points(records, m, RATIO)
        out[f"{m}_minus_dense"] = _minus(acc, dense)
        out[f"{m}_minus_random"] = _minus(acc, random)
    accs = {m: lp_points(records, m, None if m == "dense" else RATIO) for m in ("dense", "lm", "fm", "moderate", "random-class")}
    out["lp_acc_pct"] = {m: None if a is None else round(a, 2) for m, a in accs.items()}
    return out


def p5v2_figure(records: list[dict]) -> dict:
    """Figure P5 v2: every method's curve (mean and sample std over seeds per ratio) and the gaps at 0.8."""
    curves: dict[str, dict[str, list]] = {}
    for r in ok_trials(records):
        vals = lp_values(records, r["method"], r["ratio"])
        mean, std = mean_std(vals)
        curves.setdefault(r["method"], {})[f"{r['ratio']:g}"] = [round(mean, 2), None if std is None else round(std, 2)]
    curves = {m: dict(sorted(c.items(), key=lambda kv: float(kv[0]))) for m, c in sorted(curves.items())}
    at = {m: lp_points(records, m, RATIO) for m in ("lm", "fm", "random-class", "lm-reverse", "fm-reverse")}
    return {"figure": "P5v2", "ratio": RATIO, "seeds": _seeds(records), "curves": curves,
            "lm_minus_random_0.8": _minus(at["lm"], at["random-class"]),
            "fm_minus_random_0.8": _minus(at["fm"], at["random-class"]),
            "lm_minus_reverse_0.8": _minus(at["lm"], at["lm-reverse"]),
            "fm_minus_lm_reverse_0.8": _minus(at["fm"], at["lm-reverse"]),
            "fm_minus_reverse_0.8": _minus(at["fm"], at["fm-reverse"])}


def relevance_kept(work: Path, task: str = "task_0") -> dict[str, dict[str, list[float]]]:
    """What each keep-set of the sweep kept of the planted answer, averaged over seeds per method and ratio:
    ``[relevance, distractors, classes]`` - the share of the graded relevance mass (every source image
    weighted by its class's relevance in ground_truth.json), the share of distractor images it keeps, and
    how many source classes its images come from (a class-level keep-set holds whole classes; FM's
    clusters may spread the same number of images over many classes, a few images each)."""
    truth = json.loads((work / "data" / "downstream" / task / "ground_truth.json").read_text())
    kept: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for meta in sorted(work.glob(f"keepsets/*/{task}/*/keepset.json")):
        ks = KeepSet.load(meta.parent)
        store = FeatureStore.open(ks.meta.source_features)
        table = store.read(["id", "label"])
        wnids = np.asarray(store.manifest["classes"])[table.column("label").to_numpy()]
        rel = np.array([truth["relevance"][w] for w in wnids])
        dis = np.isin(wnids, truth["distractor_wnids"])
        mask = np.isin(table.column("id").to_numpy(), ks.ids)
        kept.setdefault(ks.meta.method, {}).setdefault(f"{ks.meta.ratio:g}", []).append(
            (rel[mask].sum() / rel.sum(), dis[mask].sum() / max(dis.sum(), 1), len(np.unique(wnids[mask]))))
    return {m: {r: [round(float(np.mean([v[i] for v in vals])), 3) for i in (0, 1, 2)] for r, vals in sorted(by.items())}
            for m, by in sorted(kept.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v2", action="store_true", help="Figure P5 v2: the harder regime, 7 methods x 4 ratios x 3 seeds")
    ap.add_argument("--config", help="default: jobs/configs/reproduce.yaml (reproduce_v2.yaml with --v2)")
    ap.add_argument("--storage-path", default="out/reproduce")
    ap.add_argument("--seeds", type=int, nargs="+", help="override sweep.seeds (the figure is the mean over seeds)")
    ap.add_argument("--methods", nargs="+", help="override sweep.methods (keep dense, lm, fm, random-class for the figure)")
    ap.add_argument("--ratios", type=float, nargs="+", help="override sweep.ratios (the figure reads ratio 0.8)")
    ap.add_argument("--name", help="sweep name; default: the config's, with a suffix when anything is overridden "
                                   "(a sweep directory belongs to one config)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = args.config or str(CONFIGS / ("reproduce_v2.yaml" if args.v2 else "reproduce.yaml"))
    overrides = {"seeds": args.seeds, "methods": args.methods, "ratios": args.ratios}
    name = args.name
    if name is None and any(v is not None for v in overrides.values()):
        name = (load_yaml(config).get("sweep") or {}).get("name", "sweep") + "-" + "-".join(
            f"{k}{'_'.join(str(x) for x in v)}" for k, v in overrides.items() if v is not None)
    plan = load_plan(config, {"storage_path": args.storage_path, "name": name, **overrides})
    filter_native_notices()
    init_ray(worker_logs=False)
    t0 = time.perf_counter()
    summary = run_sweep(plan)
    records = load_results(summary["sweep"])
    if summary.get("report"):
        print(Path(summary["report"]["report.md"]).read_text())
    fig = p5v2_figure(records) if args.v2 else p5_figure(records)
    fig["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    fig["trials_ok"] = f"{summary['ok']}/{summary['trials']}"
    fig["plot"] = (summary.get("report") or {}).get("accuracy_lp.png")
    if args.v2:
        fig["relevance_distractors_classes_kept"] = relevance_kept(plan.sweep.work)
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
