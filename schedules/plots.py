"""Schedule curves for people: lr / peak lr per optimizer step for a list of schedule specs, a compact table and
a PNG plot. Specs: ``linear``, ``cosine``, ``rex``, ``uba`` (default phi) or ``uba:PHI``, ``constant``, or a path to
a norms CSV / refined-schedule JSON (the refined schedule of that run; its length sets the number of steps)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .lr import REX, UBA, UBA_DEFAULT_PHI, LinearDecay, Refined

__all__ = ["schedule_curve", "curve_rows", "plot_curves", "DEFAULT_SPECS"]

DEFAULT_SPECS = ("linear", "cosine", "rex", "uba:0.5", "uba:1", "uba:2", "uba:4")


def is_file_spec(spec: str) -> bool:
    """A schedule spec naming a file (a norms .csv / refined .json, or any path): not a schedule name."""
    return spec.lower().endswith((".csv", ".json")) or os.sep in spec or bool(os.altsep and os.altsep in spec)


def _dummy_opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def schedule_curve(spec: str, steps: int | None, warmup_steps: int = 0, *, norm: str | None = None,
                   smoothing: float | None = None) -> tuple[str, np.ndarray]:
    """(label, multipliers at optimizer steps 0..total) from the real scheduler object."""
    opt = _dummy_opt()
    key = spec.lower()
    if is_file_spec(spec):
        sched = Refined.from_file(opt, spec, norm=norm, smoothing=smoothing, warmup_steps=warmup_steps,
                                  total_steps=steps)
        label = f"refined ({Path(spec).name})"
    else:
        if steps is None:
            raise ValueError("--steps: required for schedule " + repr(spec))
        name, _, arg = key.partition(":")
        if name == "uba":
            try:
                phi = float(arg) if arg else UBA_DEFAULT_PHI
            except ValueError:
                raise ValueError(f"schedule: bad phi in {spec!r} (use uba:PHI, e.g. uba:0.5)") from None
            sched, label = UBA(opt, steps, phi=phi, warmup_steps=warmup_steps), f"uba phi={phi:g}"
        elif name == "cosine" and not arg:
            sched, label = UBA(opt, steps, phi=2.0, warmup_steps=warmup_steps), "cosine"
        elif name == "rex" and not arg:
            sched, label = REX(opt, steps, warmup_steps=warmup_steps), "rex"
        elif name == "linear" and not arg:
            sched, label = LinearDecay(opt, steps, warmup_steps=warmup_steps), "linear"
        elif name == "constant" and not arg:  # as --lr-schedule constant: no scheduler, so no warmup either
            return ("constant (no warmup)" if warmup_steps else "constant"), np.ones(steps + 1)
        else:
            raise ValueError(f"schedule: unknown {spec!r}; use linear, cosine, rex, uba[:PHI], constant or a "
                             f"norms .csv / refined .json file")
    return label, np.array([sched.multiplier(t) for t in range(sched.total_steps + 1)])


def curve_rows(curves: list[tuple[str, np.ndarray]], points=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)):
    """Rows ``[label, m(10%), ...]`` of the multiplier at fractions of each curve's steps (the nearest step,
    halves up); and the columns. A column whose fraction falls between two steps names the step it shows when
    every curve has that many steps (``--steps 3``: "50% (step 2)", the multiplier at z = 2/3, not at 0.5)."""
    def index(p: float, n: int) -> int:
        return min(n, int(math.floor(p * n + 0.5)))

    ns = {len(m) - 1 for _, m in curves}
    n_all = ns.pop() if len(ns) == 1 else None
    cols = ["schedule"]
    for p in points:
        head = f"{int(round(p * 100))}%"
        if n_all is not None and not math.isclose(p * n_all, index(p, n_all), abs_tol=1e-9):
            head += f" (step {index(p, n_all)})"
        cols.append(head)
    rows = [[label] + [float(m[index(p, len(m) - 1)]) for p in points] for label, m in curves]
    return rows, cols


def plot_curves(curves: list[tuple[str, np.ndarray]], path: str | os.PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, m in curves:
        ax.plot(np.arange(len(m)), m, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("lr / peak lr")
    ax.set_ylim(-0.02, 1.05)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    from adasched.profiler.io import save_figure, tight_layout

    tight_layout(fig)

    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
