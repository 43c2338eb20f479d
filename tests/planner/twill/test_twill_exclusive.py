"""The exclusive-cells lower bound on I (mii.exclusive_mii), checked against exhaustive search (2026-11-28).

rand20-s3-x32 stayed at I = 672 against MII 640 (CP-SAT at 640 timed out at 25 s): on its ALU (2 units) 15 x 32
cycles are held at full capacity and runs of 6 x 32 partial cycles sit right before full ones, so no I below
672 has a schedule: MII is now 672 and the schedule at 672 is proved minimal.
"""
from __future__ import annotations

import random

from adasched.planner.solver import SolveParams
from adasched.planner.twill import heuristic as twill_heuristic
from adasched.planner.twill import model as twill_model
from adasched.planner.twill.graph import Graph, check_graph, load_machine
from adasched.planner.twill.mii import compute_mii, exclusive_mii, res_mii
from adasched.planner.twill.oracle import OracleTooBig, min_ii
from adasched.planner.twill.plan import make_plan
from adasched.planner.twill.randgraph import random_graph


def test_exclusive_bound_never_exceeds_the_exhaustive_minimum():
    """Random 2-5-op graphs on a 2-unit ALU and a 1-unit TC (rows of 0-2 units, 1-4 cycles, chains and a
    loop-carried edge): MII <= the exhaustive minimal I every time; the bound is above ResMII and RecMII in some
    and equal to the minimum in most of those."""
    h100 = load_machine("h100")
    rng = random.Random(11)
    checked = active = tight = 0
    for _ in range(500):
        n = rng.randint(2, 5)
        ops = []
        for i in range(n):
            unit = rng.choice(["ALU", "ALU", "ALU", "TC"])
            cap = {"ALU": 2, "TC": 1}[unit]
            size = rng.randint(1, 4)
            ops.append({"name": f"v{i}", "reserve": {unit: [rng.randint(0 if 0 < c < size - 1 else 1, cap)
                                                              for c in range(size)]}})
        edges = [{"from": f"v{i}", "to": f"v{i + 1}", "delay": rng.randint(0, 2), "distance": 0}
                 for i in range(n - 1) if rng.random() < 0.5]
        if rng.random() < 0.5:
            edges.append({"from": f"v{n - 1}", "to": "v0", "delay": rng.randint(0, 3), "distance": 1})
        gd = {"name": "t", "units": {"ALU": 2, "TC": 1}, "ops": ops, "edges": edges}
        prob = check_graph(Graph.model_validate(gd), h100)
        m = compute_mii(prob)
        try:
            best, _ = min_ii(gd, None, max_ii=40, max_leaves=100_000)
        except OracleTooBig:
            continue
        checked += 1
        assert m.mii <= best, (gd, m, best)
        if m.excl:
            active += 1
            tight += m.mii == best
    assert checked > 400 and active > 20 and tight > active // 2, (checked, active, tight)


def test_exclusive_bound_by_hand():
    """[2, 1, 2] and [1, 2] on 2 units: 3 full cells, partial runs before full cells 1 + 1 = 2 -> I >= 5 (ResMII 4);
    with one unit of capacity every held cell is full and the bound is ResMII; an op spanning more cycles than
    the bound is checked at does not count (its cells may fold onto each other)."""
    h100 = load_machine("h100")

    def prob(rows, cap=2):
        ops = [{"name": f"v{i}", "reserve": {"ALU": r}} for i, r in enumerate(rows)]
        return check_graph(Graph.model_validate({"units": {"ALU": cap}, "ops": ops}), h100)

    p = prob([[2, 1, 2], [1, 2]])
    assert res_mii(p) == 4 and exclusive_mii(p, 4) == 5 and compute_mii(p).mii == 5
    assert min_ii(p.graph.model_dump(by_alias=True), None, max_ii=10)[0] == 5
    assert exclusive_mii(prob([[1, 1], [1]], cap=1), 1) == 1 and compute_mii(prob([[1, 1], [1]], cap=1)).mii == 3
    assert exclusive_mii(prob([[2, 0, 0, 0, 0, 0, 1, 2]]), 1) == 1  # spans 8 > 1: not applied below 8
    assert exclusive_mii(prob([[2, 0, 0, 0, 0, 0, 1, 2]]), 8) == 8  # 2 full + 1 partial = 3 <= 8


def test_rand20_s3_x32_is_proved_at_672():
    """MII 672 on the x32 graph (21 in units of 32); in units of 32 CP-SAT proves I = 21 minimal (MII) within 1.5 s,
    and that schedule scaled back (x32) passes the validator on the x32 graph at 672: the bound is tight there."""
    h100 = load_machine("h100")
    fine = check_graph(Graph.model_validate(random_graph(20, 3, scale=32)), h100)
    m = compute_mii(fine)
    assert (m.res, m.excl, m.mii) == (640, 672, 672)
    coarse = check_graph(Graph.model_validate(random_graph(20, 3)), h100)
    s = twill_model.solve(coarse, SolveParams(time_limit=1.5, seed=0, threads=1))
    assert s.ii == 21 == s.mii.mii and s.proven
    times = {v: 32 * t for v, t in s.times.items()}  # scaled back: a schedule of the x32 graph at 672
    h = twill_heuristic.HeuristicSchedule(672, times, {v: 0 for v in times}, {}, False)
    assert twill_heuristic._validate(fine, h) == []
    rows = dict(make_plan(coarse, s, simulate=False).summary_rows())  # the plan says where MII 21 comes from
    assert rows["ii (cycles/iter)"].startswith("21 (MII 21: res 20, rec 2, exclusive-cells bound;"), rows
