"""`dp4tl report`: tables, time savings and plots from a sweep's results.jsonl (no Ray)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from dp4tl_ray.cli import run
from dp4tl_ray.errors import UserError
from dp4tl_ray.report import (
    READING,
    accuracy_figure,
    accuracy_rows,
    accuracy_table,
    comparisons,
    cost_table,
    interval95,
    report_markdown,
    time_rows,
    with_images_removed,
    write_report,
)
from dp4tl_ray.report_diagnostics import diagnostics_rows
from dp4tl_ray.results import load_results, parse_results
from dp4tl_ray.select.diagnostics import mapping_diagnostics
from dp4tl_ray.select.keepset import KeepSet, KeepSetMeta

GROUP = ("supervised", "resnet18", "resnet18", "task_0")


def _trial(method, ratio, seed, lp, ff=None, pretrain_s=3600.0, select_s=0.0, **kw):
    t = {"trial_id": f"{method}_{ratio}_{seed}", "status": "ok", "error": None, "method": method, "ratio": ratio,
         "surrogate": "resnet18", "mode": "supervised", "arch": "resnet18", "task": "task_0", "seed": seed,
         "lp_acc": lp, "ff_acc": ff, "lp_acc_test_max": None if lp is None else lp + 0.01, "ff_acc_test_max": None,
         "kept_units": 10, "total_units": 10, "kept_images": 1000, "total_images": 1000,
         "select_s": select_s, "pretrain_s": pretrain_s, "pretrain_total_s": pretrain_s + 360.0,
         "eval_s": 30.0, "workers": 2, "gpus_per_worker": 1, "use_gpu": True}
    t.update(kw)
    return t


def _sweep(tmp_path, with_ff=True):
    """Dense and LM at two ratios, two seeds each, plus one failed trial and one line cut short."""
    ff = (lambda v: v) if with_ff else (lambda v: None)
    trials = [
        _trial("dense", 0.0, 0, 0.70, ff(0.80), pretrain_s=3600.0, select_s=None, surrogate=None),
        _trial("dense", 0.0, 1, 0.72, ff(0.82), pretrain_s=3600.0, select_s=None, surrogate=None),
        _trial("lm", 0.5, 0, 0.71, ff(0.79), pretrain_s=1800.0, select_s=36.0, kept_images=480, kept_units=5),
        _trial("lm", 0.5, 1, 0.74, ff(0.81), pretrain_s=1800.0, select_s=36.0, kept_images=520, kept_units=5),
        _trial("lm", 0.8, 0, 0.66, ff(0.75), pretrain_s=720.0, select_s=36.0, kept_images=200, kept_units=2),
        _trial("lm", 0.8, 1, 0.68, ff(0.77), pretrain_s=720.0, select_s=36.0, kept_images=200, kept_units=2),
        _trial("fm", 0.5, 0, 0.69, ff(0.78), pretrain_s=1800.0, select_s=72.0),
        {"trial_id": "fm_0.8_0", "status": "error", "error": "RayTaskError: CUDA out of memory", "method": "fm"},
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(t) for t in trials] + ['{"trial_id": "lm_0.9_0", "status": "o']  # killed mid-write
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _row(rows, method, ratio, **match):
    return next(r for r in rows if r["method"] == method and r["ratio"] == ratio
                and all(r[k] == v for k, v in match.items()))


def test_cells_are_mean_and_sample_std_over_seeds_in_percent(tmp_path):
    acc = accuracy_rows(load_results(_sweep(tmp_path)))
    lm = _row(acc, "lm", 0.5, metric="lp")
    assert lm["mean_pct"] == pytest.approx(72.5) and lm["std_pct"] == pytest.approx(2.1213, abs=1e-4)
    assert lm["n"] == 2
    assert _row(acc, "fm", 0.5, metric="lp")["std_pct"] is None  # one seed: no spread to report
    table = accuracy_table(acc, GROUP, "lp")
    lines = table.splitlines()
    assert lines[0] == "| method \\ pruning ratio | 50% | 80% | seeds |"
    # dense first (dense trials had no surrogate); two seeds: a t interval (df 1) after mean ± std
    assert lines[2] == "| dense | 71.00 ± 1.41 [58.3, 83.7] | 71.00 ± 1.41 [58.3, 83.7] | 2 |"
    assert lines[3] == "| lm | 72.50 ± 2.12 [53.4, 91.6] | 67.00 ± 1.41 [54.3, 79.7] | 2 |"
    assert lines[4] == "| fm | 69.00 | — | 1 |"  # one seed and no test-image count recorded: no interval
    assert "80.00 ± 1.41 [67.3, 92.7]" in accuracy_table(acc, GROUP, "ff")


def test_time_saved_counts_selection_against_dense_pretraining(tmp_path):
    times = time_rows(load_results(_sweep(tmp_path)))
    assert [r["method"] for r in times] == ["dense", "lm", "lm", "fm"]
    assert _row(times, "dense", 0.0)["saved_frac"] == pytest.approx(0.0)
    assert _row(times, "lm", 0.5)["saved_frac"] == pytest.approx(1 - (1800 + 36) / 3600)
    assert _row(times, "lm", 0.8)["saved_frac"] == pytest.approx(1 - (720 + 36) / 3600)
    assert _row(times, "lm", 0.5)["images_kept_frac"] == pytest.approx(0.5)
    # 2 workers x 1 GPU: dense 2 x 3960 s = 2.2 GPU-h, LM 50% 2 x 2160 s = 1.2 GPU-h
    lm = _row(times, "lm", 0.5)
    assert lm["device_unit"] == "GPU-hours" and lm["device_hours_saved"] == pytest.approx(1.0)


def _costed(method, ratio, seed, pretrain_s, **kw):
    """A trial with every stage of its keep-set recorded (seconds), on 2 workers x 1 GPU."""
    stages = {"surrogate_s": 300.0, "surrogate_cost": "trained", "extract_source_s": 120.0, "extract_task_s": 10.0,
              "kmeans_s": 0.0, "scores_s": 0.0, "select_s": 5.0, "reused_stages": []}
    if method == "dense":
        stages = {k: None for k in stages}
    return _trial(method, ratio, seed, 0.7, pretrain_s=pretrain_s, **{**stages, **kw})


def test_table2_counts_every_stage_of_a_keepset_end_to_end():
    """End to end = surrogate + extractions + k-means/scores + selection + the whole pretraining run;
    scores count in every keep-set that uses them (reused ones marked); a declared surrogate cost shows as such."""
    trials = parse_results("\n".join(json.dumps(t) for t in [
        _costed("dense", 0.0, 0, 3240.0, surrogate=None),  # pretrain_total_s 3600
        _costed("lm", 0.8, 0, 720.0),  # 435 s keep-set + 1080 s pretraining
        _costed("el2n", 0.8, 0, 720.0, scores_s=600.0),
        _costed("el2n", 0.8, 1, 720.0, scores_s=600.0, reused_stages=["scores", "surrogate"]),
        _costed("fm", 0.8, 0, 720.0, surrogate_s=7200.0, surrogate_cost="declared", kmeans_s=65.0),
    ]))
    times = time_rows(trials)
    lm, el2n, fm, dense = (_row(times, m, q) for m, q in (("lm", 0.8), ("el2n", 0.8), ("fm", 0.8), ("dense", 0.0)))
    assert dense["keepset_s"] == 0 and dense["end_to_end_s"] == pytest.approx(3600)
    assert lm["keepset_s"] == pytest.approx(435) and lm["end_to_end_s"] == pytest.approx(1515)
    assert lm["pretrain_speedup"] == pytest.approx(3600 / 1080) and lm["end_to_end_speedup"] == pytest.approx(3600 / 1515)
    assert lm["end_to_end_device_hours"] == pytest.approx(2 * 1515 / 3600) and lm["device_unit"] == "GPU-hours"
    assert el2n["keepset_s"] == pytest.approx(1035) and el2n["n"] == 2  # both seeds pay the scores
    assert fm["keepset_s"] == pytest.approx(7200 + 130 + 65 + 5) and fm["surrogate_cost"] == "declared"
    assert lm["saved_frac"] == pytest.approx(1 - (720 + 435) / 3240)  # saved vs dense epochs, keep-set included
    table = cost_table(times, GROUP).splitlines()
    assert "end-to-end GPU-hours" in table[0] and "end-to-end speed-up" in table[0]
    assert table[3].startswith("| lm | 80% | 0.0 | 0.121 | 0.300 | 0.421 | 0.842 | 3.33 | 2.38 |")
    el2n_line = next(line for line in table if line.startswith("| el2n"))
    assert "reused: scores, surrogate (original cost)" in el2n_line
    assert "surrogate declared" in next(line for line in table if line.startswith("| fm"))
    assert "the paper's Table 2" in report_markdown(trials, accuracy_rows(trials), times)


def test_accuracy_is_also_placed_at_the_fraction_of_images_removed(tmp_path):
    trials = load_results(_sweep(tmp_path))
    acc = [r for r in accuracy_rows(trials) if r["metric"] == "lp"]
    placed = with_images_removed(acc, time_rows(trials))
    assert _row(placed, "lm", 0.5)["images_removed_frac"] == pytest.approx(0.5)  # 480 and 520 of 1000 kept
    assert _row(placed, "lm", 0.8)["images_removed_frac"] == pytest.approx(0.8)
    assert _row(placed, "fm", 0.5)["images_removed_frac"] == pytest.approx(0.0)  # its units held no images
    assert _row(placed, "dense", 0.0)["images_removed_frac"] == pytest.approx(0.0)


def test_random_init_is_a_reference_row_in_every_group_and_costs_no_pretraining():
    """The untrained-backbone baseline (no surrogate, no mode) joins each mode's table as a constant row."""
    trials = [_trial("dense", 0.0, 0, 0.70, surrogate=None, select_s=0.0),
              _trial("lm", 0.5, 0, 0.72, select_s=10.0),
              _trial("lm", 0.5, 0, 0.60, mode="moco_v2", select_s=10.0, trial_id="lm-moco"),
              _trial("random-init", 0.0, 0, 0.31, surrogate=None, mode=None, pretrain_s=0.0, select_s=0.0,
                     kept_images=0, kept_units=0)]
    trials = parse_results("\n".join(json.dumps(t) for t in trials))
    rows = accuracy_rows(trials)
    for mode in ("supervised", "moco_v2"):
        table = accuracy_table(rows, (mode, "resnet18", "resnet18", "task_0"), "lp")
        assert table.splitlines()[-1].startswith("| random-init | 31.00 |"), table
    assert "random-init" not in {r["method"] for r in time_rows(trials)}


