"""Terminal output shared by every command: tables for people, JSON for machines, progress bars on stderr."""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

__all__ = ["console", "err_console", "print_table", "emit_json", "progress", "fmt", "OneLineArgParser", "is_rank0",
           "reports_errors"]

_console = None
_err_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(soft_wrap=True)
    return _console


def err_console():
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True)
    return _err_console


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            return f"{v:.4g}" if abs(v) < 1 else f"{v:,.3f}".rstrip("0").rstrip(".")
        return f"{v:.3e}"
    return str(v)


def print_table(rows: Iterable[Sequence[Any]], columns: Sequence[str], title: str | None = None,
                highlight: set[int] | None = None) -> None:
    """Rows as a rich table on stdout; rows whose index is in ``highlight`` are bold. Every text is printed as
    given: rich would read ``[...]`` in a title or cell (an op named ``S[/x]``, a file ``tw[plan].json``) as
    markup - a MarkupError traceback, or a label silently changed."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=None if title is None else Text(str(title)), show_lines=False)
    for c in columns:
        t.add_column(Text(str(c)), overflow="fold")
    for i, r in enumerate(rows):
        t.add_row(*[Text(fmt(v)) for v in r], style="bold" if highlight and i in highlight else None)
    con = console()
    if con.is_terminal:
        con.print(t)  # a terminal's width: long cells fold to fit
    else:  # a pipe or a file (logs, CI, `| tee`): rich would assume 80 columns and split numbers over lines
        from rich.console import Console
        from rich.measure import Measurement

        natural = Measurement.get(con, con.options.update_width(10 ** 4), t).maximum
        # print() caps a width at the console's: a console as wide as the table, on the same stream
        Console(file=con.file, width=max(natural, con.width), soft_wrap=True, no_color=con.no_color).print(t)


def emit_json(obj: Any) -> None:
    """Machine-readable output: strict JSON on stdout (NaN and infinities as null), nothing else there."""
    from adasched.profiler.io import finite_json  # (here: this module stays free of pydantic for the GPU image)

    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(finite_json(obj), indent=1, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: int | None, *, enabled: bool = True):
    """A rich progress bar on stderr; yields ``advance(n=1, total=None)`` (``total`` sets the bar's length once the
    caller knows it). Disabled (no output) when ``enabled`` is False or stderr is not a terminal (logs, pipes,
    tests: stderr then carries only warnings and the one `error:` line)."""
    if not enabled or not err_console().is_terminal:
        yield lambda n=1, total=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console(), transient=False) as p:
        task = p.add_task(description, total=total)

        def advance(n: int = 1, total: int | None = None) -> None:
            if total is not None:
                p.update(task, total=total)
            p.advance(task, n)

        yield advance


def is_rank0() -> bool:
    """Rank 0 of a torchrun world, or not under torchrun: the process that prints a launcher's error line (every
    rank sees the same bad input; one line, not one per rank)."""
    return os.environ.get("RANK", "0") == "0"


def reports_errors() -> bool:
    """Whether this process prints a launcher's error line: rank 0 (every rank sees the same bad input: one line,
    not one per rank), and the first rank of every other node (torchrun's LOCAL_RANK 0, GROUP_RANK > 0): a node
    without a shared file system reads its own files, and an error only its ranks saw was lost (rank 0 printed
    nothing, torchrun stopped every rank)."""
    env = os.environ
    return is_rank0() or (env.get("LOCAL_RANK") == "0" and env.get("GROUP_RANK", "0") not in ("", "0"))


class OneLineArgParser(argparse.ArgumentParser):
    """argparse for the launchers and the planners' ``python -m`` tools: a bad option is one ``error:`` line (on
    rank 0 only, under torchrun) and exit status 2, as for the ``adasched`` CLI (argparse prints its whole usage
    text first - 20+ lines for the bigger launchers - which buries the message under torchrun's output).

    Options are never abbreviated (``allow_abbrev=False``): a wrapper script that refuses an option it sets itself
    (``train_sp.sh``: ``--world``) matched the full spelling only, and ``--wor 2`` or ``--check-plan`` reached the
    parser as the same option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        if is_rank0():
            sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
