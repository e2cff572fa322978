"""The sweep report's keep-set pages: an explorer page per keep-set the trials pretrained on, linked from report.md."""

from __future__ import annotations

from pathlib import Path

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError, user_message
from dp4tl_ray.explain.explorer import PAGE, explain_keepset

EXPLAIN_DIR = "explain"


def keepset_name(path: str | Path) -> str:
    """``<arch>-<task>-<method>-r<ratio>-s<seed>`` from the sweep's ``keepsets/<arch>/<task>/<method>-r..-s..``."""
    return "-".join(Path(path).parts[-3:])


def explain_keepsets(report_dir: str | Path, keepsets: list[str]) -> dict[str, Path]:
    """Write ``<report_dir>/explain/<name>/index.html`` for each keep-set and append a section to
    ``report.md`` linking them; a keep-set that cannot be explained (a method without unit votes,
    a missing store) gets a one-line note there instead. Returns ``{"explain/<name>": page}``."""
    report_dir = Path(report_dir)
    pages, lines = {}, []
    for path in keepsets:
        name = keepset_name(path)
        try:
            out = explain_keepset(path, report_dir / EXPLAIN_DIR / name)
        except UserError as e:
            lines.append(f"- {name}: no page ({user_message(e)})")
            continue
        pages[f"{EXPLAIN_DIR}/{name}"] = out / PAGE
        lines.append(f"- [{name}]({EXPLAIN_DIR}/{name}/{PAGE})")
    if lines:
        md = report_dir / "report.md"
        section = "\n".join(["## Keep-sets", "", "Why each keep-set kept what it kept (units ranked by votes, "
                             "the cut, thumbnails):", ""] + lines)
        atomic.write_bytes(md, (md.read_text().rstrip("\n") + "\n\n" + section + "\n").encode())
    return pages


__all__ = ["EXPLAIN_DIR", "explain_keepsets", "keepset_name"]
