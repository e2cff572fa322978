"""What the sweep prints while Tune runs: the status table's columns and a line per epoch and per trial."""

from __future__ import annotations

from ray.tune.experiment import Trial
from ray.tune.progress_reporter import _trial_progress_table

from dp4tl_ray.sweep import TrialSpec
from dp4tl_ray.sweep_progress import TrialLines, status_table

SPEC = TrialSpec("lm", 0.5, "resnet18", "supervised", "uci_digits", 0, "resnet18", "/w/keepsets/lm", 1.0, 3, 6, 24, 48)


def _trial(spec: TrialSpec, **last_result) -> Trial:
    """A Tune trial as the driver holds it (a stub: no trainable registered), with its last result."""
    trial = Trial("__fake", config={"trial": spec.to_param()}, stub=True, trial_id=spec.method)
    trial.run_metadata.last_result = dict(last_result)
    return trial


def test_status_table_names_each_field_of_the_trial_not_the_spec_dict():
    reporter = status_table()
    trial = _trial(SPEC, epoch=3, loss=0.4321, images_per_s=512.25)
    table = "\n".join(_trial_progress_table([trial], reporter._metric_columns, reporter._parameter_columns,
                                            max_column_length=reporter._max_column_length))
    header = next(line for line in table.splitlines() if "method" in line)
    for column in ("method", "ratio", "mode", "task", "seed", "epoch", "loss", "images/s"):
        assert f" {column} " in header, (column, header)
    row = next(line for line in table.splitlines() if "uci_digits" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert ["lm", "0.5", "supervised", "uci_digits", "0", "3", "0.4321", "512.25"] == cells[-8:]
    assert "{" not in table and "trial" not in header  # no spec dict, no `trial` column


def test_a_line_per_epoch_with_eta_then_one_when_the_trial_ends(capsys):
    lines = TrialLines({"supervised": 4}, n_trials=3)
    trial = _trial(SPEC)
    before = _trial(SPEC)  # finished before a resume: counts as ended
    before.trial_id, before.status = "earlier", Trial.TERMINATED
    lines.on_trial_start(0, [trial], trial)
    lines.on_trial_result(0, [trial], trial, {"epoch": 1, "loss": 2.5, "images_per_s": 100.0})
    lines.on_trial_result(0, [trial], trial, {"epoch": 1, "loss": 2.5, "lp_acc": 0.5})  # the final record: no epoch line
    trial.run_metadata.last_result = {"lp_acc": 0.6125, "time_total_s": 75.0}
    lines.on_trial_complete(0, [before, trial], trial)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("[trial lm r0.5 supervised uci_digits s0] 1/4 epochs (25%) | ETA ")
    assert out[0].endswith("| loss 2.5 | images/s 100")
    assert out[1] == "[trial] 2/3 done: lm r0.5 supervised uci_digits s0 | lp acc 0.6125 | time 1m15s"


def test_a_reference_trial_is_named_without_ratio_or_mode(capsys):
    spec = TrialSpec("random-init", 0.0, None, None, "uci_digits", 1, "resnet18", None, 0.0, 0, None, 0, None)
    lines = TrialLines({"supervised": 4}, n_trials=1)
    trial = _trial(spec, lp_acc=0.1, time_total_s=3.0)
    lines.on_trial_start(0, [trial], trial)
    lines.on_trial_complete(0, [trial], trial)
    assert capsys.readouterr().out == "[trial] 1/1 done: random-init uci_digits s1 | lp acc 0.1 | time 3s\n"
