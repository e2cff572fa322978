"""Reading artifacts back: a damaged file (truncated, garbled, empty, wrong shape) is one ``UserError`` line.

The counterpart of :mod:`dp4tl_ray.atomic` for reads. Every reader of a JSON, YAML, parquet or
torch file goes through :func:`reading` (or the helpers built on it), so the message always names
the file and the caller's fix, and nothing is deleted on a read error.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from dp4tl_ray.errors import UserError

# What parsers raise on damaged bytes: OSError (truncated reads), ValueError (JSON, UTF-8, numpy, Arrow's
# ArrowInvalid), EOFError/UnpicklingError/BadZipFile/RuntimeError (torch.load), YAMLError.
READ_ERRORS = (OSError, ValueError, EOFError, pa.ArrowException, yaml.YAMLError, pickle.UnpicklingError,
               zipfile.BadZipFile, RuntimeError)
REASON_CHARS = 160  # the parser's own words, cut to keep the error one line


def damaged(path: str | Path, problem: str, fix: str) -> UserError:
    """The one-line error for an artifact at ``path`` that cannot be used: what is wrong and what to do."""
    return UserError(f"{path}: {problem}; {fix}")


def _reason(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return f"{e.problem} at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
    # one line of printable text: parsers quote the damaged bytes (thrift: "don't know what type: \x0f")
    text = " ".join("".join(c if c.isprintable() else " " for c in str(e)).split()) or type(e).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


@contextlib.contextmanager
def reading(path: str | Path, fix: str) -> Iterator[None]:
    """Turn a parser's failure on ``path`` inside the block into one line naming the file and ``fix``."""
    try:
        yield
    except UserError:
        raise
    except READ_ERRORS as e:
        raise damaged(path, f"unreadable ({_reason(e)})", fix) from None


def require_keys(obj: Any, keys: Iterable[str], path: str | Path, fix: str) -> dict[str, Any]:
    """``obj`` when it is a mapping holding every key of ``keys``; else the one-line error."""
    if not isinstance(obj, dict):
        raise damaged(path, f"expected a mapping, found {type(obj).__name__}", fix)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise damaged(path, f"lacks key(s) {missing}", fix)
    return obj


def read_json(path: str | Path, fix: str, keys: Iterable[str] = ()) -> dict[str, Any]:
    """A JSON object from ``path`` that holds ``keys``."""
    with reading(path, fix):
        obj = json.loads(Path(path).read_text())
    return require_keys(obj, keys, path, fix)


def read_yaml(path: str | Path, fix: str) -> Any:
    """The YAML document in ``path`` (``None`` when empty)."""
    with reading(path, fix):
        return yaml.safe_load(Path(path).read_text())


def require_columns(schema: pa.Schema, columns: Iterable[str | pa.Field], path: str | Path, fix: str) -> None:
    """Refuse ``schema`` unless it has every column; a ``pa.Field`` also fixes the column's type."""
    for col in columns:
        name = col.name if isinstance(col, pa.Field) else col
        if name not in schema.names:
            raise damaged(path, f"lacks column {name!r} (has {schema.names})", fix)
        if isinstance(col, pa.Field) and schema.field(name).type != col.type:
            raise damaged(path, f"column {name!r} is {schema.field(name).type}, expected {col.type}", fix)


def parquet_metadata(path: str | Path, fix: str, columns: Iterable[str | pa.Field] = ()) -> pq.FileMetaData:
    """The footer of a parquet file (nothing else is read), checked for ``columns``."""
    with reading(path, fix):
        md = pq.read_metadata(path)
        schema = md.schema.to_arrow_schema()
    require_columns(schema, columns, path, fix)
    return md


def read_parquet(path: str | Path, fix: str, columns: Iterable[str | pa.Field] = ()) -> pa.Table:
    """A whole parquet file as a table, checked for ``columns``."""
    with reading(path, fix), pq.ParquetFile(path) as f:  # its errors do not repeat the path, unlike read_table's
        table = f.read()
    require_columns(table.schema, columns, path, fix)
    return table


__all__ = ["READ_ERRORS", "damaged", "parquet_metadata", "read_json", "read_parquet", "read_yaml", "reading",
           "require_columns", "require_keys"]
