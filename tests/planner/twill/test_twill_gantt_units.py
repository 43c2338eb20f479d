"""A Twill plan's unit lanes hold the cells each op's reservation row takes (26th session's show/simulate hunt): a
unit was drawn busy for the op's whole length, so a capacity-1 unit showed three ops at once and `simulate` counted
11 busy cycles of 12 where the schedule used 8."""
from __future__ import annotations

import json
import random

from adasched.planner.cli import main
from adasched.planner.plan import load_plan


def test_unit_lanes_follow_the_reservation_rows(tmp_path, capsys):
    rng = random.Random()
    # A: TC at its first cycle, SFU at one later cycle with zeros between (a random gap), B: TC for one cycle
    gap = rng.randint(1, 3)
    graph = {"name": "gaps", "units": {"TC": 1, "SFU": 1},
             "ops": [{"name": "A", "reserve": {"TC": [1] + [0] * (gap + 1), "SFU": [0] * (gap + 1) + [1]},
                      "category": "x"},
                     {"name": "B", "reserve": {"TC": [1]}, "category": "y"}],
             "edges": [{"from": "A", "to": "B", "delay": gap + 2, "distance": 0}]}
    g = tmp_path / "g.json"
    g.write_text(json.dumps(graph))
    out = tmp_path / "p.json"
    assert main(["plan", "twill", "--graph", str(g), "--out", str(out), "--time-limit", "5"]) == 0
    plan = load_plan(out)
    bars = plan.gantt_tasks()
    iters = plan.drawn_iterations()
    unit_bars = {u: [b for b in bars if b.lane == f"unit {u}"] for u in ("TC", "SFU")}
    # every unit bar is one reserved cell here (rows of isolated ones): TC 2 per iteration, SFU 1
    assert len(unit_bars["TC"]) == 2 * iters and len(unit_bars["SFU"]) == iters
    issue = {s.name: s.issue_cycle for s in plan.ops}
    for it in range(iters):
        base = it * plan.ii
        assert any(b.start_ms == issue["A"] + base and b.end_ms == issue["A"] + base + 1 for b in unit_bars["TC"])
        assert any(b.start_ms == issue["A"] + base + gap + 1 and b.end_ms == issue["A"] + base + gap + 2
                   for b in unit_bars["SFU"])
    for u, lane in unit_bars.items():  # capacity 1: never two bars on one unit cell
        cells = [c for b in lane for c in range(int(b.start_ms), int(b.end_ms))]
        assert len(cells) == len(set(cells)), (u, sorted(cells))
    capsys.readouterr()
    assert main(["simulate", str(out), "--json"]) == 0
    busy = json.loads(capsys.readouterr().out)["busy_cycles"]
    assert busy["rank 0 / unit TC"] == 2 * iters and busy["rank 0 / unit SFU"] == iters, busy
