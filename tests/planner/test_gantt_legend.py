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
