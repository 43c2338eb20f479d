"""The ``adasched`` console script. The CLI's own imports (typer, rich, pydantic, the techniques' plugins: about
0.4 s) run inside a Ctrl-C guard here: a Ctrl-C in that window printed a KeyboardInterrupt traceback instead of
``aborted`` and exit status 130."""
from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    try:
        from adasched.planner.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        return 130
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
