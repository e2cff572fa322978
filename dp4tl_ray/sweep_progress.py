"""What a sweep prints while Tune runs: readable status-table columns and one line per step of a trial.

Tune's default output engine infers its table columns from the param space, where a trial is one
spec dict (``config["trial"]``), so its only column is that dict cut to 20 characters. The engine
takes no column settings; the classic ``CLIReporter`` does (``RAY_AIR_NEW_OUTPUT=0`` selects it), so
the table names each field of the spec. The per-epoch and per-trial lines come from a Tune callback,
which runs on the driver: trial actors' own output stays off the console unless ``--verbose``.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from dp4tl_ray.progress import Progress, format_duration, say
from dp4tl_ray.train.epoch_progress import epoch_fields

# config["trial"] fields (TrialSpec.to_param) -> column header
PARAMETER_COLUMNS = {f"trial/{k}": k for k in ("method", "ratio", "mode", "task", "seed")}
METRIC_COLUMNS = {"epoch": "epoch", "loss": "loss", "images_per_s": "images/s", "lp_acc": "lp acc", "ff_acc": "ff acc"}
EVAL_KEYS = ("lp_acc", "ff_acc")  # a result with these is a trial's final record, not an epoch
ENDED = ("TERMINATED", "ERROR")  # Tune's states of a trial that will not run again
TABLE_EVERY_S = 60  # the status table at most once a minute: the lines below say what happens in between


def use_classic_output() -> None:
    """Select Tune's classic output engine, the one that takes a progress reporter (read when the Tuner is made)."""
    import os

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def status_table() -> tune.CLIReporter:
    """Tune's status table with a column per trial field (method, ratio, mode, task, seed) and per metric."""
    return tune.CLIReporter(parameter_columns=PARAMETER_COLUMNS, metric_columns=METRIC_COLUMNS,
                            max_report_frequency=TABLE_EVERY_S)


def trial_label(spec: dict[str, Any]) -> str:
    """``lm r0.5 supervised uci_digits s0``: a trial as a person names it."""
    ratio = f"r{spec['ratio']:g}" if spec.get("ratio") else None
    return " ".join(str(x) for x in (spec["method"], ratio, spec.get("mode"), spec["task"], f"s{spec['seed']}") if x)


class TrialLines(tune.Callback):
    """A line per pretraining epoch of every trial (with its ETA) and per trial that ends (accuracy, time)."""

    def __init__(self, epochs_by_mode: dict[str, int], n_trials: int):
        self.epochs_by_mode, self.n_trials = epochs_by_mode, n_trials
        self.shown: dict[str, Progress] = {}

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        spec = trial.config["trial"]
        self.shown[trial.trial_id] = Progress(f"trial {trial_label(spec)}", total=self.epochs_by_mode.get(spec.get("mode")),
                                              unit="epochs")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        shown = self.shown.get(trial.trial_id)
        if shown is not None and "epoch" in result and not any(k in result for k in EVAL_KEYS):
            shown.update(int(result["epoch"]), **epoch_fields(result))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trials, trial, "done", **{k: trial.last_result.get(k) for k in EVAL_KEYS})

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended(trials, trial, "FAILED", error=trial.error_file or "see the trial's error.txt")

    def _ended(self, trials: list, trial, status: str, **fields: Any) -> None:
        # counted from the trials' states, so a resumed sweep counts the trials finished before it too
        ended = len({t.trial_id for t in trials if t.status in ENDED} | {trial.trial_id})
        self.shown.pop(trial.trial_id, None)
        took = trial.last_result.get("time_total_s")
        say("trial", f"{ended}/{self.n_trials} {status}: {trial_label(trial.config['trial'])}", **fields,
            time=format_duration(took) if took is not None else None)


__all__ = ["METRIC_COLUMNS", "PARAMETER_COLUMNS", "TrialLines", "status_table", "trial_label", "use_classic_output"]
