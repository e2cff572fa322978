"""``dp4tl report``: a sweep's ``results.jsonl`` -> accuracy and time tables (CSV, Markdown) and plots.

Everything but writing the files is pure: trials (dicts, read by ``dp4tl_ray.results``) in, flat
summary rows out, and tables and figures drawn from those rows. A table covers one (mode, arch, surrogate, task) group;
rows are methods (dense first), columns pruning ratios, cells mean ± std over seeds in percent with
their 95% interval (``dp4tl_ray.intervals``: Student t over seeds, or Wilson in the test images for one seed).
``random-init`` (no pretraining at all: the floor any pretraining must beat) is a reference row like dense.
The one read besides the results: report.md's *Selection diagnostics*, from the manifests of the keep-sets
the trials name (:mod:`dp4tl_ray.report_diagnostics`).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dp4tl_ray import atomic
from dp4tl_ray.atomic import is_uri
from dp4tl_ray.errors import UserError
from dp4tl_ray.intervals import t_interval, wilson_interval
from dp4tl_ray.markdown import markdown_table
from dp4tl_ray.results import (  # REFERENCES: rows without a ratio
    DENSE,
    RANDOM_INIT,
    REFERENCES,
    RESULTS_FILE,
    keepset_seconds,
    load_results,
    pretrain_seconds,
)
from dp4tl_ray.select.pipeline import METHODS, pairing_note

METHOD_ORDER = (DENSE,) + METHODS + (RANDOM_INIT,)
GROUP_KEYS = ("mode", "arch", "surrogate", "task")


@dataclass(frozen=True)
class Metric:
    name: str  # column value in accuracy.csv and plot file stem
    key: str  # trial field
    title: str


METRICS = (
    Metric("lp", "lp_acc", "Linear probe (LP): test top-1 % at the epoch chosen on validation"),
    Metric("ff", "ff_acc", "Full finetune (FF): test top-1 % at the epoch chosen on validation"),
    Metric("lp_test_max", "lp_acc_test_max", "LP, max test top-1 % over epochs (selected on test, the paper's figure)"),
    Metric("ff_test_max", "ff_acc_test_max", "FF, max test top-1 % over epochs (selected on test, the paper's figure)"),
)
PLOTTED = ("lp", "ff")  # honest (validation-chosen) metrics get a figure each


# ---------------------------------------------------------------- trials

def ok_trials(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t["status"] == "ok"]


def error_trials(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t["status"] != "ok"]


# ---------------------------------------------------------------- grouping and statistics

def _group_of(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in GROUP_KEYS)


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _group_sort_key(group: tuple) -> tuple:
    return tuple("" if v is None else str(v) for v in group)


def group_trials(trials: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Ok trials by (mode, arch, surrogate, task). Trials without a surrogate (dense, random-class,
    random-image: they never look at one) join every group they match; their None matches any value."""
    trials = ok_trials(trials)
    shared = [t for t in trials if t["method"] == DENSE or t.get("surrogate") is None]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for t in trials:
        if not (t["method"] == DENSE or t.get("surrogate") is None):
            groups.setdefault(_group_of(t), []).append(t)
    for d in shared:
        homes = [g for g in groups if all(d[k] is None or d[k] == v for k, v in zip(GROUP_KEYS, g))]
        for g in homes or [_group_of(d)]:
            groups.setdefault(g, []).append(d)
    return {g: groups[g] for g in sorted(groups, key=_group_sort_key)}


