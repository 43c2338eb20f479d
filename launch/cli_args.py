"""Bounds the launchers share for numbers argparse accepts but a run cannot use.

The one-line argument parser is :class:`adasched.planner.ui.OneLineArgParser`; the finite-seconds and memory checks
are in :mod:`adasched.profiler.io`."""
from __future__ import annotations

from adasched.planner.ui import OneLineArgParser as ArgParser, is_rank0  # TEMPORARY re-exports (this session)
from adasched.profiler.io import MAX_TIMEOUT_S, check_host_memory, check_model_memory, check_seconds  # TEMPORARY

__all__ = ["MAX_LAYERS", "ArgParser", "is_rank0", "check_seconds", "check_host_memory", "check_model_memory",
           "MAX_TIMEOUT_S"]

#: most transformer layers a launcher's tiny CPU model takes (a bound on the time to build it)
MAX_LAYERS = 1024
