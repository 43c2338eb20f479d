"""The warp heuristic's first schedule on large graphs, and the pieces that made it fast (2026-11-28).

Before: on the 120-op random warp graph (seed 2) the first warp schedule took ~2.2 s of CPU (numpy calls per
placement in ``modulo_schedule``, round-based Bellman-Ford in ``_retime``), so ``solve`` at a 2 s limit got it
in 4 of 7 runs; seeds 1 and 3 got none at all (the retiming spent the register budget on buffers that could not
break the positive cycle it had). The times are ``python -m adasched.planner.twill.scalebench --first``'s table;
these tests check what is found, not how fast.
"""
from __future__ import annotations

import random
import time

from adasched.planner.solver import SolveParams
from adasched.planner.twill import heuristic as twill_heuristic
from adasched.planner.twill import model as twill_model
from adasched.planner.twill.graph import Graph, check_graph, load_machine
from adasched.planner.twill.mii import longest_paths, longest_paths_or_cycle
from adasched.planner.twill.randgraph import random_graph


def _round_based(nodes, weighted):
    """Reference: Bellman-Ford by rounds over every edge (the version before), None on a positive cycle."""
    dist = {n: 0 for n in nodes}
    for _ in range(len(dist) + 1):
        changed = False
        for u, v, w in weighted:
            if dist[u] + w > dist[v]:
                dist[v] = dist[u] + w
                changed = True
        if not changed:
            return dist
    return None


def test_longest_paths_equal_the_round_based_solution_and_name_a_positive_cycle():
    """The queue-based longest paths give the same least solution as rounds over every edge, and None exactly when
    a cycle is positive; the cycle it names is a cycle of the graph with positive weight."""
    rng = random.Random(7)
    cycles = 0
    for _ in range(1500):
        n = rng.randint(1, 10)
        nodes = [f"n{i}" for i in range(n)]
        edges = [(rng.choice(nodes), rng.choice(nodes), rng.randint(-7, 3)) for _ in range(rng.randint(0, 3 * n))]
        want = _round_based(nodes, edges)
        assert longest_paths(nodes, edges) == want, (nodes, edges)
        dist, cyc = longest_paths_or_cycle(nodes, edges)
        assert dist == want and (cyc is None) == (want is not None)
        if cyc is not None:
            cycles += 1
            best = {}
            for u, v, w in edges:
                best[u, v] = max(best.get((u, v), w), w)
            steps = [(cyc[j - 1], cyc[j]) for j in range(len(cyc))]
            assert all(s in best for s in steps), (cyc, edges)
            assert sum(best[s] for s in steps) > 0, (cyc, edges)
    assert 100 < cycles < 1400  # both kinds of case were met


def test_retime_grows_only_buffers_on_the_positive_cycle():
    """An 11-op warp graph at I = 9 on one consumer group: the modulo schedule needs more registers than the
    group has; the retiming used to grow the buffer count of the value with the fewest buffers wherever it was, and
    ran out of registers before it broke the cycle (None); growing only values on the cycle it finds gives stages
    within the budgets (checked by the validator)."""
    prob = check_graph(Graph.model_validate(random_graph(11, 3, warp=True)), load_machine("h100"))
    grp = twill_heuristic.assignments(prob)[0]
    assert len(set(grp.values())) == 2  # producer + one consumer group
    times = twill_heuristic.modulo_schedule(prob, 9, grp)
    assert times is not None and twill_heuristic._budgets_ok(prob, 9, times, grp) is None
    fixed = twill_heuristic._retime(prob, 9, times, grp)
    assert fixed is not None and all(fixed[v] % 9 == times[v] % 9 for v in times)  # same residues
    copies = twill_heuristic._budgets_ok(prob, 9, fixed, grp)
    assert copies is not None
    s = twill_heuristic.HeuristicSchedule(9, fixed, grp, copies, True)
    assert twill_heuristic._validate(prob, s) == []


