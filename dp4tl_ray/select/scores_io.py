"""The EL2N/GraNd scores file: where it lives, reading it, writing it. Pure pyarrow: selection from a
given scores file reads it without importing torch (:mod:`dp4tl_ray.select.scores` computes scores).

``scores.parquet`` holds ``id, <score>`` per scored source image, sorted by id, and its record
(settings, models, cost ``scores_seconds``) in its schema metadata under :data:`META_KEY`: one copy,
which travels with the file and is covered by the sha256 a selection's cache key takes of it. A
scores file written elsewhere, without that record, may have a ``scores.json`` beside it
(:data:`DECLARED_FILE`) declaring its cost; it is read only then.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dp4tl_ray import atomic
from dp4tl_ray.artifact_io import read_json, read_parquet, reading
from dp4tl_ray.errors import UserError

SCORES_FILE = "scores.parquet"
META_KEY = b"dp4tl_scores"  # the scores' record in the parquet schema metadata
DECLARED_FILE = "scores.json"  # beside a scores file without a record: its declared record (e.g. scores_seconds)


@dataclass
class Scores:
    """``id, <score>`` of every scored source image (sorted by id), and its record (``path``: the file)."""

    table: pa.Table
    meta: dict[str, Any]


def scores_file(path: str | os.PathLike) -> Path:
    """The scores file a path names: a ``.parquet`` file itself, else :data:`SCORES_FILE` in that directory."""
    path = Path(path)
    return path if path.suffix == ".parquet" else path / SCORES_FILE


def load_scores(path: str | os.PathLike, score: str) -> Scores:
    """The ``id, <score>`` columns of the scores file ``path`` names (:func:`scores_file`), and its record."""
    file = scores_file(path)
    if not file.is_file():
        raise UserError(f"scores file {file} not found; drop --scores to compute them")
    fix = f"delete {file} and select again (the scores are recomputed), or pass another --scores"
    table = read_parquet(file, fix)
    if score not in table.column_names or "id" not in table.column_names:
        raise UserError(f"scores file {file} has no `id` and `{score}` columns (it has {table.column_names}); "
                        f"compute {score} scores or pass another file")
    with reading(file, fix):
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    declared = file.parent / DECLARED_FILE
    if not meta and declared.is_file():
        meta = read_json(declared, fix)
    return Scores(table.select(["id", score]).replace_schema_metadata(None), {**meta, "path": str(file)})


def write_scores(out: str | os.PathLike, table: pa.Table, meta: dict[str, Any]) -> Scores:
    """Write ``table`` (``id, <score>``) with its record ``meta`` to ``out/scores.parquet`` atomically."""
    file = Path(out) / SCORES_FILE
    with atomic.file_path(file) as tmp:
        pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)}), tmp)
    return Scores(table, {**meta, "path": str(file)})


__all__ = ["DECLARED_FILE", "META_KEY", "SCORES_FILE", "Scores", "load_scores", "scores_file", "write_scores"]
