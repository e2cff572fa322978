"""The sweep report's *Selection diagnostics*: how trustworthy each keep-set's downstream -> unit mapping
looked (:mod:`dp4tl_ray.select.diagnostics`), read from the manifests of the keep-sets the trials name.

The figures depend on the votes only, not on the ratio (nor, for LM, the seed), so the keep-sets of
one surrogate, method and task with the same figures share a row. A keep-set that cannot be read is
a one-line note in the section; the rest of the report stands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from dp4tl_ray.artifact_io import require_keys
from dp4tl_ray.errors import UserError
from dp4tl_ray.markdown import markdown_table
from dp4tl_ray.results import REFERENCES
from dp4tl_ray.select.diagnostics import thresholds_text
from dp4tl_ray.select.keepset import META_FILE, KeepSetMeta
from dp4tl_ray.select.pipeline import UNIT_METHODS

# what a row reads from one task's recorded diagnostics (MappingDiagnostics.to_dict())
DIAGNOSTIC_KEYS = ("classes", "top_unit", "top_unit_share", "vote_entropy", "mean_class_agreement",
                   "shared_majority_classes", "warnings")
RESELECT = "re-run the same `dp4tl sweep` command (its keep-sets are selected again)"
INTRO = ("How trustworthy each keep-set's downstream -> unit mapping looked (LM and FM; `extra.diagnostics` in its "
         "keepset.json): the top unit's share of all votes, the vote entropy (normalised: 1 = spread over as many "
         "units as possible), the mean over downstream classes of the share of their votes on their own most voted "
         "unit (agreement), and how many downstream classes send most of their votes to the same unit.")


def _keepsets(trials: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One ok trial of a pruned method per keep-set directory the trials name."""
    return {str(t["keepset"]): t for t in trials
            if t["status"] == "ok" and t.get("keepset") and t["method"] not in REFERENCES}


def _unit_name(meta: KeepSetMeta, unit: int) -> str:
    """``unit (name)`` where the keep-set's most voted units name it."""
    names = {u.get("unit"): u.get("name") for u in meta.extra.get("top_units", []) if isinstance(u, dict)}
    return f"{unit} ({names[unit]})" if names.get(unit) else str(unit)


def _task_rows(path: str, surrogate: str | None) -> list[dict[str, Any]]:
    """One row per task whose diagnostics the keep-set at ``path`` recorded (none for a baseline)."""
    meta = KeepSetMeta.load(path)
    recorded = meta.extra.get("diagnostics")
    if recorded is None:
        if meta.method in UNIT_METHODS:
            raise UserError(f"keep-set {path} has no diagnostics (selected by an older version); {RESELECT}")
        return []
    where, fix = Path(path) / META_FILE, f"delete {path} and {RESELECT}"
    rows = []
    for task, d in require_keys(recorded, (), where, fix).items():
        d = require_keys(d, DIAGNOSTIC_KEYS, where, fix)
        try:
            rows.append({"surrogate": surrogate, "method": meta.method, "task": task, "ratio": float(meta.ratio),
                         "seed": int(meta.seed), "top_unit": _unit_name(meta, int(d["top_unit"])),
                         "top_unit_share": float(d["top_unit_share"]), "vote_entropy": float(d["vote_entropy"]),
                         "mean_class_agreement": float(d["mean_class_agreement"]),
                         "shared_majority_classes": len(d["shared_majority_classes"]), "classes": int(d["classes"]),
                         "warnings": [str(w) for w in d["warnings"]]})
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: diagnostics of task {task} are malformed ({e}); {fix}") from None
    return rows


def _method_rank(method: str) -> int:
    return UNIT_METHODS.index(method) if method in UNIT_METHODS else len(UNIT_METHODS)


def diagnostics_rows(trials: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (surrogate, method, task, the ratios and seeds of the keep-sets with these figures, the figures,
    the warnings) from the keep-sets the ok trials name, and one-line notes on those that could not be read."""
    trials = list(trials)
    keepsets = _keepsets(trials)
    merged: dict[tuple, dict[str, Any]] = {}
    notes, missing = [], []
    for path, trial in sorted(keepsets.items()):
        if not (Path(path) / META_FILE).is_file():
            missing.append(path)
            continue
        try:
            rows = _task_rows(path, trial.get("surrogate"))
        except UserError as e:
            notes.append(f"- {str(e).splitlines()[0]}")
            continue
        for r in rows:
            same = tuple(v if k != "warnings" else tuple(v) for k, v in r.items() if k not in ("ratio", "seed"))
            row = merged.setdefault(same, {**r, "ratios": set(), "seeds": set()})
            row["ratios"].add(r["ratio"])
            row["seeds"].add(r["seed"])
    if missing:
        notes.append(f"- {len(missing)} keep-set(s) the results name are not on this machine (first: {missing[0]}); "
                     "make the report where the sweep's work_dir is")
    if not keepsets and any(t["status"] == "ok" and t["method"] in UNIT_METHODS for t in trials):
        notes.append(f"- the results name no keep-sets (written by an older version); {RESELECT} to write them again")
    rows = [{k: v for k, v in r.items() if k not in ("ratio", "seed")} | {"ratios": sorted(r["ratios"]),
                                                                          "seeds": sorted(r["seeds"])}
            for r in merged.values()]
    rows.sort(key=lambda r: (str(r["surrogate"]), r["task"], _method_rank(r["method"]), r["seeds"]))
    return rows, notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def diagnostics_section(rows: list[dict[str, Any]], notes: list[str]) -> str | None:
    """The report's *Selection diagnostics* section: a row per surrogate, method, task and figures, the warning
    where the documented thresholds flag the mapping; None when no keep-set recorded any and nothing is noted."""
    if not rows and not notes:
        return None
    parts = ["## Selection diagnostics", INTRO + " " + thresholds_text()]
    if rows:
        body = [[_cell(str(r["surrogate"] or "—")), r["method"], _cell(r["task"]),
                 f"{', '.join(f'{100 * q:g}%' for q in r['ratios'])} "
                 f"(seed{'s' if len(r['seeds']) > 1 else ''} {', '.join(map(str, r['seeds']))})",
                 _cell(r["top_unit"]), f"{r['top_unit_share']:.0%}", f"{r['vote_entropy']:.2f}",
                 f"{r['mean_class_agreement']:.0%}", f"{r['shared_majority_classes']}/{r['classes']}",
                 _cell(" ".join(f"WARNING {w}" for w in r["warnings"])) if r["warnings"] else "—"] for r in rows]
        parts.append(markdown_table(["surrogate", "method", "task", "keep-sets: ratios (seeds)", "top unit",
                                     "top unit's share of votes", "vote entropy", "mean class agreement",
                                     "classes sharing one majority unit", "warning"], body))
    if notes:
        parts.append("\n".join(notes))
    return "\n\n".join(parts)


__all__ = ["INTRO", "diagnostics_rows", "diagnostics_section"]
