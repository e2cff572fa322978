"""The explorer's HTML: one self-contained page (inline CSS, images as data URIs), escaped with ``html``."""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from dp4tl_ray.explain.evidence import Evidence
from dp4tl_ray.select.voting import units_to_drop

CURVE_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
code { background: #f3f3f3; padding: 0 .25em; }
table { border-collapse: collapse; } th, td { border-bottom: 1px solid #e2e2e2; padding: 4px 8px; text-align: left;
  vertical-align: top; } th { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.kept td:first-child { border-left: 4px solid #2b7bba; } tr.dropped { color: #777; }
tr.dropped td:first-child { border-left: 4px solid #ccc; } tr.dropped img { opacity: .75; }
tr.cut td { border-top: 3px dashed #d62728; border-bottom: 3px dashed #d62728; color: #d62728; font-weight: 600;
  background: #fff5f5; text-align: center; }
tr.current td { font-weight: 600; background: #fff5f5; }
.thumbs { display: flex; flex-wrap: wrap; gap: 3px; min-width: 340px; max-width: 420px; }
.thumbs img { width: 64px; height: 64px; border-radius: 3px; }
.task { font-size: .85em; color: #555; margin: 2px 0; }
.note { color: #666; font-size: .9em; } h3 { font-size: 1.05em; margin-bottom: .3em; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 6px 10px; margin: 4px 0; }
.ok { color: #2d7d46; margin: 4px 0; } table.classes { margin-top: .4em; } img.summary { max-width: 100%; border: 1px solid #e2e2e2; }
"""


@dataclass(frozen=True)
class Thumb:
    """One thumbnail: a data URI (None if the image did not decode) and its caption."""

    uri: str | None
    caption: str


@dataclass(frozen=True)
class UnitDetail:
    """What a unit's row shows beyond its numbers: some of its source images, and per task the number
    of downstream images that voted for it with some of them."""

    members: list[Thumb]
    voters: dict[str, tuple[int, list[Thumb]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskDiagnostics:
    """One task's mapping diagnostics as shown: ``(name, value, meaning)`` figures, warnings, and per
    downstream class ``(class, images, majority unit, agreement, unit kept)``."""

    task: str
    figures: list[tuple[str, str, str]]
    warnings: list[str]
    classes: list[tuple[str, int, str, float, bool]]


def _thumbs(thumbs: list[Thumb]) -> str:
    return '<div class="thumbs">' + "".join(
        f'<span class="note" title="{escape(t.caption)}">(unreadable)</span>' if t.uri is None else
        f'<img src="{t.uri}" alt="{escape(t.caption)}" title="{escape(t.caption)}">' for t in thumbs) + "</div>"


def _header(ev: Evidence) -> str:
    m = ev.keepset.meta
    surrogate = m.surrogate.get("name", m.surrogate) if isinstance(m.surrogate, dict) else m.surrogate
    removed = 1 - m.images_kept / max(m.images_total, 1)
    return (f"<h1>Keep-set <code>{escape(str(ev.path))}</code></h1>\n"
            f'<p id="summary-line"><b>{escape(m.method.upper())}</b> at ratio <b>{m.ratio:g}</b> for '
            f"{escape(', '.join(m.downstream))}: {m.units_kept} of {m.units_total} units and "
            f"{m.images_kept} of {m.images_total} source images kept ({removed:.1%} of the images removed). "
            f"Surrogate {escape(str(surrogate))}, seed {m.seed}, selected {escape(m.created)}; "
            f"votes from each downstream image's top-{escape(str(m.extra.get('vote_topk', 1)))} units.</p>")


def _diagnostics(tasks: list[TaskDiagnostics]) -> str:
    parts = ["<h2>Selection diagnostics</h2>"]
    for t in tasks:
        figures = "".join(f"<tr><th>{escape(name)}</th><td class=num>{escape(value)}</td><td class=note>{escape(note)}</td></tr>"
                          for name, value, note in t.figures)
        warnings = "\n".join(f'<p class="warning">&#9888; {escape(w)}</p>' for w in t.warnings) or \
            '<p class="ok">No warning: the votes are neither sunk into one unit nor shared by many classes.</p>'
        classes = "".join(
            f"<tr><td>{escape(name)}</td><td class=num>{images}</td><td>{escape(unit)}</td><td class=num>{agreement:.0%}</td>"
            f"<td>{'kept' if kept else '<b>dropped</b>'}</td></tr>" for name, images, unit, agreement, kept in t.classes)
        parts.append(f'<h3>task {escape(t.task)}</h3>\n{warnings}\n<table class="diagnostics">{figures}</table>\n'
                     '<p class="note">Per downstream class: the unit most of its images vote for, the share of its '
                     "votes that unit gets (agreement), and whether the keep-set kept it.</p>\n"
                     '<table class="classes"><tr><th>downstream class</th><th>images</th><th>majority unit</th>'
                     f"<th>agreement</th><th>unit</th></tr>{classes}</table>")
    if not tasks:
        parts.append('<p class="note">Not recorded in this keep-set; re-run `dp4tl select` to record them.</p>')
    return "\n".join(parts)


def _curve_table(ev: Evidence) -> str:
    _, kept = ev.images_kept_curve()
    rows = []
    for r in sorted({*CURVE_RATIOS, ev.keepset.meta.ratio}):
        d = units_to_drop(ev.num_units, r)
        mark = ' class="current"' if r == ev.keepset.meta.ratio else ""
        rows.append(f"<tr{mark}><td class=num>{r:g}</td><td class=num>{ev.num_units - d}</td>"
                    f"<td class=num>{kept[d]}</td><td class=num>{kept[d] / kept[0]:.1%}</td></tr>")
    return ("<h2>Images kept as the ratio grows</h2>\n"
            '<p class="note">The same ranking (votes, then runner-up votes, then the seeded tie-break) cut at '
            "other ratios; units differ in size, so images kept do not fall in step with units kept.</p>\n"
            '<table id="growth"><tr><th>ratio</th><th>units kept</th><th>images kept</th><th>share</th></tr>'
            + "".join(rows) + "</table>")


def _unit_row(ev: Evidence, rank: int, detail: UnitDetail | None) -> str:
    unit = int(ev.ranking[rank])
    status = "kept" if rank < ev.units_kept else "dropped"
    votes = f"{ev.votes[unit]:.4g}"
    if len(ev.tasks) > 1:
        votes += "".join(f'<div class="task">{escape(t.name)}: {t.votes[unit]:.4g}</div>' for t in ev.tasks)
    runner_up = "" if ev.runner_up is None else f"<td class=num>{ev.runner_up[unit]:.4g}</td>"
    mix = "" if ev.keepset.meta.method != "fm" else \
        "<td>" + ", ".join(f"{share:.0%} {escape(name)}" for name, share in ev.class_mix(unit)) + "</td>"
    members = voters = '<span class="note">not shown (see the units at the top and around the cut)</span>'
    if detail is not None:
        members = _thumbs(detail.members)
        voters = "".join(f'<div class="task">{escape(task)}: {n} image(s)</div>{_thumbs(some)}'
                         for task, (n, some) in detail.voters.items() if n) \
            or '<span class="note">no downstream image voted for it</span>'
    return (f'<tr class="unit {status}" data-rank="{rank + 1}" data-unit="{unit}"><td class=num>{rank + 1}</td>'
            f"<td>{escape(ev.unit_names[unit])}<div class=note>{status}</div></td><td class=num>{votes}</td>{runner_up}"
            f"<td class=num>{ev.unit_sizes[unit]}</td>{mix}<td>{members}</td><td>{voters}</td></tr>")


def _units_table(ev: Evidence, details: dict[int, UnitDetail]) -> str:
    m = ev.keepset.meta
    columns = ["rank", "unit", "votes"] + (["runner-up votes"] if ev.runner_up is not None else []) + \
        ["source images"] + (["source classes it mixes"] if m.method == "fm" else []) + \
        ["some of its source images", "downstream images that voted for it"]
    cut = (f'<tr class="cut" id="cut"><td colspan="{len(columns)}">&#9986; cut line: ratio {m.ratio:g} drops the '
           f"{ev.num_units - ev.units_kept} lowest-ranked of {ev.num_units} units below this line; the "
           f"{ev.units_kept} above are kept</td></tr>")
    rows = [_unit_row(ev, rank, details.get(rank)) for rank in range(ev.num_units)]
    rows.insert(ev.units_kept, cut)
    runner_up = "" if ev.runner_up is None else (
        f" Equal votes are ordered by runner-up votes (each image's top-{m.extra.get('runner_up_topk')} units), "
        "then by the seeded tie-break.")
    return ("<h2>Units ranked by votes</h2>\n"
            f'<p class="note">Every unit, most voted first.{runner_up} Source thumbnails are what the surrogate saw; '
            "for k-means clusters they take the classes the cluster mixes in turn, nearest the centre first.</p>\n"
            f'<table id="units"><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{"".join(rows)}</table>')


def render_page(ev: Evidence, details: dict[int, UnitDetail], summary_uri: str,
                diagnostics: list[TaskDiagnostics]) -> str:
    """The whole page; ``details`` maps a rank to the thumbnails its row shows."""
    title = f"Keep-set {ev.path.name}: {ev.keepset.meta.method} at ratio {ev.keepset.meta.ratio:g}"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        _header(ev), _diagnostics(diagnostics),
        f'<h2>Summary</h2>\n<img class="summary" src="{summary_uri}" alt="votes per unit ranked, and images kept against ratio">',
        _curve_table(ev), _units_table(ev, details),
        "</body></html>", ""])
