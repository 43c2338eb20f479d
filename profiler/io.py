"""Shared file handling: one error type for bad user input, atomic writes, validated JSON loading.

Every loader in adasched goes through :func:`load_model` so that a missing file, malformed JSON, a wrong
schema version or a bad field becomes one line naming the file and the field, never a traceback.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

__all__ = ["InputError", "loads_json", "yaml_error_text", "check_iso_time", "atomic_path", "outputs_together", "check_output_path", "check_output_folder", "atomic_write_text",
           "atomic_write_json", "save_figure", "FIGURE_FORMATS", "read_text", "read_json", "load_model",
           "describe_validation_error", "error_line", "check_seconds", "check_host_memory",
           "check_model_memory", "MAX_TIMEOUT_S"]


class InputError(ValueError):
    """Bad user input: a file, an option or a value. ``str(err)`` is the one-line message for the CLI."""

    def __init__(self, where: str | os.PathLike, what: str):
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {what}")


def _write_target(path: Path, where) -> Path:
    """The file a write to ``path`` lands in: a symlink's target (the link stays a link), never a directory or a
    device, pipe or socket (renaming a temp file onto one would replace it)."""
    if path.is_symlink():
        try:
            path = path.resolve(strict=False)
        except (RuntimeError, OSError) as err:  # a symlink loop
            raise InputError(where, f"is a symlink that cannot be followed ({err})") from None
    if path.is_dir():
        raise InputError(where, "is a directory, expected a file path")
    if path.exists() and not path.is_file():
        raise InputError(where, "is not a regular file (a device, pipe or socket), expected a file path")
    if path.exists() and not os.access(path, os.W_OK):  # (the rename replaced a write-protected file, as `>` won't)
        raise InputError(where, "is read-only (no write permission): make it writable or write elsewhere")
    data = _package_data_folder(path)
    if data is not None:  # (a plan written there replaced a built-in graph, profile or preset for every later run)
        raise InputError(where, f"is in adasched's built-in data ({data}): write it elsewhere")
    return path


#: the package's folders of built-in inputs (profiles, Twill graphs and machines, presets, sequence lengths)
PACKAGE_DATA_FOLDERS = ("profiler/builtin", "planner/twill/graphs", "planner/twill/machines", "planner/lorafusion/presets",
                        "planner/flexsp/data")


def _package_data_folder(path: Path) -> str | None:
    """The built-in data folder (relative to the package) that ``path`` is in, else None."""
    root = Path(__file__).resolve().parent.parent
    try:
        where = path.expanduser().resolve(strict=False)
    except (RuntimeError, OSError):
        return None
    return next((f"adasched/{d}/" for d in PACKAGE_DATA_FOLDERS if where.is_relative_to(root / d)), None)


#: the renames :func:`outputs_together` holds back (None: none is active)
_HELD_RENAMES: ContextVar[list[tuple[str, Path]] | None] = ContextVar("_HELD_RENAMES", default=None)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (same suffix, so e.g. ``savefig`` infers the format); on success it is
    renamed onto ``path`` (inside :func:`outputs_together`: when that block ends), on any error removed, so
    ``path`` is never half-written. An existing file keeps its permission bits. A destination that cannot be
    written (a directory, no permission) is an :class:`InputError` naming ``path``."""
    path = _write_target(Path(path), path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a fixed-length name (the destination's own name in it made a legal 250-character --plot too long)
        fd, tmp = tempfile.mkstemp(prefix=".adasched-", suffix=f".tmp{path.suffix[:16]}", dir=path.parent)
        os.close(fd)
        try:  # mkstemp makes 0600: the result gets the file's own mode, or the usual permissions for a new one
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError as err:
        raise InputError(path, f"cannot write: {err.strerror or err}") from None
    try:
        yield Path(tmp)
        held = _HELD_RENAMES.get()
        if held is not None:
            held.append((tmp, path))
            tmp = None  # outputs_together renames it, or removes it
        else:
            os.replace(tmp, path)
    except OSError as err:
        raise InputError(path, f"cannot write: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


@contextmanager
def outputs_together() -> Iterator[None]:
    """A command's outputs (--out and --plot) appear together or not at all: every :func:`atomic_path` written
    inside the block is renamed onto its destination when the block ends without an error, and removed when it
    raises (a Ctrl-C while the plot was drawn left the plan written, and the command said "aborted"). A block
    inside another hands its outputs to the enclosing one (it renamed them at its own end, before the outer block
    could still fail)."""
    outer = _HELD_RENAMES.get()
    held: list[tuple[str, Path]] = []
    token = _HELD_RENAMES.set(held)
    try:
        yield
        _HELD_RENAMES.reset(token)
        token = None
        if outer is not None:  # nested: the enclosing block renames or removes them
            outer.extend(held)
            held.clear()
        while held:
            tmp, path = held[0]
            try:
                os.replace(tmp, path)
            except OSError as err:
                raise InputError(path, f"cannot write: {err.strerror or err}") from None
            held.pop(0)
    finally:
        if token is not None:
            _HELD_RENAMES.reset(token)
        for tmp, _ in held:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


#: Figure formats matplotlib's Agg backend writes (checked without importing matplotlib). Not "pgf": it needs a
#: TeX installation, and without one the figure failed with a traceback after the work (and after a plan was
#: written).
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "avif",
                  "raw", "rgba")


def check_output_path(path: str | os.PathLike | None, option: str, *, figure: bool | None = None) -> None:
    """Fail before any work when ``path`` (the value of ``option``) cannot be a file to write: a directory, or
    under an existing file; with ``figure`` (default: when ``option`` is '--plot') also a suffix matplotlib
    cannot write. Commands that write several outputs check them all first, so a late failure never leaves one
    written and the command failed."""
    if path is None:
        return
    if isinstance(path, str) and not path.strip():  # (Path("") is ".": the error said '. is a directory')
        raise InputError(option, "is empty: give a file name")
    if isinstance(path, str) and path.endswith(("/", os.sep)) and path.strip("/" + os.sep):
        # a folder's spelling: Path() drops the slash, and `--plot figs/` wrote a file named figs
        raise InputError(option, f"{path} ends with '/', a folder: give a file name")
    given = Path(path)
    _check_name_length(given, option)  # (first: a stat of a too-long name is an OSError)
    try:
        path = _write_target(given, option)
    except InputError as err:
        raise InputError(option, f"{given} {err.what}") from None
    _probe_nearest_folder(path.parents, option, path)
    if (option == "--plot" if figure is None else figure) and path.suffix:
        fmt = path.suffix[1:].lower()
        if fmt not in FIGURE_FORMATS:
            raise InputError(option, f"{path}: cannot draw a {fmt!r} file (use one of {', '.join(FIGURE_FORMATS)})")


def _is_file(path: str | os.PathLike) -> bool:
    """Path.is_file that is False, not an OSError, for a name the OS refuses (too long: ENAMETOOLONG)."""
    try:
        return Path(path).expanduser().is_file()
    except OSError:
        return False


def check_distinct_outputs(*outputs: tuple[str, str | os.PathLike | None],
                           inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> None:
    """(option, path) pairs of one command's outputs: two naming one file are refused (`--out p.png --plot p.png`
    wrote the plan, then the figure over it, and said "wrote p.png and p.png"), and so is an output that is one of
    the command's ``inputs`` (option, path or a built-in name) that exist as files (`plan sp --profile my.json
    --out my.json` replaced the measured profile by the plan)."""
    seen: dict[Path, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise InputError(option, f"{path} is also {seen[key]}: give each output its own file")
        for other, other_option in seen.items():  # one output under another: the first was written, then the
            # second failed ("cannot write: File exists") - a failed command with a file left behind
            if other in key.parents or key in other.parents:
                inner, outer = (option, other_option) if other in key.parents else (other_option, option)
                raise InputError(inner, f"{path if inner == option else other} is under the {outer} output "
                                        f"(a file, not a folder): give each output its own place")
        seen[key] = option
    for in_option, path in inputs:
        if path is None or not str(path).strip() or not _is_file(path):
            continue  # a built-in name, or a missing or unreadable file (its own error, naming what reads it)
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise InputError(seen[key], f"{path} is the {in_option} input: writing there would replace it; "
                                        f"give the output another file")


def check_output_folder(path: str | os.PathLike, option: str) -> None:
    """Fail before any work when ``path`` (the value of ``option``) cannot be a folder to write into: an empty
    name, an existing non-folder, under a file, or a place that cannot be written (probed with a temp file in the
    nearest existing folder). Missing folders are fine: the writer creates them."""
    if not str(path).strip():
        raise InputError(option, "is empty, expected a folder")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(option, f"{path} exists and is not a folder")
    _probe_nearest_folder((path, *path.parents), option, path)


def _probe_nearest_folder(candidates, option: str, path: Path) -> None:
    """The first existing one of ``candidates`` (``path``'s folders, nearest first) must be a folder we can write
    in: a temp file is created and removed there, so a read-only or pseudo file system (/proc, /sys), or a folder
    without write permission, fails here, before any work, instead of after minutes of solving or measuring - or
    after another output was already written."""
    folder = next((f for f in candidates if f.exists()), None)
    if folder is None:
        return
    if not folder.is_dir():
        raise InputError(option, f"{path}: {folder} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".adasched-probe-", dir=folder)
    except OSError as err:
        raise InputError(option, f"{path}: cannot write in {folder}: {err.strerror or err}") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _check_name_length(path: Path, option: str) -> None:
    """A file name longer than its file system takes (ENAMETOOLONG) fails here, before any work, not at the
    write after it."""
    folder = next((f for f in path.expanduser().parents if _exists(f)), None)
    try:
        most = os.pathconf(folder if folder is not None else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        most = 255
    if most > 0 and len(os.fsencode(path.name)) > most:
        raise InputError(option, f"{path.name[:40]}...: the file name is {len(os.fsencode(path.name))} bytes; this "
                                 f"file system takes at most {most}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # (a folder name too long itself)
        return False


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask() briefly changes process state, so not per write


def parse_iso_time(v: str):
    """``datetime.fromisoformat`` with a trailing ``Z`` (UTC) read on every Python: before 3.11 fromisoformat
    refused it, so a plan whose ``created`` ends in Z loaded on 3.11 and was refused on 3.10 (h51)."""
    from datetime import datetime

    if isinstance(v, str) and v[-1:] in ("Z", "z"):
        v = v[:-1] + "+00:00"
    return datetime.fromisoformat(v)


def check_iso_time(v: str) -> str:
    """``v`` if it is an ISO 8601 time (a plan's or profile's ``created``), else a ValueError saying so."""
    try:
        parse_iso_time(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an ISO 8601 time") from None
    return v


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same folder + rename (never half-written)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def _plain_text(fig) -> None:
    """The texts of ``fig`` drawn as given - titles, axis labels, legends, annotations: matplotlib reads a pair of
    ``$`` as math (a Twill graph named ``attn$^$v2`` failed its plot with a ParseSyntaxException; a task
    ``cost$_in$`` got a subscript). Tick labels keep math: a log axis writes its ticks as mathtext (10^k); a
    figure that puts user text in tick labels escapes it (:func:`escape_math`)."""
    from matplotlib.text import Text

    ticks = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update((tick.label1, tick.label2))
    for text in fig.findobj(Text):
        if text not in ticks:
            text.set_parse_math(False)


def escape_math(text: str) -> str:
    """``text`` for a matplotlib text that keeps math parsing (tick labels): every ``$`` drawn as a dollar."""
    return str(text).replace("$", r"\$")


def tight_layout(fig) -> None:
    """``fig.tight_layout()`` with every text drawn as given (the layout measures the texts: see
    :func:`_plain_text`)."""
    _plain_text(fig)
    fig.tight_layout()


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically; the format comes from the suffix (PNG when there is none). Every
    text is drawn as given (:func:`tight_layout`)."""
    path = Path(path)
    fmt = path.suffix[1:].lower() if path.suffix else "png"
    if fmt not in FIGURE_FORMATS:
        raise InputError(path, f"cannot draw a {fmt!r} file (use one of {', '.join(FIGURE_FORMATS)})")
    _plain_text(fig)
    with atomic_path(path) as tmp:
        try:
            fig.savefig(tmp, dpi=dpi, format=fmt)
        except (RuntimeError, ValueError, ImportError) as err:  # a writer this host lacks: one line, no file
            raise InputError(path, f"cannot draw: {' '.join(str(err).split())[:200]}") from None
    return path


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (null): json.dumps writes them as NaN / Infinity, which strict
    parsers (jq, JSON.parse) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def first_non_finite(obj: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted key path, value) of the first NaN or infinity in ``obj`` (floats in nested dicts, lists and tuples),
    None when there is none."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "value", obj)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        hit = first_non_finite(v, f"{path}.{k}" if path else str(k))
        if hit is not None:
            return hit
    return None


def has_non_finite(obj: Any) -> bool:
    """Whether a NaN or infinity sits anywhere in ``obj`` (floats in nested dicts, lists and tuples)."""
    return first_non_finite(obj) is not None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (NaN and infinities as null, see :func:`finite_json`) written atomically."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json(indent=1)
    else:
        text = json.dumps(finite_json(obj), indent=1, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_text(path: str | os.PathLike, *, expected: str = "a file", missing: str = "no such file") -> str:
    """A user's text file as str (UTF-8); missing, a directory, unreadable or blank -> :class:`InputError`
    naming the file (``expected`` says what kind of file, ``missing`` replaces 'no such file')."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, missing)
    if path.is_dir():
        raise InputError(path, f"is a directory, expected {expected}")
    if not path.is_file():
        raise InputError(path, f"is not a regular file (a device, pipe or socket), expected {expected}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows tools) is not data
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read: {err}") from None
    if not text.strip():
        raise InputError(path, "file is empty")
    return text


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r} (the last one would win silently)")
    return out


def loads_json(text: str) -> Any:
    """``json.loads`` that refuses an object with a key given twice (ValueError; json keeps the last one)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; missing/unreadable/malformed input raises :class:`InputError`."""
    return parse_json_text(read_text(path, expected="a JSON file"), path)


def parse_json_text(text: str, path: str | os.PathLike) -> Any:
    """:func:`loads_json` of a file's text; malformed JSON raises :class:`InputError` naming ``path``."""
    try:
        return loads_json(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer literal beyond Python's digit limit, deep nesting,
        # a key given twice
        raise InputError(path, f"malformed JSON: {' '.join(str(err).split()) or type(err).__name__}") from None


_YAML_LOADER = None


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``2e-4`` and ``1E3`` as numbers, as YAML 1.2 and JSON do (PyYAML follows
    YAML 1.1, where a float needs a dot: ``lr: 2e-4`` was the string "2e-4"), integers as YAML 1.2 does (``010``
    is 10, ``1:30`` a string; ``8_192`` still 8192), booleans as YAML 1.2 does (true / false; ``yes``, ``on``
    are strings), and refuses a key given twice in one mapping. Raises ``yaml.YAMLError``."""
    global _YAML_LOADER
    import re

    import yaml

    if _YAML_LOADER is None:
        class _Loader(yaml.SafeLoader):
            # a key given twice: PyYAML keeps the last one silently (`capacity: 1024` then `capacity: 2048`). Checked
            # on each mapping's own pairs, once, before merge keys (`<<: *base`) are flattened into it: flattening
            # rewrites an anchored mapping's pairs, so its overrides of merged keys would read as duplicates later.
            def __init__(self, stream):
                super().__init__(stream)
                self._unique_checked: set[int] = set()

            def flatten_mapping(self, node):
                if id(node) not in self._unique_checked:
                    self._unique_checked.add(id(node))
                    seen = set()
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                            continue
                        key = self.construct_object(key_node)
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                "while constructing a mapping", node.start_mark,
                                f"found duplicate key {key!r}", key_node.start_mark)
                        seen.add(key)
                super().flatten_mapping(node)

        _Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                      re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                      list("-+0123456789"))
        # integers as YAML 1.2 (and JSON) read them: YAML 1.1's `010` was octal 8, `1:30` sexagesimal 90 (a jobs
        # file planned 90 global batches), `0b1` binary; now decimal (digit-group underscores kept: 8_192),
        # 0o.. and 0x.. only (1:30 stays a string)
        int_tag = "tag:yaml.org,2002:int"
        for first, pairs in _Loader.yaml_implicit_resolvers.items():
            _Loader.yaml_implicit_resolvers[first] = [(tag, rx) for tag, rx in pairs if tag != int_tag]
        _Loader.add_implicit_resolver(int_tag, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                      list("-+0123456789"))

        def construct_int(loader, node):
            text = str(loader.construct_scalar(node))
            try:
                if text.startswith(("0o", "0x")):
                    return int(text[2:], 8 if text[1] == "o" else 16)
                return int(text.replace("_", ""), 10)
            except ValueError as err:  # (an explicit !!int on a non-integer; > 4300 digits)
                raise yaml.constructor.ConstructorError(None, None, f"bad integer {text[:40]!r}: {err}",
                                                        node.start_mark) from None

        _Loader.add_constructor(int_tag, construct_int)
        # booleans as YAML 1.2 reads them too: true / false only; YAML 1.1's yes / no / on / off stay strings
        # (`use_rslora: yes` was silently true, `name: on` a job named True)
        bool_tag = "tag:yaml.org,2002:bool"
        for first, pairs in _Loader.yaml_implicit_resolvers.items():
            _Loader.yaml_implicit_resolvers[first] = [(tag, rx) for tag, rx in pairs if tag != bool_tag]
        _Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
        _YAML_LOADER = _Loader
    try:
        return yaml.load(text, Loader=_YAML_LOADER)
    except RecursionError:  # ~1000 nested brackets: a RecursionError traceback through every caller
        raise yaml.YAMLError("nesting too deep") from None


def yaml_error_text(err: Exception) -> str:
    """One line for a ``yaml.YAMLError``: 'malformed YAML at line L column C: problem' (PyYAML's own text spans
    several lines and puts the position last)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"malformed YAML at line {mark.line + 1} column {mark.column + 1}: {' '.join(str(problem).split())}"
    return f"malformed YAML: {(str(err).splitlines() or [type(err).__name__])[0]}"


def describe_validation_error(err: ValidationError) -> str:
    """First problem of a pydantic error as 'field.path: message' (one line)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    # a validator's own message: pydantic prefixes it with "Value error, " (and a model-level one has no field:
    # it said "<root>: Value error, ..."), which told the user nothing
    msg = first.get("msg", "invalid").removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return (f"{loc}: {msg}" if loc else msg) + (f" (and {more} more)" if more > 0 else "")


def error_line(err: BaseException) -> str:
    """The one line every entry point prints for bad input: ``error: <where>: <what>\n`` (white space folded,
    a pydantic error as 'field.path: message')."""
    msg = describe_validation_error(err) if isinstance(err, ValidationError) else str(err)
    return "error: " + " ".join(msg.split()) + "\n"


M = TypeVar("M", bound=BaseModel)


def _whole_floats_as_ints(obj: Any) -> Any:
    """``8e10`` -> ``80000000000`` throughout a JSON tree (float fields take ints back unchanged). Iterative: a
    valid JSON file nested ~500 deep (json.loads takes up to ~990) overflowed the recursive walk's stack (a
    RecursionError traceback from every loader)."""
    def convert(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 63:
            return int(v)
        if isinstance(v, dict):
            out: Any = {}
        elif isinstance(v, list):
            out = [None] * len(v)
        else:
            return v
        todo.append((v, out))
        return out

    todo: list[tuple[Any, Any]] = []
    root = convert(obj)
    while todo:
        src, dst = todo.pop()
        for k, v in (src.items() if isinstance(src, dict) else enumerate(src)):
            dst[k] = convert(v)
    return root


def load_model(path: str | os.PathLike, model: type[M], *, data: Any = None) -> M:
    """Validate JSON ``path`` (or already-read ``data``) against ``model``; errors name file and field."""
    if data is None:
        data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object, got {type(data).__name__}")
    data = _whole_floats_as_ints(data)
    expected_version = getattr(model, "SCHEMA_VERSION", None)
    version = data.get("schema_version", expected_version)
    if expected_version is not None and (type(version) is not int or version != expected_version):
        raise InputError(path, f"schema_version {version!r} is not supported (expected {expected_version})")
    expected_kind = getattr(model, "KIND", None)
    if expected_kind is not None and "kind" in data and data["kind"] != expected_kind:
        raise InputError(path, f"kind {data['kind']!r} is not a {expected_kind}")
    try:  # strict, as JSON: a bool is not a number, "2" is not an int; ISO dates and arrays for tuples still parse;
        # a whole-number float (8e10 typed by hand for a byte count) still counts as an int, as it did when lax
        return model.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        if first.get("type") == "json_invalid" and "recursion limit" in first.get("msg", ""):
            # valid JSON nested past pydantic's parser limit: its "Invalid JSON" blamed the syntax
            raise InputError(path, "nested too deep (no adasched file nests its values hundreds of levels "
                                   "deep)") from None
        raise InputError(path, describe_validation_error(err)) from None


#: longest time limit / collective timeout an option takes (one week; torch converts timeouts to a C duration)
MAX_TIMEOUT_S = 7 * 24 * 3600.0


MIN_COLLECTIVE_TIMEOUT_S = 1.0
"""Shortest collective/rendezvous timeout the launchers take: below 1 ms torch's timedelta is 0 and the store timed
out at once (a C++ traceback on every rank after the checks passed); under a second no rendezvous is reliable."""


def check_seconds(option: str, value: float, *, most: float = MAX_TIMEOUT_S, least: float = 0.0) -> None:
    """``value`` (seconds, of ``option``) must be a finite number in (0, most], and >= ``least`` when given; else
    InputError naming it."""
    if not value > 0:  # NaN too
        raise InputError(option, f"must be > 0 seconds, got {value}")
    if value < least:
        raise InputError(option, f"must be >= {least:g} seconds, got {value:g}")
    if not (math.isfinite(value) and value <= most):
        raise InputError(option, f"must be a finite number of seconds <= {most:g}, got {value}")


def check_host_memory(need: int, options: str, what: str) -> None:
    """Refuse ``need`` bytes (``what`` needs them: the error line's text before ", more than this host's N GiB")
    beyond this host's memory, as an InputError naming ``options`` (instead of an allocator traceback, an
    OOM kill or a swapping machine)."""
    from . import inventory

    have = inventory.host_memory_bytes()
    if need > have:
        raise InputError(options, f"{what}, more than this host's {have / 2**30:,.1f} GiB")


def check_model_memory(params: int, bytes_per_param: int, ranks: int, options: str, what: str) -> None:
    """Refuse a model whose ``params`` (a lower bound is enough) x ``bytes_per_param`` (every copy a rank keeps:
    weights, gradients, optimizer state) x ``ranks`` on this host exceeds the host's memory: one line naming
    ``options`` (the size options)."""
    need = params * bytes_per_param * max(1, ranks)
    check_host_memory(need, options, f"the model has at least {params:,} parameters: {need / 2**30:,.1f} GiB for "
                                     f"{what} on {ranks} rank(s)")
