"""Cycle-level simulator of an emitted Twill schedule.

Each warp group issues its ops in the schedule's order (iteration after iteration, in-order), at most one
per cycle; a blocking op holds its group until it has finished, other ops complete asynchronously (tensor
core, TMA) and only their dependants wait for them (``delay`` cycles, plus the machine's handoff/barrier
cost when the value crosses warp groups, plus optional random extra latency of variable-latency ops). Units
are held per the reservation tables in absolute cycles. Two modes:

- ``asap``: every op issues as soon as its group, inputs and units allow (what the hardware does), with the
  order of the ops on each shared unit kept as scheduled (the emitted kernel enforces it with barriers
  between warp groups, as FA3's ping-pong does; ``unit_order=False`` drops them: pure greedy);
- ``timed``: additionally never before its scheduled cycle (replays the static schedule exactly when valid).

The result gives the steady-state cycles per iteration (the slowest op's mean issue-to-issue distance from a
quarter of the iterations to the last ones before the drain, i.e. stages + 2 from the end) and flags a deadlock (no
op can ever issue again while work is left). Inputs are plain dicts (the graph and machine JSON), so the simulator shares no code with the solver.

It is event-driven, with the results (every issue cycle, the deadlock and its message) of the cycle-by-cycle loop it
replaced, which asked every warp group at every cycle (most of 51.7 s of `plan twill` on a 256-op random graph, I = 148,
320 iterations, one group per op): a group's next op is looked at again only when what it waited for may have happened
(a cycle reached, an instance issued, a unit free), within a cycle in passes over the groups in order until one issues
nothing, and past the last cycle anything could issue the loop's patience ends it as a deadlock.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["SimResult", "simulate_schedule", "simulated_iterations"]


@dataclass
class SimResult:
    cycles_per_iteration: float
    deadlock: bool
    iterations: int
    issued: dict[tuple[str, int], int] = field(default_factory=dict)
    stalled_on: str = ""


#: longest period (iterations) the default run is lengthened to cover, and the most op instances it grows to
MAX_PERIOD = 240
MAX_PERIOD_INSTANCES = 100_000


def steady_rate(times: list[int]) -> float:
    """Cycles per iteration of one op's issue times over a window: the smallest cycle of P iterations the second half
    of the window repeats (t[j] - t[j - P] the same for every j there, at least two cycles of it), its time over P;
    without one (a cycle longer than a quarter of the window), the window's mean. A window cut mid-burst misread
    the rate (a self-loop of delay 22 at distance 11 read 2.03 for 2.0, delay 71 at distance 9 read 6.81, below its
    bound 7.89)."""
    n = len(times)
    for p in range(1, n // 4 + 1):
        d = times[-1] - times[-1 - p]
        if all(times[j] - times[j - p] == d for j in range(n - max(2 * p, n // 2), n)):
            return d / p
    return (times[-1] - times[0]) / max(n - 1, 1)


def simulated_iterations(stages: int) -> int:
    """Iterations :func:`simulate_schedule` runs by default for a schedule of ``stages`` stages: enough for a
    steady-state window between the fill (a quarter) and the drain (the last stages + 2)."""
    return max(48, 6 * stages + 8)


def simulate_schedule(graph: dict, machine: dict, ii: int, times: dict[str, int], groups: dict[str, int], *,
                      units: dict[str, int] | None = None, warp: bool = True, iterations: int | None = None,
                      mode: Literal["asap", "timed"] = "asap", jitter: int = 0, seed: int = 0,
                      unit_order: bool = True, stats: dict | None = None) -> SimResult:
    """Simulate ``iterations`` (default ``max(48, 6 * stages + 8)``) iterations; see the module docstring.
    ``stats``, when given, receives ``checks`` (readiness checks of a warp group's next op) and ``cycles``
    (cycles at which any was made), the simulator's work."""
    ops = {o["name"]: o for o in graph["ops"]}
    order = [o["name"] for o in graph["ops"]]
    if len(ops) != len(order):
        raise ValueError("simulate_schedule: duplicate op names")
    if any(x < 0 for o in graph["ops"] for row in o["reserve"].values() for x in row):
        raise ValueError("simulate_schedule: a reservation table has a negative count")
    caps = dict(units if units is not None else {**machine["units"], **(graph.get("units") or {})})
    handoff = int(machine.get("handoff_cycles", 0)) if warp else 0
    length = {v: max([len(r) for r in o["reserve"].values()] + [1]) for v, o in ops.items()}
    stages = max(times.values()) // ii + 1
    n_it = iterations or simulated_iterations(stages)
    lane = dict(groups) if warp else {v: i for i, v in enumerate(order)}
    edges_in: dict[str, list[dict]] = {v: [] for v in order}
    for e in graph["edges"]:
        edges_in[e["to"]].append(e)
    # buffers: a value live L cycles has ceil(L / I) copies; instance it of u reuses the copy of it - depth,
    # so it waits until every consumer of that older copy has finished (the 'empty' barrier)
    # (a self-loop of distance d writes in place: its value outlives the d - 1 later instances, so it counts as
    # read by the instance d - 1 later; d = 1, an in-place accumulator, adds nothing)
    uses = [e if e["from"] != e["to"] else dict(e, distance=e.get("distance", 0) - 1) for e in graph["edges"]
            if e.get("value", True) and (e["from"] != e["to"] or e.get("distance", 0) >= 2)]
    life = dict(length)
    for e in uses:
        end = times[e["to"]] + ii * e.get("distance", 0) + length[e["to"]]
        life[e["from"]] = max(life[e["from"]], end - times[e["from"]])
    depth = {v: max(1, -(-life[v] // ii)) for v in order}
    reuse: dict[str, list[dict]] = {v: [] for v in order}
    for e in uses:
        reuse[e["from"]].append(e)
    # ASAP issue settles into a cycle of P iterations (a recurrence of distance d bursts every d, a buffer of depth b
    # every b, a unit of k copies every k, coupled ones at their lcm); by default the run is long enough for a window
    # of four cycles of the lcm of these periods, up to MAX_PERIOD iterations (the rate is read off a detected cycle)
    periods = {int(e.get("distance", 0)) for e in graph["edges"]} | set(depth.values()) | {
        int(caps.get(u, 0)) for o in graph["ops"] for u, row in o["reserve"].items() if any(row)}
    whole = math.lcm(*[p for p in periods if p > 0] or [1])
    if iterations is None:
        want = 4 * min(whole, MAX_PERIOD)
        n_it = min(max(n_it, -(-4 * (want + stages + 3) // 3) + 1), max(n_it, MAX_PERIOD_INSTANCES // len(order)))
    rng = random.Random(seed)
    # per op, per iteration (the same random draws, in the same order, as a dict over (op, iteration))
    extra = [[(rng.randint(0, jitter) if jitter and ops[v].get("variable_latency") else 0) for _ in range(n_it)]
             for v in order]

    # ops by index i, instances (op i, iteration it) as the int it * n + i
    n = len(order)
    idx = {v: i for i, v in enumerate(order)}
    t0 = [times[v] for v in order]
    lanes = sorted({lane[v] for v in order})  # warp groups are served in this order within a cycle
    rank = {q: r for r, q in enumerate(lanes)}
    lane_of = [rank[lane[v]] for v in order]

    # ties within a cycle: a topological order of the dependences that are tight there (delay <= 0 and the two
    # instances scheduled in the same cycle: t_to + I * distance == t_from), then op index. By op index alone, two
    # ops scheduled in one cycle on one unit with a delay-0 edge from the later-indexed to the earlier deadlocked
    # (the earlier waited for the later through the edge, the later for the earlier through the unit order). Such
    # edges form no cycle: a cycle of them would have total distance 0.
    succ: dict[int, list[int]] = {i: [] for i in range(n)}
    indeg = [0] * n
    for e in graph["edges"]:
        a, b = idx[e["from"]], idx[e["to"]]
        if a != b and e.get("delay", 0) <= 0 and t0[b] + ii * e.get("distance", 0) == t0[a]:
            succ[a].append(b)
            indeg[b] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    tie = [0] * n
    for r in range(n):
        if not ready:  # (not reached: a cycle of tight edges has distance 0, refused by check_graph)
            raise ValueError("twill simulator: a cycle of same-cycle dependences (total distance 0)")
        i = heapq.heappop(ready)
        tie[i] = r
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)

    def key(inst: int) -> int:  # (scheduled cycle, tie rank), as one int
        return (t0[inst % n] + inst // n * ii) * n + tie[inst % n]

    queues: list[list[int]] = [[] for _ in lanes]
    for it in range(n_it):
        for i in range(n):
            queues[lane_of[i]].append(it * n + i)
    for q in queues:
        q.sort(key=key)
    # per unit: the scheduled order of the instances holding it; each waits for its predecessor's issue
    prev_on_unit: dict[int, list[int]] = {}
    if unit_order:
        for u in caps:
            on = [i for i, v in enumerate(order) if any(ops[v]["reserve"].get(u, ()))]
            inst = sorted((it * n + i for it in range(n_it) for i in on), key=key)
            for a, b in zip(inst, inst[1:]):
                prev_on_unit.setdefault(b, []).append(a)
    busy: dict[str, dict[int, int]] = {u: {} for o in graph["ops"] for u in o["reserve"]}
    rows = [[(busy[u], k, cnt, caps.get(u, 0)) for u, row in ops[v]["reserve"].items()
             for k, cnt in enumerate(row) if cnt] for v in order]
    never_fits = [any(cnt > cap for _, _, cnt, cap in r) for r in rows]
    ins = [[(idx[e["from"]], e.get("distance", 0), e.get("delay", 0), extra[idx[e["from"]]],
             handoff if (warp and e.get("value", True) and e["from"] != v and lane[e["from"]] != lane[v]) else 0)
            for e in edges_in[v]] for v in order]
    outs = [[(idx[e["to"]], e.get("distance", 0) - depth[v], length[e["to"]]) for e in reuse[v]] for v in order]
    hold = [length[v] if (warp and ops[v].get("blocking")) else 1 for v in order]
    timed = mode == "timed"
    total = n_it * n
    patience = (sum(e.get("delay", 0) for e in graph["edges"]) + sum(length.values()) + ii * (stages + 2)
                + handoff * len(graph["edges"]) + jitter + 8)
    at = [-1] * total  # issue cycle of each instance, -1 before
    issued: dict[tuple[str, int], int] = {}
    head = [0] * len(lanes)
    free_at = [0] * len(lanes)
    NEVER = ~total  # below every ~instance

    def wait(inst: int, c: int) -> int:
        """0 when the instance can issue at cycle c, else what it waits for: a cycle > c (it cannot issue
        before), ~instance (that one's issue; < 0) or NEVER. Whatever is waited for is still missing at every
        earlier point, so a group need not be looked at again until it happens (units: busy only grows)."""
        i, it = inst % n, inst // n
        need = t0[i] + it * ii if timed else 0
        if c < need:
            return need
        for before in prev_on_unit.get(inst, ()):
            if at[before] < 0:
                return ~before
        for src, dist, delay, ext, hand in ins[i]:
            s_it = it - dist
            if s_it < 0:
                continue
            if s_it >= n_it:
                return NEVER
            t_src = at[s_it * n + src]
            if t_src < 0:
                return ~(s_it * n + src)
            t_src += delay + ext[s_it] + hand
            if t_src > need:
                need = t_src
        for dst, back, run in outs[i]:
            old = it + back
            if 0 <= old < n_it:
                t_old = at[old * n + dst]
                if t_old < 0:
                    return ~(old * n + dst)
                if t_old + run > need:
                    need = t_old + run
        if c < need:
            return need
        row = rows[i]
        for b, k, cnt, cap in row:
            if b.get(c + k, 0) + cnt > cap:
                if never_fits[i]:
                    return NEVER
                c += 1  # the first cycle it fits in now (busy is 0 past the last issue's tables: it ends)
                while any(b.get(c + k, 0) + cnt > cap for b, k, cnt, cap in row):
                    c += 1
                return c
        return 0

    def why_not(v: str, it: int, c: int) -> str:
        """The original readiness test: why v#it cannot issue at cycle c ('' when it can)."""
        if mode == "timed" and c < times[v] + it * ii:
            return "time"
        for before in prev_on_unit.get(it * n + idx[v], ()):
            if at[before] < 0:
                return f"unit order: {order[before % n]}#{before // n}"
        for e in edges_in[v]:
            src_it = it - e.get("distance", 0)
            if src_it < 0:
                continue
            t_src = issued.get((e["from"], src_it))
            if t_src is None:
                return f"{e['from']}#{src_it}"
            need = t_src + e.get("delay", 0) + extra[idx[e["from"]]][src_it]
            if warp and e.get("value", True) and e["from"] != v and lane[e["from"]] != lane[v]:
                need += handoff
            if c < need:
                return f"{e['from']}#{src_it}+{need - c}"
        for e in reuse[v]:
            old = it - depth[v] + e.get("distance", 0)
            if 0 <= old < n_it:
                t_old = issued.get((e["to"], old))
                if t_old is None:
                    return f"buffer of {v}: {e['to']}#{old}"
                if c < t_old + length[e["to"]]:
                    return f"buffer of {v}: {e['to']}#{old} running"
        for u, row in ops[v]["reserve"].items():
            for k, cnt in enumerate(row):
                if cnt and busy[u].get(c + k, 0) + cnt > caps.get(u, 0):
                    return f"unit {u}"
        return ""

    # Event-driven, with the result of the per-cycle loop it replaces: at each cycle, passes over the warp groups
    # in order, each issuing its next op when ready, until a pass issues nothing (a delay-0 dependant issues in
    # the same cycle as its source, whichever group comes first). A group is looked at only when what its next
    # op waited for may have happened: a cycle (timers), or an instance's issue (waiters; in this pass when the
    # group comes after the issuing one, else in the next pass).
    n_lanes = len(lanes)
    # a group's next op is looked at once the group is free (in timed mode: and at its scheduled cycle)
    timers = sorted((max(0, key(q[0]) // n) if timed else 0) * n_lanes + r for r, q in enumerate(queues) if q)
    waiters: dict[int, list[int]] = {}
    mark = [0] * n_lanes  # the pass a group is queued for
    push, pop = heapq.heappush, heapq.heappop
    checks = visited = passes = 0
    cycle = last_progress = 0
    count = 0
    while count < total:
        nxt = timers[0] // n_lanes if timers else None
        if nxt is None or nxt > last_progress + patience + 1:
            cycle = last_progress + patience + 1  # no op can issue before: the per-cycle loop gave up here
            break
        cycle = nxt
        visited += 1
        todo = []
        limit = (cycle + 1) * n_lanes
        while timers and timers[0] < limit:
            todo.append(pop(timers) - cycle * n_lanes)
        progressed = False
        while todo:
            passes += 1
            if len(todo) > 1:
                todo = sorted(set(todo))
            heap = todo
            for r in heap:
                mark[r] = passes
            todo = []
            while heap:
                r = pop(heap)
                if head[r] >= len(queues[r]) or free_at[r] > cycle:
                    continue
                inst = queues[r][head[r]]
                checks += 1
                w = wait(inst, cycle)
                if w > 0:
                    push(timers, w * n_lanes + r)
                    continue
                if w < 0:
                    if w != NEVER:
                        waiters.setdefault(~w, []).append(r)
                    continue
                i = inst % n
                at[inst] = cycle
                issued[(order[i], inst // n)] = cycle
                count += 1
                for b, k, cnt, _ in rows[i]:
                    b[cycle + k] = b.get(cycle + k, 0) + cnt
                free_at[r] = cycle + hold[i]
                head[r] += 1
                if head[r] < len(queues[r]):
                    nxt = queues[r][head[r]]
                    push(timers, max(free_at[r], t0[nxt % n] + nxt // n * ii if timed else 0) * n_lanes + r)
                progressed = True
                for g in waiters.pop(inst, ()):
                    if g > r:
                        if mark[g] != passes:
                            mark[g] = passes
                            push(heap, g)
                    else:
                        todo.append(g)
        if progressed:
            last_progress = cycle
        elif cycle - last_progress > patience:
            break
    if stats is not None:
        stats.update(checks=checks, cycles=visited)
    if count < total:  # deadlock: the per-cycle loop's last word is the last group's at its final cycle
        r = max(r for r in range(len(lanes)) if head[r] < len(queues[r]))
        inst = queues[r][head[r]]
        why = why_not(order[inst % n], inst // n, cycle)
        return SimResult(float("inf"), True, n_it, issued, f"{order[inst % n]}#{inst // n} waits on {why}")
    # a window clear of the drain: the last iterations have no successor competing for the units and issue
    # early (the toy loop measured 1.9855 cycles/iteration over the second half, below its proven I = 2)
    # the slowest op's rate: an op no buffer holds back (no value edges out) runs ahead of the loop, and the mean
    # over ops came out below a proved-minimal I (2.00 cycles/iteration for I = 3)
    h = n_it // 4
    end = max(h + 1, n_it - 1 - (stages + 2))
    cpi = max(steady_rate([issued[(v, it)] for it in range(h, end + 1)]) for v in order)
    return SimResult(cpi, False, n_it, issued, "")
