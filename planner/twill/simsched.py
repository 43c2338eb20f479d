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

The result gives the steady-state cycles per iteration (mean issue-to-issue distance from a quarter of the
iterations to the last ones before the drain, i.e. stages + 2 from the end) and flags a deadlock (no op can ever issue again while work is left). Inputs are plain dicts
(the graph and machine JSON), so the simulator shares no code with the solver.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["SimResult", "simulate_schedule"]


@dataclass
class SimResult:
    cycles_per_iteration: float
    deadlock: bool
    iterations: int
    issued: dict[tuple[str, int], int] = field(default_factory=dict)
    stalled_on: str = ""


def simulate_schedule(graph: dict, machine: dict, ii: int, times: dict[str, int], groups: dict[str, int], *,
                      units: dict[str, int] | None = None, warp: bool = True, iterations: int | None = None,
                      mode: Literal["asap", "timed"] = "asap", jitter: int = 0, seed: int = 0,
                      unit_order: bool = True) -> SimResult:
    ops = {o["name"]: o for o in graph["ops"]}
    order = [o["name"] for o in graph["ops"]]
    caps = dict(units if units is not None else {**machine["units"], **(graph.get("units") or {})})
    handoff = int(machine.get("handoff_cycles", 0)) if warp else 0
    length = {v: max([len(r) for r in o["reserve"].values()] + [1]) for v, o in ops.items()}
    stages = max(times.values()) // ii + 1
    n_it = iterations or max(48, 6 * stages + 8)
    lane = dict(groups) if warp else {v: i for i, v in enumerate(order)}
    edges_in: dict[str, list[dict]] = {v: [] for v in order}
    for e in graph["edges"]:
        edges_in[e["to"]].append(e)
    # buffers: a value live L cycles has ceil(L / I) copies; instance it of u reuses the copy of it - depth,
    # so it waits until every consumer of that older copy has finished (the 'empty' barrier)
    life = dict(length)
    for e in graph["edges"]:
        if e.get("value", True) and e["from"] != e["to"]:
            end = times[e["to"]] + ii * e.get("distance", 0) + length[e["to"]]
            life[e["from"]] = max(life[e["from"]], end - times[e["from"]])
    depth = {v: max(1, -(-life[v] // ii)) for v in order}
    reuse: dict[str, list[dict]] = {v: [] for v in order}
    for e in graph["edges"]:
        if e.get("value", True) and e["from"] != e["to"]:
            reuse[e["from"]].append(e)
    rng = random.Random(seed)
    extra = {(v, it): (rng.randint(0, jitter) if jitter and ops[v].get("variable_latency") else 0)
             for v in order for it in range(n_it)}

    queues: dict[int, list[tuple[str, int]]] = {}
    for v in order:
        queues.setdefault(lane[v], [])
    for it in range(n_it):
        for v in order:
            queues[lane[v]].append((v, it))
    for q in queues.values():
        q.sort(key=lambda p: (times[p[0]] + p[1] * ii, order.index(p[0])))
    # per unit: the scheduled order of the instances holding it; each waits for its predecessor's issue
    prev_on_unit: dict[tuple[str, int], list[tuple[str, int]]] = {}
    if unit_order:
        for u in caps:
            inst = [(v, it) for it in range(n_it) for v in order if any(ops[v]["reserve"].get(u, ()))]
            inst.sort(key=lambda p: (times[p[0]] + p[1] * ii, order.index(p[0])))
            for a, b in zip(inst, inst[1:]):
                prev_on_unit.setdefault(b, []).append(a)
    head = {q: 0 for q in queues}
    free_at = {q: 0 for q in queues}
    busy: dict[tuple[str, int], int] = {}
    issued: dict[tuple[str, int], int] = {}
    total = n_it * len(order)
    patience = (sum(e.get("delay", 0) for e in graph["edges"]) + sum(length.values()) + ii * (stages + 2)
                + handoff * len(graph["edges"]) + jitter + 8)
    cycle = last_progress = 0
    stalled = ""

    def ready(v: str, it: int, c: int) -> str:
        if mode == "timed" and c < times[v] + it * ii:
            return "time"
        for before in prev_on_unit.get((v, it), ()):
            if before not in issued:
                return f"unit order: {before[0]}#{before[1]}"
        for e in edges_in[v]:
            src_it = it - e.get("distance", 0)
            if src_it < 0:
                continue
            t_src = issued.get((e["from"], src_it))
            if t_src is None:
                return f"{e['from']}#{src_it}"
            need = t_src + e.get("delay", 0) + extra[(e["from"], src_it)]
            if warp and e.get("value", True) and e["from"] != v and lane[e["from"]] != lane[v]:
                need += handoff
            if c < need:
                return f"{e['from']}#{src_it}+{need - c}"
        for e in reuse[v]:
            old = it - depth[v] + e.get("distance", 0)
            # a consumer instance past the last iteration never runs (it was waited for: a false deadlock on
            # every value read through a loop-carried edge of distance > its buffer depth)
            if 0 <= old < n_it:
                t_old = issued.get((e["to"], old))
                if t_old is None:
                    return f"buffer of {v}: {e['to']}#{old}"
                if c < t_old + length[e["to"]]:
                    return f"buffer of {v}: {e['to']}#{old} running"
        for u, row in ops[v]["reserve"].items():
            for k, cnt in enumerate(row):
                if cnt and busy.get((u, c + k), 0) + cnt > caps.get(u, 0):
                    return f"unit {u}"
        return ""

    while len(issued) < total:
        progressed = False
        again = True
        while again:  # passes until none issues: a delay-0 dependant issues in the same cycle as its source,
            again = False  # whichever lane comes first (one pass delayed it a cycle when its lane came first)
            for q in sorted(queues):
                if head[q] >= len(queues[q]) or free_at[q] > cycle:
                    continue
                v, it = queues[q][head[q]]
                why = ready(v, it, cycle)
                if why:
                    stalled = f"{v}#{it} waits on {why}"
                    continue
                issued[(v, it)] = cycle
                for u, row in ops[v]["reserve"].items():
                    for k, cnt in enumerate(row):
                        if cnt:
                            busy[(u, cycle + k)] = busy.get((u, cycle + k), 0) + cnt
                free_at[q] = cycle + (length[v] if (warp and ops[v].get("blocking")) else 1)
                head[q] += 1
                progressed = again = True
        if progressed:
            last_progress = cycle
        elif cycle - last_progress > patience:
            return SimResult(float("inf"), True, n_it, issued, stalled)
        cycle += 1
    # a window clear of the drain: the last iterations have no successor competing for the units and issue
    # early (the toy loop measured 1.9855 cycles/iteration over the second half, below its proven I = 2)
    h = n_it // 4
    end = max(h + 1, n_it - 1 - (stages + 2))
    cpi = sum(issued[(v, end)] - issued[(v, h)] for v in order) / (len(order) * (end - h))
    return SimResult(cpi, False, n_it, issued, "")
