"""The results record of a sweep: one JSON line per trial in ``<sweep dir>/results.jsonl``.

The one home of what a record holds (its keys, the reference methods that have no keep-set) and of
writing and reading the file, locally (atomic rename) or through any URI ``pyarrow.fs`` knows.
The sweep writes it; the report and the benchmarks read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import damaged, reading
from dp4tl_ray.atomic import is_uri
from dp4tl_ray.errors import UserError

DENSE = "dense"
RANDOM_INIT = "random-init"  # no pretraining: the downstream evaluation of a seeded untrained backbone (the floor)
REFERENCES = (DENSE, RANDOM_INIT)  # methods without a keep-set or a ratio
RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "error")
# What to do about a damaged results file: the sweep writes it from Tune's saved state at its end.
REWRITE = f"re-run the same `dp4tl sweep` command: finished trials are kept and {RESULTS_FILE} is written again"
# What a keep-set cost, a field per stage that produced it (seconds): the surrogate's training (or the cost
# declared for a given checkpoint, see surrogate_cost), extracting the source and the task with it, FM's
# k-means, EL2N/GraNd's models and scoring, the selection itself. A stage reused from an earlier run
# counts its original cost and is named in ``reused_stages``.
KEEPSET_COST_KEYS = ("surrogate_s", "extract_source_s", "extract_task_s", "kmeans_s", "scores_s", "select_s")
SURROGATE_COSTS = ("trained", "declared", "undeclared")  # surrogate_cost: how surrogate_s is known
RECORD_KEYS = ("trial_id", "status", "error", "method", "ratio", "surrogate", "surrogate_mode", "mode", "arch", "task", "seed",
               "keepset",  # the keep-set directory the trial pretrained on (None: dense, random-init); the report reads it
               "lp_acc", "ff_acc", "lp_acc_test_max", "ff_acc_test_max", "kept_units", "total_units", "kept_images",
               "total_images", *KEEPSET_COST_KEYS, "surrogate_cost", "reused_stages",
               # pretraining: the epochs; the whole pretrain() call (Train start-up, decode cache, epochs,
               # checkpoints, teardown) and its start-up and decode cache parts; the sweep's one data path
               "pretrain_s", "pretrain_total_s", "pretrain_startup_s", "decode_cache_s", "cache_decoded",
               "eval_s", "workers", "gpus_per_worker", "use_gpu", "epoch", "loss",
               "test_images")  # test_images: how many test images the accuracies are over


def keepset_seconds(record: dict[str, Any]) -> float:
    """Seconds of every stage that produced the record's keep-set (0 for dense: it has none)."""
    return float(sum(record.get(k) or 0.0 for k in KEEPSET_COST_KEYS))


def pretrain_seconds(record: dict[str, Any]) -> float | None:
    """Seconds of the record's pretraining: the whole run when recorded, else its epochs."""
    total = record.get("pretrain_total_s")
    return total if total is not None else record.get("pretrain_s")


def write_results(sweep_dir: str, records: list[dict[str, Any]]) -> str:
    """``results.jsonl`` in the sweep directory (local: atomic rename; URI: one pyarrow write)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    target = f"{sweep_dir}/{RESULTS_FILE}"
    if is_uri(sweep_dir):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(target)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
    else:
        atomic.write_bytes(Path(target), text.encode())
    return target


def _read_text(sweep_dir: str) -> str:
    """The results file's text, from a local folder or any URI pyarrow.fs knows (s3://, gs://, file://)."""
    if is_uri(sweep_dir):
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(sweep_dir)
            with fs.open_input_stream(f"{root.rstrip('/')}/{RESULTS_FILE}") as f:
                return f.read().decode()
        except FileNotFoundError:
            raise UserError(f"no {RESULTS_FILE} under {sweep_dir}: run the sweep first (dp4tl sweep)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {sweep_dir}/{RESULTS_FILE}: {str(e).splitlines()[0]}") from None
    path = Path(sweep_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"no {RESULTS_FILE} in {sweep_dir}: run the sweep first (dp4tl sweep)")
    with reading(path, REWRITE):
        return path.read_text()


def normalize_trial(obj: dict[str, Any]) -> dict[str, Any]:
    """A trial with every record key (missing optional keys -> None); bad ones become error trials."""
    t = {k: obj.get(k) for k in RECORD_KEYS}
    if t["method"] in REFERENCES and t["ratio"] is None:
        t["ratio"] = 0.0
    if t["status"] == "ok":
        missing = [k for k in ("method", "ratio") if t[k] is None]
        if missing:
            t.update(status="error", error=f"result lacks {', '.join(missing)}")
    elif t["status"] != "error":
        t.update(status="error", error=t["error"] or f"unknown status {t['status']!r}")
    if t["ratio"] is not None:
        try:
            t["ratio"] = round(float(t["ratio"]), 6)
        except (TypeError, ValueError):
            t.update(status="error", error=f"ratio {t['ratio']!r} is not a number", ratio=None)
    if t["error"] is not None:
        t["error"] = (str(t["error"]).strip().splitlines() or [""])[0]  # one line each in the report
    return t


def _json_object(line: str) -> dict[str, Any] | None:
    """The JSON object on ``line``; None when the line is not one."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_results(text: str) -> list[dict[str, Any]]:
    """Trials from JSON lines. A trial id seen twice (a resumed sweep) keeps its last line;
    an unreadable line (e.g. cut short by a kill) becomes an error trial so it is counted, not lost."""
    by_id: dict[Any, dict[str, Any]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = _json_object(line)
        if obj is None:
            obj = {"trial_id": f"line {i}", "status": "error", "error": "unreadable line (not a JSON object)"}
        t = normalize_trial(obj)
        by_id[t["trial_id"] if t["trial_id"] is not None else f"line {i}"] = t
    return list(by_id.values())


def load_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every trial of a sweep (``status`` "ok" or "error"); tables use the ok ones and count the rest."""
    sweep_dir = str(sweep_dir)
    text = _read_text(sweep_dir)
    trials = parse_results(text)
    if not trials:
        raise UserError(f"{sweep_dir}/{RESULTS_FILE} holds no trials yet: run the sweep first (dp4tl sweep)")
    # One cut or stray line is an error trial, counted in the report; a file with no record at all is not results.
    if not any((obj := _json_object(line)) and obj.get("status") in STATUSES for line in text.splitlines()):
        raise damaged(f"{sweep_dir}/{RESULTS_FILE}", "holds no trial record (JSON lines with a status)", REWRITE)
    return trials


__all__ = ["DENSE", "KEEPSET_COST_KEYS", "RANDOM_INIT", "RECORD_KEYS", "REFERENCES", "RESULTS_FILE", "SURROGATE_COSTS",
           "keepset_seconds", "load_results", "normalize_trial", "parse_results", "pretrain_seconds", "write_results"]
