"""The launchers' argument parser: a bad option is one ``error:`` line and exit status 2, as everywhere else in
adasched (argparse prints its whole usage text first - 20+ lines for the bigger launchers - which buries the
message under torchrun's output). Plus the checks the launchers share for numbers argparse accepts but a run
cannot use: timeouts (finite), model sizes (they must fit in memory: a huge --hidden was a traceback from the
allocator, a huge --layers a hang)."""
from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["ArgParser", "is_rank0", "check_seconds", "check_host_memory", "check_model_memory", "MAX_LAYERS",
           "MAX_TIMEOUT_S"]

#: most transformer layers a launcher's tiny CPU model takes (a bound on the time to build it)
MAX_LAYERS = 1024
#: longest collective timeout a launcher takes (one week; torch converts it to a C duration)
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def is_rank0() -> bool:
    """Rank 0 of a torchrun world, or not under torchrun: the process that prints a launcher's error line (every
    rank sees the same bad input; one line, not one per rank)."""
    return os.environ.get("RANK", "0") == "0"


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse's hook
        if is_rank0():
            sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def check_seconds(option: str, value: float, *, most: float = MAX_TIMEOUT_S) -> None:
    """``value`` (seconds, of ``option``) must be a finite number in (0, most]; else InputError naming it."""
    from adasched.profiler.io import InputError

    if not value > 0:  # NaN too
        raise InputError(option, f"must be > 0 seconds, got {value}")
    if not (math.isfinite(value) and value <= most):
        raise InputError(option, f"must be a finite number of seconds <= {most:g}, got {value}")


def check_model_memory(params: int, bytes_per_param: int, ranks: int, options: str, what: str) -> None:
    """Refuse a model whose ``params`` (a lower bound is enough) x ``bytes_per_param`` (every copy a rank keeps:
    weights, gradients, optimizer state) x ``ranks`` on this host exceeds the host's memory: one line naming
    ``options`` (the size options) instead of an allocator traceback or a swapping machine."""
    need = params * bytes_per_param * max(1, ranks)
    check_host_memory(need, options, f"the model has at least {params:,} parameters: {need / 2**30:,.1f} GiB for "
                                     f"{what} on {ranks} rank(s)")


def check_host_memory(need: int, options: str, what: str) -> None:
    """Refuse ``need`` bytes (``what`` needs them: the error line's text before ", more than this host's N GiB")
    beyond this host's memory, as an InputError naming ``options``."""
    from adasched.profiler.inventory import _memory_bytes
    from adasched.profiler.io import InputError

    have = _memory_bytes()
    if need > have:
        raise InputError(options, f"{what}, more than this host's {have / 2**30:,.1f} GiB")