def _cells(trials: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Trials by (method, ratio), methods in table order then ratio ascending."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for t in trials:
        cells.setdefault((t["method"], t["ratio"]), []).append(t)
    return {k: cells[k] for k in sorted(cells, key=lambda mr: (_method_rank(mr[0]), mr[1]))}


def _values(trials: list[dict[str, Any]], key: str) -> list[float]:
    return [float(t[key]) for t in trials if t[key] is not None]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is None below two values."""
    return _mean(values), (statistics.stdev(values) if len(values) >= 2 else None)


def interval95(values_pct: list[float], test_images: int | None) -> tuple[float | None, float | None, str | None]:
    """(low, high, kind) of a cell's 95% interval in percent: a t interval over seeds when there are two or
    more values ("t"), a Wilson interval in the test images for one ("wilson"), else none."""
    if len(values_pct) >= 2:
        return (*t_interval(values_pct), "t")
    if len(values_pct) == 1 and test_images:
        lo, hi = wilson_interval(values_pct[0] / 100, test_images)
        return 100 * lo, 100 * hi, "wilson"
    return None, None, None


def _group_fields(group: tuple) -> dict[str, Any]:
    return dict(zip(GROUP_KEYS, group))


# ---------------------------------------------------------------- accuracy

def accuracy_rows(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group x method x ratio x metric: mean and std over seeds in percent, and n."""
    rows = []
    for group, members in group_trials(trials).items():
        for (method, ratio), ts in _cells(members).items():
            for m in METRICS:
                vals = [100.0 * v for v in _values(ts, m.key)]
                if vals:
                    mean, std = mean_std(vals)
                    lo, hi, kind = interval95(vals, ts[0].get("test_images"))
                    rows.append({**_group_fields(group), "method": method, "ratio": ratio, "metric": m.name,
                                 "mean_pct": mean, "std_pct": std, "n": len(vals),
                                 "ci95_low_pct": lo, "ci95_high_pct": hi, "ci95": kind,
                                 "test_images": ts[0].get("test_images")})
    return rows


def format_cell(mean: float, std: float | None, ci: tuple[float | None, float | None] = (None, None)) -> str:
    text = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
    return text if ci[0] is None else f"{text} [{ci[0]:.1f}, {ci[1]:.1f}]"


def _row_cell(r: dict[str, Any]) -> str:
    return format_cell(r["mean_pct"], r["std_pct"], (r.get("ci95_low_pct"), r.get("ci95_high_pct")))


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def accuracy_table(rows: list[dict[str, Any]], group: tuple, metric: str) -> str | None:
    """The paper-shaped Markdown table of one group and metric (None when it has no values).

    Dense is its own first row and shows its figure under every ratio, the reference for each column
    (so does random init, last: the floor).
    """
    mine = [r for r in rows if _group_of(r) == group and r["metric"] == metric]
    if not mine:
        return None
    ratios = sorted({r["ratio"] for r in mine if r["method"] not in REFERENCES}) or [0.0]
    methods = sorted({r["method"] for r in mine}, key=_method_rank)
    at = {(r["method"], r["ratio"]): r for r in mine}
    body = []
    for method in methods:
        if method in REFERENCES:
            d = next(r for r in mine if r["method"] == method)
            cells = [_row_cell(d)] * len(ratios)
        else:
            cells = [_row_cell(at[method, q]) if (method, q) in at else "—" for q in ratios]
        n = sorted({r["n"] for r in mine if r["method"] == method})
        body.append([method, *cells, "/".join(map(str, n))])
    return markdown_table(["method \\ pruning ratio", *map(_pct, ratios), "seeds"], body)


READING = ("Intervals in brackets are 95%: a Student t interval over seeds when a cell has two or more, else a "
           "Wilson interval in the cell's test images, which counts only the test set's sampling and not the "
           "run-to-run noise of training, so it understates the spread. Two cells differ beyond the noise when "
           "their intervals do not overlap (a conservative check); overlapping intervals mean this run cannot "
           "tell them apart, not that they are equal. Every figure holds for this data, model and recipe only.")


def comparisons(rows: list[dict[str, Any]], group: tuple, metric: str, baseline: str = "random-class") -> list[str]:
    """What one table supports: each pruned method against ``baseline`` at the same ratio and against dense,
    said to differ only where the 95% intervals are disjoint."""
    mine = [r for r in rows if _group_of(r) == group and r["metric"] == metric and r.get("ci95") is not None]
    dense = next((r for r in mine if r["method"] == DENSE), None)
    lines = []
    for r in sorted((r for r in mine if r["method"] not in REFERENCES + (baseline,)),
                    key=lambda r: (r["ratio"], _method_rank(r["method"]))):
        ref = next((b for b in mine if b["method"] == baseline and b["ratio"] == r["ratio"]), None)
        said = [_verdict(r, other, name) for name, other in ((baseline, ref), (DENSE, dense)) if other]
        if said:
            lines.append(f"- {r['method']} at {_pct(r['ratio'])} ({r['mean_pct']:.1f}): " + "; ".join(said))
    return lines


def below_floor(trials: list[dict[str, Any]], rows: list[dict[str, Any]], group: tuple, metric: Metric) -> list[str]:
    """The runs of ``group`` (its trials) that score below the untrained backbone: under the lower end of the
    ``random-init`` cell's 95% interval. Such a pretraining failed (diverged, or too few steps) and says nothing
    about its keep-set; each line names the run, its score and its final pretraining loss beside its cell's
    other seeds'."""
    floor = next((r for r in rows if _group_of(r) == group and r["metric"] == metric.name
                  and r["method"] == RANDOM_INIT and r.get("ci95") is not None), None)
    if floor is None:
        return []
    lines = []
    for (method, ratio), ts in _cells([t for t in trials if t["method"] not in REFERENCES]).items():
        for t in sorted(ts, key=lambda t: t.get("seed") or 0):
            if t.get(metric.key) is None or 100 * t[metric.key] >= floor["ci95_low_pct"]:
                continue
            others = [f"{o['loss']:.2f}" for o in ts if o is not t and o.get("loss") is not None]
            loss = "" if t.get("loss") is None else (f"; final pretraining loss {t['loss']:.2f}"
                                                      + (f" (its other seeds: {', '.join(others)})" if others else ""))
            lines.append(f"- {method} at {_pct(ratio)}, seed {t.get('seed')}: {100 * t[metric.key]:.1f} < "
                         f"{floor['ci95_low_pct']:.1f}{loss}")
    return lines


BELOW_FLOOR = ("Runs below the untrained backbone (under the low end of random-init's 95% interval): their pretraining "
               "failed (diverged, or too few steps) and says nothing about their keep-sets; check their loss curves")


def _verdict(a: dict[str, Any], b: dict[str, Any], name: str) -> str:
    gap = f"{a['mean_pct'] - b['mean_pct']:+.1f} points vs {name}"
    if a["ci95_low_pct"] > b["ci95_high_pct"]:
        return f"{gap} (above, beyond the intervals)"
    if a["ci95_high_pct"] < b["ci95_low_pct"]:
        return f"{gap} (below, beyond the intervals)"
    return f"{gap} (intervals overlap: not told apart)"


# ---------------------------------------------------------------- time

def _devices(t: dict[str, Any]) -> tuple[str, float] | None:
    """(unit, devices) of one trial's pretraining run: GPUs (workers x GPUs per worker) when it used
    GPUs, else CPU workers; hours in that unit are devices x seconds / 3600."""
    if t["workers"] is None:
        return None
    if t["use_gpu"]:
        return "GPU-hours", t["workers"] * (t["gpus_per_worker"] or 0)
    return "CPU worker-hours", t["workers"]


def _device_hours(ts: list[dict[str, Any]], seconds) -> tuple[str | None, float | None]:
    """Mean over ``ts`` of devices x ``seconds(t)`` in hours, and its unit (None: no figure, or mixed devices)."""
    dev = [(d[0], d[1] * seconds(t) / 3600) for t in ts if (d := _devices(t)) is not None and seconds(t) is not None]
    units = {u for u, _ in dev}
    unit = units.pop() if len(units) == 1 else None  # mixed devices in one cell: no single figure
    return unit, _mean([h for _, h in dev]) if unit else None


def _end_to_end_seconds(t: dict[str, Any]) -> float | None:
    """Every stage of a trial up to its pretrained backbone: the keep-set's stages plus pretraining."""
    pretrain = pretrain_seconds(t)
    return None if pretrain is None else keepset_seconds(t) + pretrain


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def time_rows(trials: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group x method x ratio (means over seeds): pretraining time, the keep-set's cost
    (every stage that produced it), end to end time and device-hours, the speed-ups and the fraction of
    time saved vs dense, device-hours saved vs dense, and how the costs are known."""
    rows = []
    for group, members in group_trials(trials).items():
        for (method, ratio), ts in _cells(members).items():
            if method == RANDOM_INIT:
                continue  # nothing was pretrained
            frac = [t["kept_images"] / t["total_images"] for t in ts if t["kept_images"] is not None and t["total_images"]]
            unit, hours = _device_hours(ts, lambda t: t["pretrain_total_s"])
            e2e_unit, e2e_hours = _device_hours(ts, _end_to_end_seconds)
            rows.append({
                **_group_fields(group), "method": method, "ratio": ratio, "n": len(ts),
                "images_kept_frac": _mean(frac),
                "pretrain_s": _mean(_values(ts, "pretrain_s")),
                "select_s": _mean(_values(ts, "select_s")) or 0.0,
                "keepset_s": _mean([keepset_seconds(t) for t in ts]),
                "pretrain_total_s": _mean(_values(ts, "pretrain_total_s")),
                "end_to_end_s": _mean([s for s in map(_end_to_end_seconds, ts) if s is not None]),
                "eval_s": _mean(_values(ts, "eval_s")),
                "device_unit": unit,
                "device_hours": hours,
                "end_to_end_device_hours": e2e_hours if e2e_unit == unit else None,
                "surrogate_cost": "/".join(sorted({t["surrogate_cost"] for t in ts if t.get("surrogate_cost")})) or None,
                "reused_stages": "/".join(sorted({s for t in ts for s in t.get("reused_stages") or []})) or None,
                "cache_decoded": "/".join(sorted({str(t["cache_decoded"]).lower() for t in ts
                                                  if t.get("cache_decoded") is not None})) or None,
            })
    for r in rows:  # compare with the dense row of the same group
        group = _group_of(r)
        dense = next((d for d in rows if d["method"] == DENSE and _group_of(d) == group), None)
        cost = None if r["pretrain_s"] is None else r["pretrain_s"] + r["keepset_s"]
        r["saved_frac"] = (1 - cost / dense["pretrain_s"]
                           if dense and dense["pretrain_s"] and cost is not None else None)
        comparable = dense is not None and r["device_unit"] and dense["device_unit"] == r["device_unit"]
        r["device_hours_saved"] = dense["device_hours"] - r["device_hours"] if comparable else None
        r["pretrain_speedup"] = _ratio(dense and (dense["pretrain_total_s"] or dense["pretrain_s"]),
                                       r["pretrain_total_s"] or r["pretrain_s"])
        r["end_to_end_speedup"] = _ratio(dense and dense["end_to_end_s"], r["end_to_end_s"])
    return rows


def _fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if x is None else format(x * scale, spec)


def time_table(rows: list[dict[str, Any]], group: tuple) -> str | None:
    mine = [r for r in rows if _group_of(r) == group]
    if not mine:
        return None
    body = [[r["method"], _pct(r["ratio"]), _fmt(r["images_kept_frac"], ".1f", 100), _fmt(r["pretrain_s"], ".3f", 1 / 3600),
             _fmt(r["keepset_s"], ".1f"), _fmt(r["saved_frac"], ".1f", 100), str(r["n"])] for r in mine]
    return markdown_table(["method", "ratio", "images kept %", "pretrain h (mean)", "keep-set s (every stage)",
                      "time saved vs dense % (incl. keep-set)", "trials"], body)


def _cost_note(r: dict[str, Any]) -> str:
    """How a row's keep-set cost is known: a declared (or undeclared) surrogate cost, reused stages."""
    notes = []
    if r["surrogate_cost"] and r["surrogate_cost"] != "trained":
        notes.append(f"surrogate {r['surrogate_cost'].replace('undeclared', 'undeclared (counted 0)')}")
    if r["reused_stages"]:
        notes.append(f"reused: {r['reused_stages'].replace('/', ', ')} (original cost)")
    return "; ".join(notes) or "—"


def cost_table(rows: list[dict[str, Any]], group: tuple) -> str | None:
    """The paper's Table 2 view: per method and ratio, end-to-end hours (keep-set stages + pretraining)
    and device-hours, and the speed-ups vs dense of pretraining alone and end to end."""
    mine = [r for r in rows if _group_of(r) == group]
    if not mine:
        return None
    units = {r["device_unit"] for r in mine if r["device_unit"]}
    unit = units.pop() if len(units) == 1 else "device-hours"
    body = [[r["method"], _pct(r["ratio"]), _fmt(None if r["images_kept_frac"] is None else 1 - r["images_kept_frac"], ".1f", 100),
             _fmt(r["keepset_s"], ".3f", 1 / 3600), _fmt(r["pretrain_total_s"], ".3f", 1 / 3600),
             _fmt(r["end_to_end_s"], ".3f", 1 / 3600), _fmt(r["end_to_end_device_hours"], ".3f"),
             _fmt(r["pretrain_speedup"], ".2f"), _fmt(r["end_to_end_speedup"], ".2f"), _cost_note(r)] for r in mine]
    return markdown_table(["method", "ratio", "images removed %", "keep-set h", "pretraining h", "end-to-end h",
                      f"end-to-end {unit}", "pretraining speed-up", "end-to-end speed-up", "costs"], body)


def cost_lines(rows: list[dict[str, Any]], group: tuple) -> list[str]:
    """One line per keep-set: pretraining device-hours and what it saves against dense."""
    lines = []
    mine = [r for r in rows if _group_of(r) == group]
    dense = next((r for r in mine if r["method"] == DENSE), None)
    for r in mine:
        if r["method"] == DENSE or r["device_hours"] is None:
            continue
        line = f"- {r['method']} at {_pct(r['ratio'])}: {r['device_hours']:.3f} {r['device_unit']} of pretraining"
        if r["device_hours_saved"] is not None:
            line += f", {r['device_hours_saved']:.3f} saved vs dense ({dense['device_hours']:.3f})"
        else:
            line += " (no dense run on the same kind of device to compare with)"
        lines.append(line + f"; its keep-set took {r['keepset_s']:.1f} s wall-clock on top (every stage)")
    return lines


# ---------------------------------------------------------------- plots

def _new_figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 2)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(6.4 * cols, 4.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg renderer draws off-screen: no display needed
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def _group_title(group: tuple) -> str:
    return " / ".join(f"{k} {v}" for k, v in zip(GROUP_KEYS, group) if v is not None)


def _save_png(fig, path: Path) -> Path:
    with atomic.file_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


X_RATIO = ("ratio", "pruning ratio (% of units removed)")
X_IMAGES = ("images_removed_frac", "images removed (% of source images)")


def _plot_by_method(path: Path, rows: list[dict[str, Any]], y: str, ylabel: str, std: str | None = None,
                    from_zero: bool = False, band: tuple[str, str] | None = None, x: tuple[str, str] = X_RATIO) -> Path:
    return _save_png(_figure_by_method(rows, y, ylabel, std, from_zero, band, x), path)


def _figure_by_method(rows: list[dict[str, Any]], y: str, ylabel: str, std: str | None = None,
                      from_zero: bool = False, band: tuple[str, str] | None = None, x: tuple[str, str] = X_RATIO):
    """One panel per group: ``y`` against ``x`` (key, label; a fraction shown in %), a line per method,
    dense as a horizontal line; ``std`` as error bars and the ``band`` (low, high) fields shaded, where
    the rows have them."""
    groups = list(dict.fromkeys(_group_of(r) for r in rows))
    fig, axes = _new_figure(len(groups))
    for ax, group in zip(axes, groups):
        mine = [r for r in rows if _group_of(r) == group and r[y] is not None]
        for method in sorted({r["method"] for r in mine}, key=_method_rank):
            pts = [r for r in mine if r["method"] == method]
            shaded = band and all(r.get(band[0]) is not None for r in pts)
            if method in REFERENCES:
                colour = "black" if method == DENSE else "grey"
                ax.axhline(pts[0][y], color=colour, linestyle="--" if method == DENSE else ":", label=method)
                if shaded:
                    ax.axhspan(pts[0][band[0]], pts[0][band[1]], color=colour, alpha=0.1)
                continue
            pts = sorted((r for r in pts if r[x[0]] is not None), key=lambda r: r[x[0]])
            xs = [100 * r[x[0]] for r in pts]
            errs = [r[std] or 0.0 for r in pts] if std else None
            line = ax.errorbar(xs, [r[y] for r in pts], yerr=errs, marker="o", capsize=3, label=method)
            if shaded:  # a band along the curve, and a translucent bar at each point (seen even for one ratio)
                lows, highs = [r[band[0]] for r in pts], [r[band[1]] for r in pts]
                ax.fill_between(xs, lows, highs, color=line[0].get_color(), alpha=0.15)
                ax.vlines(xs, lows, highs, color=line[0].get_color(), alpha=0.3, linewidth=6)
        ax.set(title=_group_title(group), xlabel=x[1], ylabel=ylabel)
        if from_zero:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def accuracy_figure(rows: list[dict[str, Any]], metric: str, x: tuple[str, str] = X_RATIO):
    """The accuracy plot of one metric: mean per method against ``x``, ± std bars, its 95% interval shaded."""
    title = next(m.title for m in METRICS if m.name == metric)
    return _figure_by_method([r for r in rows if r["metric"] == metric], "mean_pct",
                             title.split(":")[0] + " top-1 % (bars ± std, shaded 95% interval)",
                             std="std_pct", band=("ci95_low_pct", "ci95_high_pct"), x=x)


def plot_accuracy(path: Path, rows: list[dict[str, Any]], metric: str, times: list[dict[str, Any]] | None = None) -> Path:
    """Accuracy against the pruning ratio (units removed), or with ``times`` (:func:`time_rows`) against
    the fraction of source *images* removed: methods that prune units of different sizes, or images,
    compare at the same data budget there."""
    if times is None:
        return _save_png(accuracy_figure(rows, metric), path)
    return _save_png(accuracy_figure(with_images_removed(rows, times), metric, X_IMAGES), path)


def with_images_removed(rows: list[dict[str, Any]], times: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (accuracy rows) with ``images_removed_frac``: the mean fraction of source images their
    cell's keep-sets removed (from :func:`time_rows`; None where unknown)."""
    kept = {(_group_of(t), t["method"], t["ratio"]): t["images_kept_frac"] for t in times}
    out = []
    for r in rows:
        frac = kept.get((_group_of(r), r["method"], r["ratio"]))
        out.append({**r, X_IMAGES[0]: None if frac is None else 1 - frac})
    return out


def plot_time(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Pretraining + selection time against pruning ratio, in the unit that suits the sweep's scale."""
    cost = [{**r, "cost_s": None if r["pretrain_s"] is None else r["pretrain_s"] + r["keepset_s"]} for r in rows]
    longest = max((r["cost_s"] for r in cost if r["cost_s"] is not None), default=0.0)
    unit, scale = next((u, k) for u, k, limit in (("seconds", 1, 120), ("minutes", 60, 7200), ("hours", 3600, math.inf))
                       if longest < limit)
    scaled = [{**r, "cost": None if r["cost_s"] is None else r["cost_s"] / scale} for r in cost]
    return _plot_by_method(path, scaled, "cost", f"pretraining + keep-set {unit} (mean)", from_zero=True)


# ---------------------------------------------------------------- files

def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(GROUP_KEYS), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                     for r in rows)
    return buf.getvalue()


COST_NOTE = ("A keep-set's cost is every stage that produced it: surrogate training (or the cost declared for a given "
             "checkpoint), extraction of the source and of the task, k-means, EL2N/GraNd models and scoring, selection; a "
             "stage reused from an earlier run counts its original cost. Pretraining is the whole run (Train start-up, "
             "decode cache, epochs, checkpoints). Device-hours: the pretraining run's devices (GPUs = workers x GPUs per "
             "worker, or CPU workers) x the end-to-end seconds. Speed-ups: dense's time / the row's.")


def report_markdown(trials: list[dict[str, Any]], acc: list[dict[str, Any]], times: list[dict[str, Any]],
                    source: str = "", diagnostics: str | None = None) -> str:
    """The whole report as Markdown: a section of tables per group, the ``diagnostics`` section
    (:mod:`dp4tl_ray.report_diagnostics`), then the failed trials."""
    failed = error_trials(trials)
    parts = [f"# DP4TL sweep report{f': {source}' if source else ''}",
             f"{len(trials) - len(failed)} trial(s) ok, {len(failed)} failed (excluded from the tables). "
             "Cells: mean ± sample std (n-1) over seeds; a bare number is a single seed. "
             "Pruning ratio: fraction of units (classes or clusters) removed.", READING]
    for group, members in group_trials(trials).items():
        parts.append(f"## {_group_title(group)}")
        mode = _group_fields(group)["mode"]
        note = pairing_note((t["method"], mode) for t in members)
        if note:
            parts.append(note)
        for m in METRICS:
            table = accuracy_table(acc, group, m.name)
            if table:
                parts += [f"### {m.title}", table]
                verdicts = comparisons(acc, group, m.name) if m.name in PLOTTED else []
                if verdicts:
                    parts.append("What this table supports (95% intervals):\n" + "\n".join(verdicts))
                failed_runs = below_floor(members, acc, group, m) if m.name in PLOTTED else []
                if failed_runs:
                    parts.append(f"{BELOW_FLOOR}:\n" + "\n".join(failed_runs))
        table = time_table(times, group)
        if table:
            costs = cost_lines(times, group)
            parts += ["### Pretraining time", table] + (["\n".join(costs)] if costs else [])
            parts += ["### Costs end to end (the paper's Table 2)", COST_NOTE, cost_table(times, group)]
    if diagnostics:
        parts.append(diagnostics)
    if failed:
        parts.append("## Failed trials")
        parts.append("\n".join(f"- {t['trial_id']}: {t['error'] or 'no message'}" for t in failed))
    return "\n\n".join(parts) + "\n"


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write report.md, accuracy.csv, time.csv and the PNGs (under ``<sweep_dir>/report`` by default);
    report.md's selection diagnostics come from the manifests of the keep-sets the trials name."""
    from dp4tl_ray.report_diagnostics import diagnostics_rows, diagnostics_section

    sweep_dir = str(sweep_dir)
    if out_dir is None:
        if is_uri(sweep_dir):
            raise UserError(f"{sweep_dir} is remote: give --out DIR, a local folder for the report")
        out_dir = Path(sweep_dir) / "report"
    elif is_uri(str(out_dir)):
        raise UserError(f"--out {out_dir}: the report is written to a local folder, not a URI")
    out = Path(out_dir)
    trials = load_results(sweep_dir)
    if not ok_trials(trials):
        raise UserError(f"all {len(trials)} trial(s) in {sweep_dir}/{RESULTS_FILE} failed: "
                        f"first error: {trials[0]['error'] or 'no message'}")
    acc, times = accuracy_rows(trials), time_rows(trials)
    paths = {
        "report.md": atomic.write_bytes(out / "report.md", report_markdown(
            trials, acc, times, sweep_dir, diagnostics_section(*diagnostics_rows(trials))).encode()),
        "accuracy.csv": atomic.write_bytes(out / "accuracy.csv", _csv_text(acc).encode()),
        "time.csv": atomic.write_bytes(out / "time.csv", _csv_text(times).encode()),
    }
    for metric in PLOTTED:
        if any(r["metric"] == metric for r in acc):
            paths[f"accuracy_{metric}.png"] = plot_accuracy(out / f"accuracy_{metric}.png", acc, metric)
            paths[f"accuracy_{metric}_images.png"] = plot_accuracy(out / f"accuracy_{metric}_images.png", acc, metric, times)
    paths["time.png"] = plot_time(out / "time.png", times)
    return paths


__all__ = [
    "READING", "accuracy_rows", "comparisons", "interval95", "time_rows", "accuracy_table", "time_table", "cost_table",
    "cost_lines", "accuracy_figure", "plot_accuracy", "plot_time", "report_markdown", "with_images_removed",
    "write_report",
]
