"""Bounds the launchers share for numbers argparse accepts but a run cannot use (the one-line argument parser is
:class:`adasched.planner.ui.OneLineArgParser`; the finite-seconds and memory checks are in
:mod:`adasched.profiler.io`)."""
from __future__ import annotations

__all__ = ["MAX_LAYERS"]

#: most transformer layers a launcher's tiny CPU model takes (a bound on the time to build it)
MAX_LAYERS = 1024