def test_first_warp_schedule_on_120_ops_is_found_and_valid():
    """The 120-op random warp graphs (seeds 1-3): the heuristic finds a first warp schedule (seeds 1 and 3 found
    none before), validated (heuristic_schedule raises otherwise), with I at least MII; and ``solve`` at a 0.5 s
    limit returns a schedule for seed 2 (it raised the time-limit error at 0.3, 1 and 2 s in the 2026-11-28
    adherence run). How fast the first schedule comes (0.6-0.8 s of CPU on seed 3; ~2.2 s on seed 2 before) is
    ``python -m adasched.planner.twill.scalebench --first``'s table, not a bound here: CPU-time bounds in unit tests
    failed under load."""
    h100 = load_machine("h100")
    probs = {seed: check_graph(Graph.model_validate(random_graph(120, seed, warp=True)), h100) for seed in (1, 2, 3)}
    for seed, prob in probs.items():
        h = twill_heuristic.heuristic_schedule(prob, warp=True, time_limit=0.2)  # the refinement: 0.2 s at most
        assert h is not None and h.warp and h.ii >= twill_model.compute_mii(prob).mii, seed
    s = twill_model.solve(probs[2], SolveParams(time_limit=0.5, seed=0, threads=1))
    assert s.warp and s.ii >= s.mii.mii and s.status in ("feasible", "optimal")


def test_rec_mii_stops_at_its_deadline_with_a_lower_bound(monkeypatch):
    """RecMII equals the brute force (smallest I with no positive cycle, by the round-based reference) on random
    graphs; with a deadline that passes after k bisection steps it returns a lower bound on it (``exact`` False),
    for every k; without one, the exact value. Before, compute_mii took no deadline (3-26 ms on 120-300 ops then,
    ~0.4 s on 1000; 1-4 ms and ~15 ms with the queue-based longest paths)."""
    from adasched.planner.twill import mii as twill_mii
    from adasched.planner.twill.graph import make_problem

    h100 = load_machine("h100")
    probs = [check_graph(Graph.model_validate(random_graph(n, seed, warp=warp)), h100)
             for n, seed, warp in ((6, 1, False), (9, 2, True), (12, 3, False), (20, 4, True))]
    probs.append(make_problem("fa3-hopper", "h100"))
    for prob in probs:
        g = prob.graph
        nodes = [o.name for o in g.ops]
        want = next(ii for ii in range(1, 10_000) if _round_based(
            nodes, [(e.src, e.dst, e.delay - ii * e.distance) for e in g.edges]) is not None)
        assert twill_mii.rec_mii_bound(prob) == (want, True) and twill_mii.rec_mii(prob) == want
        assert twill_mii.compute_mii(prob, deadline=time.perf_counter() + 60).exact
        exacts = []
        for k in range(0, 20):
            clock = iter([0.0] * k + [10.0] * 1000)
            monkeypatch.setattr(twill_mii.time, "perf_counter", lambda: next(clock))
            bound, exact = twill_mii.rec_mii_bound(prob, deadline=5.0)
            monkeypatch.undo()
            assert 1 <= bound <= want and (not exact or bound == want), (g.name, k, bound, want)
            exacts.append(exact)
        assert exacts[-1] and not exacts[0]  # cut short at first, exact given enough steps
        past = twill_mii.compute_mii(prob, deadline=time.perf_counter() - 1)
        assert past.rec <= want and past.res == twill_mii.res_mii(prob)
        assert not past.exact


def test_solve_bounds_mii_by_its_deadline_and_says_when_it_is_only_a_bound(monkeypatch):
    """solve gives compute_mii its deadline; when RecMII was cut short, the note says MII is only a lower bound."""
    from adasched.planner.twill.graph import make_problem
    from adasched.planner.twill.mii import MII

    seen = []
    real = twill_model.compute_mii

    def spy(problem, deadline=None):
        seen.append(deadline)
        m = real(problem, deadline=deadline)
        return MII(res=m.res, rec=1, exact=False)  # as if cut short before any step (1 is a lower bound)

    monkeypatch.setattr(twill_model, "compute_mii", spy)
    t0 = time.perf_counter()
    s = twill_model.solve(make_problem("toy-attention", "h100"), SolveParams(time_limit=1.0, seed=0, threads=1))
    assert seen and seen[0] is not None and t0 < seen[0] <= t0 + 1.0 + 0.5
    assert s.ii == 2 and "MII 2 is a lower bound" in s.note, s.note


def test_scalebench_first_prints_cpu_to_the_first_schedule(capsys):
    """`scalebench --first` (the command behind BENCHMARKS' first-schedule table): one row per graph with the CPU
    seconds to the first schedule <= those of the whole search, and the I found (small graphs here)."""
    from adasched.planner.twill import scalebench

    assert scalebench._first(sizes=(10,)) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == [f"rand10-s{s}{w}" for s in (1, 2, 3) for w in ("", "-warp")]
    for r in rows:
        first, whole, ii = float(r[2]), float(r[3]), int(r[4])
        assert 0 <= first <= whole and ii >= 1
