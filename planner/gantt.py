"""Gantt charts (matplotlib, headless) of scheduled tasks: one lane per (rank, stream) or any lane label."""
from __future__ import annotations

import os
from typing import Iterable

__all__ = ["MAX_LANES", "MAX_TASKS", "render_gantt", "sub_rows"]


#: most legend entries drawn; more categories get "+N more" as the last entry
MAX_LEGEND = 24

#: most lanes a chart draws (the first ones, in order of appearance); the title says how many were left out. A
#: 2,000-lane task graph took 40 s to a 96,144-pixel-tall PNG nobody could read.
MAX_LANES = 128

#: most bars a chart draws: the tasks that start first, the title saying up to when. A LoRA plan of the whole 1M-line
#: Wikipedia file (114,100 bars on four lanes) took 34 s to an all-black picture.
MAX_TASKS = 20_000

#: a sub-row with more bars than this is drawn without their black outlines (thousands of 0.3-point outlines in
#: 1,100 pixels were a black band)
OUTLINE_UP_TO = 300


def legend_entries(cats: list[str]) -> tuple[dict, list[str]]:
    """(colour of each category, the legend's labels): tab20's colours while they last, else one distinct colour per
    category from a continuous map, up to its 256 colours (``i % 20`` gave cat0 and cat20 the same blue); at most
    :data:`MAX_LEGEND` labels, the last "+N more" when there are more named categories (30 entries ran off the
    figure)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20") if len(cats) <= 20 else plt.get_cmap("turbo", len(cats))
    colour = {c: cmap(i) for i, c in enumerate(cats)}
    named = [c for c in cats if c]
    if len(named) <= MAX_LEGEND:
        return colour, named
    return colour, named[:MAX_LEGEND - 1] + [f"+{len(named) - MAX_LEGEND + 1} more"]


def sub_rows(tasks: Iterable) -> list[list]:
    """A lane's tasks split into rows without overlaps: bars that overlap in time (a warp group's ops in flight
    together) were drawn over each other. Each task, in start order, goes to the first row whose last task has
    ended."""
    rows: list[list] = []
    ends: list[float] = []
    for t in sorted(tasks, key=lambda t: (t.start_ms, t.end_ms)):
        k = next((i for i, e in enumerate(ends) if e <= t.start_ms), None)
        if k is None:
            rows.append([])
            ends.append(0.0)
            k = len(rows) - 1
        rows[k].append(t)
        ends[k] = t.end_ms
    return rows


def render_gantt(tasks: Iterable, path: str | os.PathLike, *, title: str = "", xlabel: str = "time (ms)",
                 lane_of=None, label_of=None) -> None:
    """Draw ``tasks`` (objects with start_ms, end_ms, category and a ``lane`` or ``rank``/``stream``) to ``path``.

    ``lane_of(task) -> str`` and ``label_of(task) -> str`` override the lane and the text in each bar. At most
    :data:`MAX_LANES` lanes are drawn, the first in order of appearance; the title then says how many there were."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    tasks = list(tasks)
    lane_of = lane_of or (lambda t: getattr(t, "lane", f"rank {t.rank} / {t.stream}"))
    label_of = label_of or (lambda t: getattr(t, "name", ""))
    lanes: dict[str, list] = {}
    for t in tasks:
        lanes.setdefault(lane_of(t), []).append(t)
    if len(lanes) > MAX_LANES:
        title = f"{title}{' ' if title else ''}(the first {MAX_LANES} of {len(lanes):,} lanes)"
        lanes = dict(list(lanes.items())[:MAX_LANES])
        tasks = [t for members in lanes.values() for t in members]
    until = None
    if len(tasks) > MAX_TASKS:
        # every bar starting before the (MAX_TASKS + 1)-th start, the axis ending there (a long early bar's end as
        # the limit hid the bars of other lanes starting before it)
        by_start = sorted(tasks, key=lambda t: (t.start_ms, t.end_ms))
        until = by_start[MAX_TASKS].start_ms
        first = [t for t in by_start[:MAX_TASKS] if t.start_ms < until]
        title = (f"{title}{' ' if title else ''}({len(first):,} of {len(tasks):,} bars: those starting before "
                 f"{until:,.6g})")
        keep = set(map(id, first))
        lanes = {lane: kept for lane, members in lanes.items() if (kept := [t for t in members if id(t) in keep])}
        tasks = first
    cats = sorted({getattr(t, "category", "") or "" for t in tasks})
    colour, labels = legend_entries(cats)
    # tall enough for the legend beside the axes (a legend taller than the figure squashed the chart to a strip)
    height = max(2.5, 0.4 * len(lanes) + 1.2, 0.19 * len(labels) + 1.2)
    fig, ax = plt.subplots(figsize=(12, height))
    span = max((t.end_ms for t in tasks), default=1.0) - min((t.start_ms for t in tasks), default=0.0)
    for y, members in enumerate(lanes.values()):
        rows = sub_rows(members)
        h = 0.8 / len(rows)
        for k, row in enumerate(rows):  # one call per sub-row, not one barh per task (slow for thousands of tasks)
            y0 = y - 0.4 + k * h
            ax.broken_barh([(t.start_ms, t.end_ms - t.start_ms) for t in row], (y0, h),
                           facecolors=[colour[getattr(t, "category", "") or ""] for t in row],
                           edgecolor="black", linewidth=0.3 if len(row) <= OUTLINE_UP_TO else 0.0)
            for t in row:
                w = t.end_ms - t.start_ms
                if span > 0 and w / span > 0.04:
                    ax.text(t.start_ms + w / 2, y0 + h / 2, label_of(t), ha="center", va="center",
                            fontsize=6 if len(rows) == 1 else 5, clip_on=True)
    from adasched.profiler.io import escape_math

    lanes = list(lanes)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([escape_math(lane) for lane in lanes], fontsize=7)  # (tick labels keep math parsing)
    ax.invert_yaxis()
    if until is not None:
        ax.set_xlim(right=until)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[c]) if c in colour else
               plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="none") for c in labels]
    if handles:
        # outside the axes, to the right: inside it covered the last bars
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7,
                  borderaxespad=0.0)
    from adasched.profiler.io import save_figure, tight_layout

    tight_layout(fig)

    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
