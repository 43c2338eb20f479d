"""Independent checker of an emitted Twill schedule (shares no code with the solver: plain dicts in).

``validate(graph, machine, plan)`` takes the graph and machine JSON (dicts) and a plan dict (a TwillPlan
dumped to JSON, or any dict with ``ii``, ``ops`` [{name, issue_cycle, warp_group}], ``buffers`` and
``warp_specialised``) and returns the list of violated rules (empty = valid):

- every op scheduled exactly once at a cycle >= 0, with stage/residue consistent with I;
- dependences: t_v + I * distance - t_u >= delay (+ handoff when the value crosses warp groups);
- reservation tables modulo I: for every unit and residue, the units held <= the count (graph overrides
  machine);
- warp mode: at most max_warp_groups groups; variable-latency ops share groups only with each other; each
  group issues at most one op per residue and a blocking op holds its group for its whole length; every held
  value has at least ceil(lifetime / I) buffers (lifetime: until its last consumer finishes); registers per
  group (base + sum regs * buffers) within the per-group cap, their sum within the register file; shared
  memory (sum smem * buffers) within capacity.
"""
from __future__ import annotations

__all__ = ["validate"]


def _len(op: dict) -> int:
    rows = [len(r) for r in op["reserve"].values()]
    return max(rows) if rows else 1


def validate(graph: dict, machine: dict, plan: dict) -> list[str]:
    errs: list[str] = []
    ii = int(plan["ii"])
    if ii < 1:
        return [f"ii = {ii} < 1"]
    ops = {o["name"]: o for o in graph["ops"]}
    if len(ops) != len(graph["ops"]):  # (the dict kept the last of each name: a hidden op's units went unchecked)
        names = [o["name"] for o in graph["ops"]]
        return [f"graph: op {n!r} defined {names.count(n)} times" for n in sorted(set(names)) if names.count(n) > 1]
    slots = {}
    for s in plan["ops"]:
        if s["name"] in slots:
            errs.append(f"op {s['name']} scheduled twice")
        slots[s["name"]] = s
    for name in ops:
        if name not in slots:
            errs.append(f"op {name} not scheduled")
    for name in slots:
        if name not in ops:
            errs.append(f"scheduled op {name} is not in the graph")
    if errs:
        return errs
    t = {v: int(s["issue_cycle"]) for v, s in slots.items()}
    warp = bool(plan.get("warp_specialised", False))
    grp = {v: int(s.get("warp_group", 0)) for v, s in slots.items()}
    for v, s in slots.items():
        if t[v] < 0:
            errs.append(f"op {v} issues at {t[v]} < 0")
        if "stage" in s and s["stage"] != t[v] // ii:
            errs.append(f"op {v}: stage {s['stage']} != {t[v]} // {ii}")
        if "residue" in s and s["residue"] != t[v] % ii:
            errs.append(f"op {v}: residue {s['residue']} != {t[v]} % {ii}")

    # dependences
    hand = int(machine.get("handoff_cycles", 0))
    for e in graph.get("edges", []):
        u, v = e["from"], e["to"]
        need = e.get("delay", 0)
        if warp and e.get("value", True) and u != v and grp[u] != grp[v]:
            need += hand
        got = t[v] + ii * e.get("distance", 0) - t[u]
        if got < need:
            errs.append(f"edge {u}->{v}: issue distance {got} < required {need}")

    # reservation tables modulo I
    caps = dict(machine["units"])
    caps.update(graph.get("units") or {})
    table: dict[tuple[str, int], int] = {}
    for v, op in ops.items():
        for unit, row in op["reserve"].items():
            for c, cnt in enumerate(row):
                key = (unit, (t[v] + c) % ii)
                table[key] = table.get(key, 0) + cnt
    for (unit, r), used in sorted(table.items()):
        if used > caps.get(unit, 0):
            errs.append(f"unit {unit} at residue {r}: {used} held > {caps.get(unit, 0)} available")

    if not warp:
        return errs

    # warp groups
    used_groups = sorted(set(grp.values()))
    if len(used_groups) > machine["max_warp_groups"]:
        errs.append(f"{len(used_groups)} warp groups > max {machine['max_warp_groups']}")
    for q in used_groups:
        members = [v for v in ops if grp[v] == q]
        kinds = {bool(ops[v].get("variable_latency")) for v in members}
        if kinds == {True, False}:
            errs.append(f"warp group {q} mixes variable-latency and fixed-latency ops: {members}")
        slot_use: dict[int, list[str]] = {}
        for v in members:
            hold = _len(ops[v]) if ops[v].get("blocking") else 1
            for c in range(hold):
                slot_use.setdefault((t[v] + c) % ii, []).append(v)
        for r, who in sorted(slot_use.items()):
            if len(who) > 1:
                errs.append(f"warp group {q} issues {who} in the same cycle (residue {r})")

    # lifetimes -> buffers, registers, shared memory
    life = {v: _len(op) for v, op in ops.items()}
    for e in graph.get("edges", []):
        u, v = e["from"], e["to"]
        dist = e.get("distance", 0)
        if e.get("value", True) and (u != v or dist >= 2):  # a self-loop writes in place: d - 1 later instances
            life[u] = max(life[u], t[v] + ii * (dist - (u == v)) + _len(ops[v]) - t[u])
    buffers = plan.get("buffers", {})
    depth = {}
    for v, op in ops.items():
        if not (op.get("regs") or op.get("smem")):
            continue
        need = -(-life[v] // ii)
        have = int(buffers.get(v, 0))
        if have < need:
            errs.append(f"value {v}: {have} buffers < {need} needed (live {life[v]} cycles at I = {ii})")
        depth[v] = max(have, need)
    base = int(machine.get("group_base_regs", 0))
    total = 0
    for q in used_groups:
        regs = base + sum((ops[v].get("regs") or 0) * depth.get(v, 1) for v in ops if grp[v] == q)
        total += regs
        if regs > machine["regs_per_group_max"]:
            errs.append(f"warp group {q}: {regs} registers per thread > {machine['regs_per_group_max']}")
    if total > machine["regs_total"]:
        errs.append(f"registers over all warp groups: {total} > {machine['regs_total']}")
    smem = sum((ops[v].get("smem") or 0) * depth.get(v, 1) for v in ops)
    if smem > machine["smem_capacity"]:
        errs.append(f"shared memory {smem} KiB > {machine['smem_capacity']} KiB")
    return errs
