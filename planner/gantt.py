"""Gantt charts (matplotlib, headless) of scheduled tasks: one lane per (rank, stream) or any lane label."""
from __future__ import annotations

import os
from typing import Iterable

__all__ = ["render_gantt"]


def render_gantt(tasks: Iterable, path: str | os.PathLike, *, title: str = "", xlabel: str = "time (ms)",
                 lane_of=None, label_of=None) -> None:
    """Draw ``tasks`` (objects with start_ms, end_ms, category and a ``lane`` or ``rank``/``stream``) to ``path``.

    ``lane_of(task) -> str`` and ``label_of(task) -> str`` override the lane and the text in each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    tasks = list(tasks)
    lane_of = lane_of or (lambda t: getattr(t, "lane", f"rank {t.rank} / {t.stream}"))
    label_of = label_of or (lambda t: getattr(t, "name", ""))
    lanes: list[str] = []
    for t in tasks:
        ln = lane_of(t)
        if ln not in lanes:
            lanes.append(ln)
    cats = sorted({getattr(t, "category", "") or "" for t in tasks})
    cmap = plt.get_cmap("tab20")
    colour = {c: cmap(i % 20) for i, c in enumerate(cats)}
    height = max(2.5, 0.4 * len(lanes) + 1.2)
    fig, ax = plt.subplots(figsize=(12, height))
    span = max((t.end_ms for t in tasks), default=1.0) - min((t.start_ms for t in tasks), default=0.0)
    for t in tasks:
        y = lanes.index(lane_of(t))
        w = t.end_ms - t.start_ms
        ax.barh(y, w, left=t.start_ms, height=0.8, color=colour[getattr(t, "category", "") or ""], edgecolor="black", linewidth=0.3)
        if span > 0 and w / span > 0.04:
            ax.text(t.start_ms + w / 2, y, label_of(t), ha="center", va="center", fontsize=6, clip_on=True)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(lanes, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[c]) for c in cats if c]
    if handles:
        ax.legend(handles, [c for c in cats if c], loc="upper right", fontsize=7, ncol=min(len(handles), 6))
    fig.tight_layout()
    from adasched.profiler.io import save_figure

    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
