"""simsched's work: event-driven, the results of a brute-force per-cycle loop (every field, deadlocks included).

The per-cycle loop asked every warp group at every cycle: on a 256-op random graph (one group per op in the plain
problem, I = 148, 320 iterations) ~23 million readiness checks, most of the 51.7 s of ``adasched plan twill
--time-limit 5`` (8.3 s now; BENCHMARKS.md ``twill``). The work is counted through ``stats`` (no wall-clock assertion).
"""
from __future__ import annotations

import random

from adasched.planner.twill.graph import Graph, check_graph, load_machine
from adasched.planner.twill.heuristic import heuristic_schedule
from adasched.planner.twill.randgraph import random_graph
from adasched.planner.twill.simsched import steady_rate, simulate_schedule

H100 = load_machine("h100")


def _heuristic(n_ops: int, seed: int, warp: bool = False, scale: int = 1):
    prob = check_graph(Graph.model_validate(random_graph(n_ops, seed, warp=warp, scale=scale)), H100)
    h = heuristic_schedule(prob, time_limit=2.0)
    assert h is not None
    groups = h.groups if h.warp else {o.name: 0 for o in prob.graph.ops}
    return prob.graph.model_dump(by_alias=True), prob.units, h.ii, h.times, groups, h.warp


def reference(graph, machine, ii, times, groups, *, units=None, warp=True, iterations=None, mode="asap", jitter=0,
              seed=0, unit_order=True):
    """Brute force: every cycle, passes over all warp groups in order (each issues its next op when ready) until a
    pass issues nothing; a deadlock when nothing issued for ``patience`` cycles. Returns the SimResult fields."""
    ops = {o["name"]: o for o in graph["ops"]}
    order = list(ops)
    caps = dict(units if units is not None else {**machine["units"], **(graph.get("units") or {})})
    handoff = machine.get("handoff_cycles", 0) if warp else 0
    length = {v: max([len(r) for r in o["reserve"].values()] + [1]) for v, o in ops.items()}
    stages = max(times.values()) // ii + 1
    n_it = iterations or max(48, 6 * stages + 8)
    lane = dict(groups) if warp else {v: i for i, v in enumerate(order)}
    # a self-loop of distance d writes in place: its value is last needed by the instance d - 1 later
    values = [e if e["from"] != e["to"] else {**e, "distance": e.get("distance", 0) - 1} for e in graph["edges"]
              if e.get("value", True) and (e["from"] != e["to"] or e.get("distance", 0) >= 2)]
    life = dict(length)
    for e in values:
        end = times[e["to"]] + ii * e.get("distance", 0) + length[e["to"]]
        life[e["from"]] = max(life[e["from"]], end - times[e["from"]])
    depth = {v: max(1, -(-life[v] // ii)) for v in order}
    rng = random.Random(seed)
    extra = {(v, it): (rng.randint(0, jitter) if jitter and ops[v].get("variable_latency") else 0)
             for v in order for it in range(n_it)}

    def when(p):
        return times[p[0]] + p[1] * ii, order.index(p[0])

    queues = {q: sorted(((v, it) for it in range(n_it) for v in order if lane[v] == q), key=when)
              for q in set(lane[v] for v in order)}
    before = {}
    for u in caps if unit_order else ():
        on = sorted(((v, it) for it in range(n_it) for v in order if any(ops[v]["reserve"].get(u, ()))), key=when)
        for a, b in zip(on, on[1:]):
            before.setdefault(b, []).append(a)
    busy, issued, free_at = {}, {}, {q: 0 for q in queues}
    patience = (sum(e.get("delay", 0) for e in graph["edges"]) + sum(length.values()) + ii * (stages + 2)
                + handoff * len(graph["edges"]) + jitter + 8)

    def why(v, it, c):
        if mode == "timed" and c < times[v] + it * ii:
            return "time"
        for a in before.get((v, it), ()):
            if a not in issued:
                return f"unit order: {a[0]}#{a[1]}"
        for e in (e for e in graph["edges"] if e["to"] == v):
            s = it - e.get("distance", 0)
            if s >= 0:
                if (e["from"], s) not in issued:
                    return f"{e['from']}#{s}"
                need = issued[(e["from"], s)] + e.get("delay", 0) + extra[(e["from"], s)]
                if warp and e.get("value", True) and e["from"] != v and lane[e["from"]] != lane[v]:
                    need += handoff
                if c < need:
                    return f"{e['from']}#{s}+{need - c}"
        for e in (e for e in values if e["from"] == v):
            old = it - depth[v] + e.get("distance", 0)
            if 0 <= old < n_it:
                if (e["to"], old) not in issued:
                    return f"buffer of {v}: {e['to']}#{old}"
                if c < issued[(e["to"], old)] + length[e["to"]]:
                    return f"buffer of {v}: {e['to']}#{old} running"
        for u, row in ops[v]["reserve"].items():
            if any(n and busy.get((u, c + k), 0) + n > caps.get(u, 0) for k, n in enumerate(row)):
                return f"unit {u}"
        return ""

    cycle = last = 0
    stalled = ""
    while len(issued) < n_it * len(order):
        progressed, again = False, True
        while again:
            again = False
            for q in sorted(queues):
                if not queues[q] or free_at[q] > cycle:
                    continue
                v, it = queues[q][0]
                wait = why(v, it, cycle)
                if wait:
                    stalled = f"{v}#{it} waits on {wait}"
                    continue
                issued[(v, it)] = cycle
                for u, row in ops[v]["reserve"].items():
                    for k, n in enumerate(row):
                        busy[(u, cycle + k)] = busy.get((u, cycle + k), 0) + n
                free_at[q] = cycle + (length[v] if warp and ops[v].get("blocking") else 1)
                queues[q].pop(0)
                progressed = again = True
        if progressed:
            last = cycle
        elif cycle - last > patience:
            return float("inf"), True, n_it, list(issued.items()), stalled
        cycle += 1
    h = n_it // 4
    end = max(h + 1, n_it - 1 - (stages + 2))
    # the rate of each op's issue times by the simulator's own reading (steady_rate: tested against exact rates in
    # test_twill_hunt_fixes_27); this reference checks the issue times it reads
    cpi = max(steady_rate([issued[(v, it)] for it in range(h, end + 1)]) for v in order)  # the slowest op's rate
    return cpi, False, n_it, list(issued.items()), ""


def _fields(r):
    return r.cycles_per_iteration, r.deadlock, r.iterations, list(r.issued.items()), r.stalled_on


def test_work_grows_with_the_ops_issued_not_cycles_times_groups():
    """A 128-op plain graph (128 groups, one per op): a handful of readiness checks per op instance issued (the
    per-cycle loop: one per group per cycle, ~90 per instance here), in both modes."""
    gd, units, ii, times, groups, warp = _heuristic(128, 7)
    md = H100.model_dump()
    for mode in ("asap", "timed"):
        st = {}
        sim = simulate_schedule(gd, md, ii, times, groups, units=units, warp=warp, mode=mode, stats=st)
        assert not sim.deadlock and sim.cycles_per_iteration == ii
        instances = sim.iterations * len(gd["ops"])
        assert len(sim.issued) == instances
        assert st["checks"] <= 6 * instances, (mode, st, instances)  # ~3.1 (asap)
        assert st["cycles"] <= max(sim.issued.values()) + 1
        if mode == "timed":  # about once per instance: at its scheduled cycle, when it issues
            assert st["checks"] <= 1.5 * instances, st  # exactly 1 here


def test_a_deadlock_costs_no_work_while_nothing_can_issue():
    """A consumer queued before its own producer in one group: nothing can ever issue, and the simulator says so
    without a check per cycle of the patience (the delays' sum: thousands of cycles)."""
    gd = {"ops": [{"name": "a", "reserve": {"TC": [1]}}, {"name": "b", "reserve": {"TC": [1]}}],
          "edges": [{"from": "a", "to": "b", "delay": 1000}, {"from": "b", "to": "a", "delay": 1000, "distance": 1}]}
    md = H100.model_dump()
    st = {}
    sim = simulate_schedule(gd, md, 2100, {"a": 1, "b": 0}, {"a": 0, "b": 0}, stats=st)
    ref = reference(gd, md, 2100, {"a": 1, "b": 0}, {"a": 0, "b": 0})
    assert sim.deadlock and _fields(sim) == ref
    assert sim.stalled_on == "b#0 waits on a#0"
    assert st["checks"] <= 3 and st["cycles"] <= 2


def test_equal_to_the_brute_force_reference_on_small_random_graphs():
    """30 small random graphs (plain and warp, scaled tables), heuristic schedules and random (often invalid,
    deadlocking) ones, every mode and option: every field equal to the per-cycle reference."""
    rng = random.Random(2024)
    md = H100.model_dump()
    compared = deadlocks = 0
    for k in range(30):
        n = rng.randint(2, 12)
        gd, units, ii, times, groups, warp = _heuristic(n, 300 + k, warp=k % 2 == 1, scale=1 + (k % 5 == 0))
        schedules = [(ii, times, groups)]
        bad_ii = rng.randint(1, 8)
        schedules.append((bad_ii, {v: rng.randrange(3 * bad_ii + 1) for v in times},
                          {v: rng.randrange(3) for v in times}))
        for s_ii, s_times, s_groups in schedules:
            for kw in (dict(warp=warp), dict(warp=warp, mode="timed"), dict(warp=not warp, iterations=12),
                       dict(warp=warp, jitter=3, seed=k), dict(warp=warp, unit_order=False, jitter=1, seed=k)):
                kw = dict(kw, units=units, iterations=kw.get("iterations", 16))
                got = _fields(simulate_schedule(gd, md, s_ii, s_times, s_groups, **kw))
                assert got == reference(gd, md, s_ii, s_times, s_groups, **kw), (k, s_ii, kw)
                compared += 1
                deadlocks += got[1]
    assert compared == 300 and 0 < deadlocks < compared
