"""Shared file handling: one error type for bad user input, atomic writes, validated JSON loading.

Every loader in adasched goes through :func:`load_model` so that a missing file, malformed JSON, a wrong
schema version or a bad field becomes one line naming the file and the field, never a traceback.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["InputError", "atomic_write_text", "atomic_write_json", "read_json", "load_model", "describe_validation_error"]


class InputError(ValueError):
    """Bad user input: a file, an option or a value. ``str(err)`` is the one-line message for the CLI."""

    def __init__(self, where: str | os.PathLike, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder + rename (never half-written)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=1)
    else:
        text = json.dumps(obj, indent=1, sort_keys=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; missing/unreadable/malformed input raises :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {err}") from None
    if not text.strip():
        raise InputError(path, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer literal beyond Python's digit limit, deep nesting
        raise InputError(path, f"malformed JSON: {' '.join(str(err).split()) or type(err).__name__}") from None


def describe_validation_error(err: ValidationError) -> str:
    """First problem of a pydantic error as 'field.path: message' (one line)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
    msg = first.get("msg", "invalid")
    more = len(err.errors()) - 1
    return f"{loc}: {msg}" + (f" (and {more} more)" if more > 0 else "")


M = TypeVar("M", bound=BaseModel)


def load_model(path: str | os.PathLike, model: type[M], *, data: Any = None) -> M:
    """Validate JSON ``path`` (or already-read ``data``) against ``model``; errors name file and field."""
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    expected_version = getattr(model, "SCHEMA_VERSION", None)
    if expected_version is not None and "schema_version" in data and data["schema_version"] != expected_version:
        raise InputError(path, f"schema_version {data['schema_version']!r} is not supported (expected {expected_version})")
    expected_kind = getattr(model, "KIND", None)
    if expected_kind is not None and "kind" in data and data["kind"] != expected_kind:
        raise InputError(path, f"kind {data['kind']!r} is not a {expected_kind}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InputError(path, describe_validation_error(err)) from None