def test_cpu_runs_are_costed_in_worker_hours():
    trials = parse_results("\n".join(json.dumps(_trial(m, q, 0, 0.5, use_gpu=False, gpus_per_worker=0, workers=4,
                                                       pretrain_s=s, select_s=0.0))
                                     for m, q, s in [("dense", 0.0, 3600.0), ("lm", 0.5, 1800.0)]))
    lm = _row(time_rows(trials), "lm", 0.5)
    assert lm["device_unit"] == "CPU worker-hours" and lm["device_hours_saved"] == pytest.approx(4 * 1800 / 3600)


def test_failed_and_unreadable_trials_are_excluded_and_counted(tmp_path):
    trials = load_results(_sweep(tmp_path))
    assert sorted(t["trial_id"] for t in trials if t["status"] == "error") == ["fm_0.8_0", "line 9"]
    acc = accuracy_rows(trials)
    assert not any(r["method"] == "fm" and r["ratio"] == 0.8 for r in acc)
    md = report_markdown(trials, acc, time_rows(trials))
    assert "7 trial(s) ok, 2 failed" in md and "fm_0.8_0: RayTaskError: CUDA out of memory" in md


def test_missing_or_empty_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run the sweep first"):
        load_results(tmp_path)
    (tmp_path / "results.jsonl").write_text("\n")
    with pytest.raises(UserError, match="run the sweep first"):
        load_results(tmp_path)
    with pytest.raises(UserError, match="run the sweep first"):
        load_results(f"file://{tmp_path}/nothing-here")


