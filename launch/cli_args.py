"""The launchers' argument parser: a bad option is one ``error:`` line and exit status 2, as everywhere else in
adasched (argparse prints its whole usage text first - 20+ lines for the bigger launchers - which buries the
message under torchrun's output)."""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["ArgParser", "is_rank0"]


def is_rank0() -> bool:
    """Rank 0 of a torchrun world, or not under torchrun: the process that prints a launcher's error line (every
    rank sees the same bad input; one line, not one per rank)."""
    return os.environ.get("RANK", "0") == "0"


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse's hook
        if is_rank0():
            sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)
