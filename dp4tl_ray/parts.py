"""Resumable extraction: feature rows committed in parts next to the store, then assembled into it.

A run writes every batch of finished rows as its own parquet part in ``<out>.parts-<key>/``,
atomically and named by its ids, and the images it could not read as ``skip-*.json`` records the
same way. A re-run after a kill reads the ids of the committed parts and records and extracts only
the other rows; the run that completes links every part into the store directory,
writes the manifest last and renames the whole into place. Each run also keeps ``run-<id>.json``:
the seconds it had worked when it committed its last part, so the store records the work its rows
cost and not the work a kill threw away.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import read_json, reading, require_columns
from dp4tl_ray.errors import UserError
from dp4tl_ray.featurestore import MANIFEST, open_shard, write_shard

PART_GLOB = "part-*.parquet"
SKIP_GLOB = "skip-*.json"
RUN_GLOB = "run-*.json"


def part_rows(num_rows: int, batch_size: int) -> int:
    """Rows per part: about 1% of the source (a kill loses at most the parts in flight), at least one
    inference batch, at most 10,000 rows (~20 MB at 512-d; 1.28M rows -> 128 parts)."""
    return max(batch_size, min(10_000, -(-num_rows // 100)))


def _name_by_ids(prefix: str, ids: np.ndarray, suffix: str) -> str:
    """A file name hashing ``ids``: a batch Ray retries rewrites the same file rather than adding a second
    copy of its rows."""
    return f"{prefix}-{hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).tobytes()).hexdigest()[:24]}{suffix}"


def commit_part(batch: pa.Table, *, staging: str) -> dict[str, np.ndarray]:
    """Write ``batch`` (FeatureStore rows) as one part, atomically (by the actor that computed them);
    returns the rows written, as a one-row Ray Data batch."""
    name = _name_by_ids("part", batch.column("id").to_numpy(), ".parquet")
    with atomic.file_path(Path(staging) / name) as tmp:
        write_shard(batch, tmp)
    return {"rows": np.array([batch.num_rows], dtype=np.int64)}


def commit_skips(rows: list[tuple[int, str, str]], *, staging: str) -> None:
    """Record ``(id, path, error)`` of images the decode could not read, atomically, so the store lists them
    and a resumed run does not read them again (a decode stage's ``on_skip``)."""
    name = _name_by_ids("skip", np.array([r[0] for r in rows]), ".json")
    atomic.write_json(Path(staging) / name, {"skipped": [{"id": int(i), "path": str(p), "error": str(e)} for i, p, e in rows]})


@dataclass(frozen=True)
class PartStaging:
    """The staging directory of one store key: committed parts and the runs that wrote them."""

    path: Path

    @classmethod
    def for_store(cls, out: str | Path, store_key: str) -> PartStaging:
        out = Path(out)
        return cls(out.with_name(f"{out.name}.parts-{store_key[:16]}"))

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(PART_GLOB))

    def committed_ids(self) -> np.ndarray:
        """The sorted ids of every committed row (only the parts' ``id`` columns are read); half-written
        temp files of killed writes are removed on the way, and so is a part whose every row another part
        holds too (see :func:`_drop_redundant_parts`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        part_ids = {}
        for part in self.parts():
            fix = f"delete {part} (only its rows are extracted again)"
            with reading(part, fix), open_shard(part) as f:
                require_columns(f.schema_arrow, ["id"], part, fix)
                part_ids[part] = f.read(columns=["id"]).column("id").to_numpy()
        ids = _sorted_ids(part_ids)
        if _repeats(ids):
            ids = _sorted_ids(_drop_redundant_parts(part_ids))
        if _repeats(ids):
            raise UserError(f"{self.path}: a row id is in two parts (files changed by hand?); delete it and extract again")
        return ids

    def skipped(self) -> list[dict[str, Any]]:
        """Every recorded unreadable image, ``{"id", "path", "error"}`` sorted by id, each once."""
        rows = {}
        for path in sorted(self.path.glob(SKIP_GLOB)):
            for row in read_json(path, f"delete {path} (its images are read again)", ("skipped",))["skipped"]:
                rows[int(row["id"])] = row
        return [rows[i] for i in sorted(rows)]

    def done_ids(self) -> np.ndarray:
        """The sorted ids a run need not read again: committed rows and recorded unreadable images."""
        skipped = np.array([row["id"] for row in self.skipped()], dtype=np.int64)
        return np.union1d(self.committed_ids(), skipped)

    def new_run(self) -> str:
        """A run id that sorts by start time."""
        return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def record_run(self, run: str, seconds: float, rows: int) -> None:
        """Record that ``run`` has committed ``rows`` rows after ``seconds`` of work."""
        atomic.write_json(self.path / f"run-{run}.json", {"seconds": round(seconds, 3), "rows": int(rows)})

    def runs(self) -> list[dict[str, Any]]:
        """Every run that committed parts, oldest first: ``{"seconds", "rows"}``."""
        return [read_json(p, f"delete {p} (the store then counts the other runs' seconds only)", ("seconds", "rows"))
                for p in sorted(self.path.glob(RUN_GLOB))]

    def assemble(self, out: str | Path, manifest: dict[str, Any]) -> None:
        """Link every part into the store ``out`` with ``manifest`` written last, replace ``out`` as a
        whole, then remove this and any older staging directory of ``out``."""
        out = Path(out)
        with atomic.directory(out) as tmp:
            for part in self.parts():
                _link_or_copy(part, tmp / part.name)
            atomic.write_json(tmp / MANIFEST, manifest)
        discard_staging(out)


def _sorted_ids(part_ids: dict[Path, np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(list(part_ids.values()))) if part_ids else np.zeros(0, np.int64)


def _repeats(sorted_ids: np.ndarray) -> bool:
    """Whether an id occurs twice in ``sorted_ids``."""
    return sorted_ids.size > 1 and not (np.diff(sorted_ids) > 0).all()


def _drop_redundant_parts(part_ids: dict[Path, np.ndarray]) -> dict[Path, np.ndarray]:
    """Delete the parts whose every row is also in other parts, oldest first; returns the rest.

    A killed driver's actors live on for a few seconds (they are in sessions of their own) and can commit a
    part after a resumed run has read the committed ids and batched those rows again. A row is the same
    function of its id in both, so the copy is dropped rather than the staging refused."""
    uniq, counts = np.unique(np.concatenate(list(part_ids.values())), return_counts=True)
    for part in sorted(part_ids, key=lambda p: (p.stat().st_mtime_ns, p.name)):
        pos = np.searchsorted(uniq, part_ids[part])
        if (counts[pos] > 1).all():
            counts[pos] -= 1
            part.unlink()
            del part_ids[part]
    return part_ids


def discard_staging(out: str | Path) -> None:
    """Remove every staging directory of the store ``out`` (a finished store supersedes them)."""
    out = Path(out)
    for stale in out.parent.glob(f"{out.name}.parts-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)