def test_results_read_through_a_uri(tmp_path):
    sweep = _sweep(tmp_path)
    assert load_results(f"file://{sweep}") == load_results(sweep)


def _assert_real_png(path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with Image.open(path) as im:
        lo, hi = im.convert("L").getextrema()
    assert lo < hi  # something was drawn


def test_write_report_files_and_plots(tmp_path):
    paths = write_report(_sweep(tmp_path / "sweep"), tmp_path / "out")
    assert sorted(paths) == ["accuracy.csv", "accuracy_ff.png", "accuracy_ff_images.png", "accuracy_lp.png",
                             "accuracy_lp_images.png", "report.md", "time.csv", "time.png"]
    assert all(p.parent == tmp_path / "out" for p in paths.values())
    for name in ("accuracy_lp.png", "accuracy_ff.png", "time.png", "accuracy_lp_images.png"):
        _assert_real_png(paths[name])
    rows = list(csv.DictReader(io.StringIO(paths["accuracy.csv"].read_text())))
    assert {r["metric"] for r in rows} == {"lp", "ff", "lp_test_max"}
    assert len([r for r in rows if r["metric"] == "lp"]) == 4  # dense, lm x 2 ratios, fm
    assert not list((tmp_path / "out").glob(".*tmp-*"))
    # no FF in the sweep: no FF table, no FF plot; default output under <sweep>/report
    paths = write_report(_sweep(tmp_path / "lp_only", with_ff=False))
    assert "accuracy_ff.png" not in paths and paths["report.md"].parent == tmp_path / "lp_only" / "report"
    assert "Full finetune" not in paths["report.md"].read_text()


def test_report_command_prints_tables_and_paths(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sweep")
    assert run(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| lm | 72.50 ± 2.12 [53.4, 91.6] | 67.00 ± 1.41 [54.3, 79.7] | 2 |" in out and "time saved vs dense" in out
    assert str(sweep / "report" / "accuracy_lp.png") in out
    assert run(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dp4tl: error:") and "run the sweep first" in err and "\n" not in err


# ----- 95% intervals: in the rows, the table, the plot and what the report says may be concluded


def _one_seed(lm, rc, dense, n):
    """One seed of dense, LM and random-class at 80%, each scored on ``n`` test images."""
    return [_trial("dense", 0.0, 0, dense, surrogate=None, test_images=n),
            _trial("lm", 0.8, 0, lm, test_images=n), _trial("random-class", 0.8, 0, rc, surrogate=None, test_images=n)]


def test_interval_is_t_over_seeds_or_wilson_in_the_test_images():
    assert interval95([70.0, 72.0, 74.0], 100) == pytest.approx((72 - 4.3027 * 2 / 3 ** 0.5, 72 + 4.3027 * 2 / 3 ** 0.5, "t"))
    lo, hi, kind = interval95([50.0], 100)
    assert kind == "wilson" and (lo, hi) == pytest.approx((40.38, 59.62), abs=0.01)
    assert interval95([50.0], None) == (None, None, None)  # a record without its test-image count
    row = _row(accuracy_rows(_one_seed(0.62, 0.48, 0.64, 500)), "lm", 0.8, metric="lp")
    assert (row["ci95"], row["test_images"]) == ("wilson", 500)
    assert (row["ci95_low_pct"], row["ci95_high_pct"]) == pytest.approx((57.67, 66.15), abs=0.01)


def test_report_says_which_differences_exceed_the_intervals():
    # 500 test images: LM 14 points above random-class is beyond the intervals, 2 below dense is not.
    trials = _one_seed(0.62, 0.48, 0.64, 500)
    acc = accuracy_rows(trials)
    assert comparisons(acc, GROUP, "lp") == [
        "- lm at 80% (62.0): +14.0 points vs random-class (above, beyond the intervals); "
        "-2.0 points vs dense (intervals overlap: not told apart)"]
    # The same accuracies on 50 test images are not told apart from random-class.
    assert "vs random-class (intervals overlap: not told apart)" in comparisons(accuracy_rows(_one_seed(0.62, 0.48, 0.64, 50)), GROUP, "lp")[0]
    md = report_markdown(trials, acc, time_rows(trials))
    assert READING in md and "not that they are equal" in md and "this data, model and recipe only" in md
    assert "| lm | 62.00 [57.7, 66.1] |" in md
    assert "What this table supports (95% intervals):\n- lm at 80% (62.0): +14.0 points vs random-class (above" in md


def test_accuracy_plot_shades_each_cells_interval():
    from matplotlib.collections import PolyCollection

    trials = _one_seed(0.62, 0.48, 0.64, 500) + [_trial("lm", 0.5, 0, 0.66, test_images=500)]
    acc = accuracy_rows(trials)
    (ax,) = accuracy_figure(acc, "lp").axes
    assert "95% interval" in ax.get_ylabel()
    lm = [r for r in acc if r["method"] == "lm" and r["metric"] == "lp"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ys = [sorted({round(float(v), 6) for v in b.get_paths()[0].vertices[:, 1]}) for b in bands]
    expected = sorted(round(r[k], 6) for r in lm for k in ("ci95_low_pct", "ci95_high_pct"))
    assert expected in ys  # LM's band spans its cells' intervals, ratio by ratio
    from matplotlib.collections import LineCollection

    bars = [sorted(round(float(y), 6) for seg in c.get_segments() for y in seg[:, 1])
            for c in ax.collections if isinstance(c, LineCollection)]
    assert expected in bars  # and a bar per point, visible where a method has a single ratio
    dense = _row(acc, "dense", 0.0, metric="lp")
    spans = [(p.get_y(), p.get_y() + p.get_height()) for p in ax.patches]  # dense's interval: a horizontal span
    assert (dense["ci95_low_pct"], dense["ci95_high_pct"]) in [pytest.approx(s) for s in spans]


# ----- selection diagnostics: read from the keep-sets the records name


def _planted_keepset(path, task, sink_classes, ratio, seed=0, method="lm"):
    """An LM keep-set whose recorded diagnostics come from planted top-1 votes: 10 downstream classes, class c
    voting mostly for unit 3c; the first ``sink_classes`` of them sending 70% of their votes to unit 39."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    units = np.where(rng.random(labels.size) < 0.8, 3 * labels, rng.integers(0, 40, labels.size))
    units = np.where((labels < sink_classes) & (rng.random(labels.size) < 0.7), 39, units)
    names = [f"class{u}" for u in range(40)]
    diag = mapping_diagnostics(units, labels, 40, unit_names=names)
    top = np.argsort(-np.bincount(units, minlength=40), kind="stable")[:10]
    meta = KeepSetMeta(method=method, ratio=ratio, units_kept=20, units_total=40, votes_per_unit=[], images_kept=50,
                       images_total=100, surrogate={"arch": "resnet18"}, source_fingerprint="f", downstream=[task],
                       seed=seed, extra={"diagnostics": {task: diag.to_dict()},
                                         "top_units": [{"unit": int(u), "name": names[u], "votes": 1.0} for u in top]})
    KeepSet(np.arange(50), meta).write(path)
    return diag


def _diagnosed_sweep(root):
    """LM keep-sets of a sound task_0 and a task_1 with a planted sink (two ratios), a random-class keep-set
    (no diagnostics) and one LM keep-set whose manifest was cut short; their trials name them."""
    sound = _planted_keepset(root / "ks" / "lm-t0", "task_0", 0, 0.5)
    sink = [_planted_keepset(root / "ks" / f"lm-t1-{r}", "task_1", 7, r) for r in (0.5, 0.8)]
    KeepSet(np.arange(5), KeepSetMeta("random-class", 0.5, 5, 10, [], 5, 10, "", "f", [], 0)).write(root / "ks" / "rc")
    _planted_keepset(root / "ks" / "lm-t2", "task_2", 0, 0.5)
    cut = root / "ks" / "lm-t2" / "keepset.json"
    cut.write_text(cut.read_text()[:40])
    trials = [_trial("dense", 0.0, 0, 0.70, select_s=None, surrogate=None),
              _trial("lm", 0.5, 0, 0.71, keepset=str(root / "ks" / "lm-t0")),
              _trial("lm", 0.5, 0, 0.60, task="task_1", keepset=str(root / "ks" / "lm-t1-0.5"), trial_id="t1a"),
              _trial("lm", 0.8, 0, 0.55, task="task_1", keepset=str(root / "ks" / "lm-t1-0.8"), trial_id="t1b"),
              _trial("random-class", 0.5, 0, 0.65, surrogate=None, keepset=str(root / "ks" / "rc")),
              _trial("lm", 0.5, 0, 0.61, task="task_2", keepset=str(root / "ks" / "lm-t2"), trial_id="t2")]
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    return root, sound, sink[0]


def test_report_shows_the_selection_diagnostics_and_warns_on_a_planted_sink(tmp_path):
    sweep, sound, sink = _diagnosed_sweep(tmp_path / "sweep")
    assert not sound.flagged and sink.flagged  # the planted mappings, as the diagnostics judge them
    md = write_report(sweep, tmp_path / "out")["report.md"].read_text()
    section = md.split("## Selection diagnostics", 1)[1]
    rows = {line.split(" | ")[2]: line for line in section.splitlines() if line.startswith("| resnet18 | lm |")}
    assert sorted(rows) == ["task_0", "task_1"]  # the damaged keep-set has no row; random-class records none
    # the sink task: both ratios' keep-sets in one row (the same votes), the figures and the warnings
    assert rows["task_1"].startswith("| resnet18 | lm | task_1 | 50%, 80% (seed 0) | 39 (class39) | "
                                     f"{sink.top_unit_share:.0%} | {sink.vote_entropy:.2f} | "
                                     f"{sink.mean_class_agreement:.0%} | 7/10 | WARNING sink unit: unit 39 (class39)")
    assert "WARNING shared majority: 7 of 10 downstream classes" in rows["task_1"]
    assert rows["task_0"].endswith(f"| {sound.mean_class_agreement:.0%} | 1/10 | — |")  # sound: no warning
    assert "more than 33% of all votes and more than 2x the share of the largest downstream class" in section
    assert "max(3, 20% of the classes)" in section  # the documented thresholds, named
    notes = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(notes) == 1 and str(tmp_path / "sweep" / "ks" / "lm-t2" / "keepset.json") in notes[0]
    assert "unreadable" in notes[0] and f"delete {tmp_path / 'sweep' / 'ks' / 'lm-t2'} and re-run" in notes[0]


def test_keepsets_the_report_cannot_find_are_one_note():
    gone = [_trial("lm", r, 0, 0.7, keepset=f"/nowhere/lm-{r}") for r in (0.5, 0.8)]
    assert diagnostics_rows(gone) == ([], ["- 2 keep-set(s) the results name are not on this machine (first: "
                                           "/nowhere/lm-0.5); make the report where the sweep's work_dir is"])
    rows, notes = diagnostics_rows([_trial("lm", 0.5, 0, 0.7)])  # records that name no keep-set
    assert rows == [] and "the results name no keep-sets" in notes[0]
    assert diagnostics_rows([_trial("dense", 0.0, 0, 0.7, surrogate=None)]) == ([], [])


def test_report_names_the_runs_that_probe_below_the_untrained_backbone():
    # P5 v2's random-class 0.5 seed 2 (a last batch of 2 images every epoch) probed at 29.3%, below the
    # untrained backbone; a run near the floor but inside its interval (fm 0.9 at 34.0) is not named.
    floor = [_trial("random-init", 0.0, s, v, surrogate=None, test_images=300) for s, v in enumerate((0.38, 0.36, 0.347))]
    runs = [_trial("random-class", 0.5, s, v, surrogate=None, test_images=300, loss=l)
            for s, v, l in ((0, 0.577, 1.08), (1, 0.537, 1.07), (2, 0.293, 2.20))]
    runs += [_trial("fm", 0.9, 0, 0.34, test_images=300, loss=1.4)]
    trials = floor + runs
    acc = accuracy_rows(trials)
    md = report_markdown(trials, acc, time_rows(trials))
    assert ("Runs below the untrained backbone (under the low end of random-init's 95% interval): their pretraining "
            "failed (diverged, or too few steps) and says nothing about their keep-sets; check their loss curves:\n"
            "- random-class at 50%, seed 2: 29.3 < 32.1; final pretraining loss 2.20 (its other seeds: 1.08, 1.07)\n") in md
    assert "fm at 90%" not in md.split("Runs below")[1].split("\n\n")[0]
    # Without a random-init cell there is no floor to compare with, and nothing is said.
    assert "Runs below" not in report_markdown(runs, accuracy_rows(runs), time_rows(runs))


def test_report_marks_each_group_whose_methods_are_outside_the_papers_pairing():
    # LM is proposed for supervised pretraining, FM for self-supervised: P5 v2 runs fm supervised (an extension).
    def group(mode):
        return [_trial(m, 0.8, 0, 0.5, mode=mode) for m in ("lm", "lm-reverse", "fm", "fm-classmean", "random-class")]

    md = report_markdown(group("supervised"), accuracy_rows(group("supervised")), time_rows(group("supervised")))
    section = md.split("## ")[1]
    assert ("Outside the paper's pairings: fm under supervised, fm-classmean under supervised. The paper proposes LM "
            "for supervised and FM for self-supervised pretraining; these cells are an extension, not its setting. "
            "FM keeps clusters, not classes: its keep-sets hold parts of source classes") in section
    ssl = group("moco_v2")
    md = report_markdown(ssl, accuracy_rows(ssl), time_rows(ssl))
    assert "Outside the paper's pairings: lm under moco_v2, lm-reverse under moco_v2. " in md
    assert "FM keeps clusters" not in md  # FM under MoCo v2 is the paper's own setting
    # Adversarial pretraining is supervised PGD here: LM's pairing; only the baselines: nothing is said.
    adv = [_trial(m, 0.8, 0, 0.5, mode="adversarial") for m in ("lm", "random-class", "moderate")]
    assert "Outside the paper's pairings" not in report_markdown(adv, accuracy_rows(adv), time_rows(adv))
