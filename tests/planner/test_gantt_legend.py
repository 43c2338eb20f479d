"""Charts of many categories (26th session's show/simulate hunt): colours were reused past 20 (cat0 and cat20 the
same blue) and the legend ran off the figure (a 25-op Twill chain squashed the axes to a strip)."""
from __future__ import annotations

import random

from adasched.planner.gantt import MAX_LEGEND, legend_entries, render_gantt
from adasched.planner.simulator import ScheduledTask


def test_every_category_has_its_own_colour_and_the_legend_is_capped():
    n = random.randint(MAX_LEGEND + 1, 60)
    cats = sorted(f"cat{i}" for i in range(n))
    colour, labels = legend_entries(cats)
    assert len({colour[c] for c in cats}) == n
    assert len(labels) == MAX_LEGEND and labels[-1] == f"+{n - MAX_LEGEND + 1} more"
    assert labels[:-1] == cats[:MAX_LEGEND - 1]
    few = sorted(f"k{i}" for i in range(random.randint(1, 20)))
    colour, labels = legend_entries(["", *few])
    assert labels == few and len({colour[c] for c in ["", *few]}) == len(few) + 1


def test_a_chart_of_many_categories_is_drawn(tmp_path):
    from PIL import Image

    n = random.randint(30, 50)
    tasks = [ScheduledTask(f"t{i}", 0, "s", float(i), float(i + 1), f"cat{i}") for i in range(n)]
    out = tmp_path / "g.png"
    render_gantt(tasks, out)
    w, h = Image.open(out).size
    assert h >= 120 * (0.19 * MAX_LEGEND + 1.2) * 0.9, (w, h)  # tall enough for the capped legend (dpi 120)


def test_the_legend_names_the_first_categories_and_counts_the_rest(monkeypatch):
    n = random.randint(MAX_LEGEND + 1, 50)
    tasks = [ScheduledTask(f"t{i}", i % 3, "s", float(i), float(i + 1), f"cat{i:02d}") for i in range(n)]
    seen = _drawn_figure(monkeypatch, tasks)
    assert seen["legend"] == [f"cat{i:02d}" for i in range(MAX_LEGEND - 1)] + [f"+{n - MAX_LEGEND + 1} more"]
    assert seen["lanes"] == [f"rank {r} / s" for r in range(3)] and seen["bars"] == n
    assert seen["height"] >= 0.19 * MAX_LEGEND + 1.2


def _drawn_figure(monkeypatch, tasks, **kw):
    """The figure render_gantt saves, its text read before it is closed."""
    import adasched.profiler.io as io

    seen = {}

    def capture(fig, path, **_):
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen.update(title=ax.get_title(), lanes=[t.get_text() for t in ax.get_yticklabels()], xlim=ax.get_xlim(),
                    bars=sum(len(c.get_paths()) for c in ax.collections),
                    legend=[t.get_text() for t in legend.get_texts()] if legend else [],
                    height=fig.get_size_inches()[1])
        return path

    monkeypatch.setattr(io, "save_figure", capture)
    render_gantt(tasks, "unused.png", **kw)
    return seen


def test_a_chart_of_very_many_lanes_draws_the_first_ones_and_says_so(monkeypatch):
    # 26th session: a 2,000-lane task graph took 40 s to a 96,144-pixel-tall PNG
    from adasched.planner.gantt import MAX_LANES

    rng = random.Random()
    n = rng.randint(MAX_LANES + 1, 3 * MAX_LANES)
    order = list(range(n))
    rng.shuffle(order)  # lanes in order of appearance, not sorted
    tasks = [ScheduledTask(f"t{r}", r, "compute", rng.random(), 1.5 + rng.random(), f"c{r % 7}") for r in order]
    seen = _drawn_figure(monkeypatch, tasks, title="T")
    assert seen["title"] == f"T (the first {MAX_LANES} of {n:,} lanes)"
    assert seen["lanes"] == [f"rank {r} / compute" for r in order[:MAX_LANES]]
    assert seen["bars"] == MAX_LANES  # one bar per drawn lane, none of the others
    few = tasks[:rng.randint(1, MAX_LANES)]
    seen = _drawn_figure(monkeypatch, few)
    assert seen["title"] == "" and len(seen["lanes"]) == len(few)


def test_a_chart_of_very_many_bars_draws_the_first_ones_without_outlines(monkeypatch):
    """(33rd session's scale hunt) a LoRA plan of the whole 1M-line Wikipedia file drew 114,100 outlined bars on four
    lanes: 34 s to a black picture. The first MAX_TASKS bars by start are drawn, the title says up to when, and a
    sub-row of more than OUTLINE_UP_TO bars has no outlines."""
    import adasched.planner.gantt as g

    monkeypatch.setattr(g, "MAX_TASKS", 500)
    rng = random.Random()
    lanes = rng.randint(2, 5)
    n = rng.randint(700, 1200)
    starts = sorted(rng.uniform(0, 1000) for _ in range(n))
    tasks = [ScheduledTask(f"t{i}", i % lanes, "compute", s, s + rng.uniform(0.01, 0.2), "c") for i, s in
             enumerate(starts)]
    rng.shuffle(tasks)
    monkeypatch.setattr(g, "OUTLINE_UP_TO", 60)
    widths = []
    import matplotlib.axes

    orig = matplotlib.axes.Axes.broken_barh

    def spy(self, xranges, yrange, **kw):
        widths.append((len(xranges), kw.get("linewidth")))
        return orig(self, xranges, yrange, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "broken_barh", spy)
    seen = _drawn_figure(monkeypatch, tasks, title="T")
    by_start = sorted(tasks, key=lambda t: (t.start_ms, t.end_ms))
    until = by_start[500].start_ms  # (distinct random starts: the first 500 start before it)
    assert seen["title"] == f"T (500 of {n:,} bars: those starting before {until:,.6g})"
    assert seen["bars"] == 500 and sum(k for k, _ in widths) == 500
    assert seen["xlim"][1] == until
    assert all(lw == (0.3 if k <= 60 else 0.0) for k, lw in widths), widths
    assert any(k > 60 for k, _ in widths), widths  # (>= 100 bars a lane, rarely overlapping: their first sub-rows)


def test_a_long_early_bar_does_not_hide_other_lanes_bars_under_the_cap(monkeypatch):
    """(review) the title's limit was the latest end among the first bars: one long bar from 0 made it the whole
    span while another lane's bars after the cap's last start were missing inside it."""
    import adasched.planner.gantt as g

    monkeypatch.setattr(g, "MAX_TASKS", 200)
    rng = random.Random()
    short = [ScheduledTask(f"b{i}", 1, "compute", i * 0.1, i * 0.1 + 0.05, "c") for i in range(300)]
    tasks = [ScheduledTask("a", 0, "compute", 0.0, 1000.0, "c"), *short]
    rng.shuffle(tasks)
    seen = _drawn_figure(monkeypatch, tasks, title="T")
    until = sorted(t.start_ms for t in tasks)[200]
    assert seen["title"] == f"T (200 of 301 bars: those starting before {until:,.6g})"
    assert seen["xlim"][1] == until and seen["bars"] == 200
