"""Typed configs from dicts and YAML: unknown keys and wrong types are one-line errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from dp4tl_ray.artifact_io import read_yaml, require_keys
from dp4tl_ray.errors import UserError

T = TypeVar("T")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a (simple) type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where}: {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (arg, *_) = typing.get_args(tp) or (Any,)
        return origin(_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is Any or origin is not None:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is Path and isinstance(value, str):
        return Path(value)
    if tp in (int, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys name the valid ones."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise UserError(f"{where}: {e}") from None


def record_from(cls: type[T], data: Any, path: str | Path, fix: str) -> T:
    """Dataclass ``cls`` from a mapping read out of the artifact ``path``: wrong keys or types are one
    line naming the file and ``fix``."""
    data = require_keys(data, (), path, fix)
    try:
        return from_dict(cls, data, str(path))
    except UserError as e:
        raise UserError(f"{e}; {fix}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unparsable or non-mapping file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file (see jobs/configs/)")
    fix = "write it as `key: value` lines (see jobs/configs/ for examples)"
    data = read_yaml(path, fix)
    if data is None:
        raise UserError(f"config file {path} is empty; {fix}, or drop it to use the defaults")
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at top level; {fix}")
    return data
