"""``dp4tl explain``: a keep-set's artifacts in, ``index.html`` + ``summary.png`` out (written atomically)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from dp4tl_ray import atomic
from dp4tl_ray.explain.evidence import Evidence, load_evidence
from dp4tl_ray.explain.page import TaskDiagnostics, Thumb, UnitDetail, render_page
from dp4tl_ray.explain.summary import summary_png
from dp4tl_ray.explain.thumbnails import thumbnails

PAGE, SUMMARY = "index.html", "summary.png"


def ranks_in_detail(num_units: int, units_kept: int, top: int, around_cut: int) -> list[int]:
    """Ranks whose rows show thumbnails: the ``top`` most voted and ``around_cut`` on each side of the cut."""
    near_cut = range(max(units_kept - around_cut, 0), min(units_kept + around_cut, num_units))
    return sorted(set(range(min(top, num_units))) | set(near_cut))


def selection_diagnostics(ev: Evidence) -> list[TaskDiagnostics]:
    """Per task, the mapping diagnostics the keep-set recorded (:mod:`dp4tl_ray.select.diagnostics`), with
    names for its units and classes, and how much of the task's votes the kept units hold."""
    kept = set(ev.ranking[: ev.units_kept].tolist())
    out = []
    for t in ev.tasks:
        d = ev.keepset.meta.extra.get("diagnostics", {}).get(t.name)
        if d is None:
            continue
        classes = t.store.manifest["classes"]
        figures = [
            ("top unit's vote share", f"{d['top_unit_share']:.1%}", f"{ev.unit_names[d['top_unit']]}; near 100% means "
             "one unit draws every vote: the mapping does not tell the downstream classes apart"),
            ("vote entropy", f"{d['vote_entropy'] + 0.0:.3f}", "normalised to [0, 1]: 0 = every vote on one unit, "
             "1 = spread as evenly as the images allow"),
            ("effective units", f"{d['effective_units']:.1f}", "how many equally voted units the votes are worth"),
            ("mean class agreement", f"{d['mean_class_agreement']:.1%}",
             "per downstream class, the share of its votes on its majority unit, averaged"),
            ("classes sharing one majority unit", f"{len(d['shared_majority_classes'])} of {d['classes']}",
             f"the largest group, on {ev.unit_names[d['shared_majority_unit']]}"),
            ("votes on kept units", f"{t.votes[sorted(kept)].sum() / t.votes.sum():.1%}",
             f"share of the votes of its {len(t.ids)} images that the kept units received"),
        ]
        rows = [(classes[c["label"]], c["images"], ev.unit_names[c["modal_unit"]], c["agreement"], c["modal_unit"] in kept)
                for c in d["per_class"]]
        out.append(TaskDiagnostics(t.name, figures, list(d["warnings"]), rows))
    return out


def _captioned(ids: np.ndarray, all_ids: np.ndarray, labels: np.ndarray, classes: list[str],
               uris: dict[int, str], prefix: str) -> list[Thumb]:
    """Thumbnails of ``ids`` captioned with id and class (``all_ids`` sorted, ``labels`` aligned with it)."""
    cls = labels[np.searchsorted(all_ids, ids)]
    return [Thumb(uris.get(int(i)), f"{prefix}id {int(i)} · {classes[c]}") for i, c in zip(ids, cls)]


def unit_details(ev: Evidence, ranks: list[int], members: int, voters: int) -> dict[int, UnitDetail]:
    """For each rank in ``ranks``: thumbnails of ``members`` source images and ``voters`` voters per task."""
    units = {r: int(ev.ranking[r]) for r in ranks}
    member_ids = {r: ev.members_of(u, members) for r, u in units.items()}
    voter_ids = {(r, t.name): t.voters_of(u) for r, u in units.items() for t in ev.tasks}
    src_uris = thumbnails(ev.source, [i for ids in member_ids.values() for i in ids.tolist()])
    task_uris = {t.name: thumbnails(t.store, [i for r in ranks for i in voter_ids[r, t.name][:voters].tolist()])
                 for t in ev.tasks}
    src_classes = ev.source.manifest["classes"]
    return {
        r: UnitDetail(
            _captioned(member_ids[r], ev.source_ids, ev.source_labels, src_classes, src_uris, ""),
            {t.name: (len(voter_ids[r, t.name]),
                      _captioned(voter_ids[r, t.name][:voters], t.ids, t.labels, t.store.manifest["classes"],
                                 task_uris[t.name], f"{t.name} "))
             for t in ev.tasks})
        for r in ranks
    }


def explain_keepset(path: str | Path, out: str | Path | None = None, *, top_units: int = 12, around_cut: int = 6,
                    members: int = 5, voters: int = 5) -> Path:
    """Write ``out/index.html`` (self-contained) and ``out/summary.png`` for the keep-set at ``path``
    (default ``path/explain``); returns ``out``. Reads only the keep-set, its FeatureStores and their images."""
    path = Path(path)
    out = Path(out) if out is not None else path / "explain"
    ev = load_evidence(path)
    details = unit_details(ev, ranks_in_detail(ev.num_units, ev.units_kept, top_units, around_cut), members, voters)
    png = summary_png(ev)
    page = render_page(ev, details, "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                       selection_diagnostics(ev))
    with atomic.directory(out) as tmp:
        (tmp / SUMMARY).write_bytes(png)
        (tmp / PAGE).write_text(page, encoding="utf-8")
    return out


__all__ = ["PAGE", "SUMMARY", "explain_keepset", "ranks_in_detail", "selection_diagnostics", "unit_details"]
