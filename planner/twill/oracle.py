"""Brute-force minimal initiation interval of plain modulo scheduling, for small graphs (tests).

Independent of the solver (plain dicts in). For I = 1, 2, ...: enumerate every residue assignment
r_v in [0, I) by backtracking, keeping only those whose reservation tables fit modulo I; for each, the
stages must satisfy the difference constraints k_v - k_u >= ceil((delay - I * distance - r_v + r_u) / I),
which have an integer solution iff that constraint graph has no positive cycle (Bellman-Ford). The first I
with a fitting assignment is the minimum; the schedule found is returned with it.
"""
from __future__ import annotations

import itertools

__all__ = ["min_ii", "min_ii_warp", "OracleTooBig"]


class OracleTooBig(RuntimeError):
    pass


def _stages(names: list[str], edges: list[dict], ii: int, r: dict[str, int]) -> dict[str, int] | None:
    w = [(e["from"], e["to"], -(-(e.get("delay", 0) - ii * e.get("distance", 0) - r[e["to"]] + r[e["from"]]) // ii))
         for e in edges]
    k = {v: 0 for v in names}
    for _ in range(len(names) + 1):
        changed = False
        for u, v, c in w:
            if k[u] + c > k[v]:
                k[v] = k[u] + c
                changed = True
        if not changed:
            lo = min(k.values())
            return {v: k[v] - lo for v in names}
    return None


def min_ii(graph: dict, machine: dict | None = None, *, max_ii: int = 64,
           max_leaves: int = 2_000_000) -> tuple[int, dict[str, int]]:
    """(minimal I, issue cycles) of the plain modulo-scheduling problem by exhaustive search."""
    caps = dict((machine or {}).get("units", {}))
    caps.update(graph.get("units") or {})
    ops = graph["ops"]
    names = [o["name"] for o in ops]
    edges = graph.get("edges", [])
    leaves = 0
    for ii in range(1, max_ii + 1):
        # occupancy of each op at residue offset: (unit, offset mod I) -> count
        occ = []
        for o in ops:
            d: dict[tuple[str, int], int] = {}
            for u, row in o["reserve"].items():
                for c, n in enumerate(row):
                    if n:
                        d[(u, c % ii)] = d.get((u, c % ii), 0) + n
            occ.append(d)
        if any(n > caps.get(u, 0) for d in occ for (u, _), n in d.items()):
            continue
        load: dict[tuple[str, int], int] = {}
        r: dict[str, int] = {}
        found: list[dict[str, int]] = []

        def place(i: int) -> bool:
            nonlocal leaves
            if i == len(ops):
                leaves += 1
                if leaves > max_leaves:
                    raise OracleTooBig(f"more than {max_leaves} residue assignments")
                k = _stages(names, edges, ii, r)
                if k is not None:
                    found.append({v: ii * k[v] + r[v] for v in names})
                    return True
                return False
            for ri in range(ii):
                cells = [((u, (ri + c) % ii), n) for (u, c), n in occ[i].items()]
                if all(load.get(cell, 0) + n <= caps.get(cell[0], 0) for cell, n in cells):
                    for cell, n in cells:
                        load[cell] = load.get(cell, 0) + n
                    r[names[i]] = ri
                    ok = place(i + 1)
                    for cell, n in cells:
                        load[cell] -= n
                    if ok:
                        return True
            return False

        if place(0):
            return ii, found[0]
    raise ValueError(f"no schedule up to I = {max_ii}")


def _partitions(n: int, max_groups: int):
    """Group labels for n items in canonical form (restricted growth strings), at most max_groups groups."""
    labels = [0] * n

    def rec(i: int, top: int):
        if i == n:
            yield list(labels)
            return
        for q in range(min(top + 2, max_groups)):
            labels[i] = q
            yield from rec(i + 1, max(top, q))

    if n:
        yield from rec(1, 0)


def min_ii_warp(graph: dict, machine: dict, *, max_ii: int = 32, max_copies: int = 16,
                max_leaves: int = 3_000_000) -> tuple[int, int]:
    """(minimal I, fewest warp groups at that I) of the joint problem, by exhaustive search (tiny graphs).

    Enumerates every grouping (set partitions up to max_warp_groups; variable-latency ops only with each other),
    every residue vector (pruned by unit rows and per-group issue slots, a blocking op holding its slot for its
    length) and every buffer count (1..max_copies, within the value's own budget) of each value holding registers or shared memory that fits
    the register and shared-memory budgets (only the maximal such vectors: more buffers never hurt the
    stages); the stages then solve difference constraints with lower bounds
    (dependences, +handoff across groups) and upper bounds (lifetime <= copies * I), feasible iff no positive
    cycle."""
    caps = dict(machine.get("units", {}))
    caps.update(graph.get("units") or {})
    ops = graph["ops"]
    names = [o["name"] for o in ops]
    n = len(ops)
    idx = {v: i for i, v in enumerate(names)}
    edges = graph.get("edges", [])
    length = [max([len(r) for r in o["reserve"].values()] + [1]) for o in ops]
    hold = [length[i] if o.get("blocking") else 1 for i, o in enumerate(ops)]
    varlat = [bool(o.get("variable_latency")) for o in ops]
    held = [i for i, o in enumerate(ops) if (o.get("regs") or 0) > 0 or (o.get("smem") or 0) > 0]
    hand = int(machine.get("handoff_cycles", 0))
    base = int(machine.get("group_base_regs", 0))
    copy_caps = []  # a value cannot have more buffers than its own budget allows
    for i in held:
        top = max_copies
        if ops[i].get("smem"):
            top = min(top, machine["smem_capacity"] // ops[i]["smem"])
        if ops[i].get("regs"):
            top = min(top, (machine["regs_per_group_max"] - base) // ops[i]["regs"])
        copy_caps.append(max(top, 1))
    leaves = 0
    for ii in range(1, max_ii + 1):
        best_groups = None
        occ = []
        for o in ops:
            d: dict[tuple[str, int], int] = {}
            for u, row in o["reserve"].items():
                for c, cnt in enumerate(row):
                    if cnt:
                        d[(u, c % ii)] = d.get((u, c % ii), 0) + cnt
            occ.append(d)
        if any(cnt > caps.get(u, 0) for d in occ for (u, _), cnt in d.items()):
            continue
        for grp in _partitions(n, machine["max_warp_groups"]):
            ngroups = max(grp) + 1
            if best_groups is not None and ngroups >= best_groups:
                continue
            if any(varlat[i] != varlat[j] and grp[i] == grp[j] for i in range(n) for j in range(n)):
                continue
            load: dict[tuple, int] = {}
            r = [0] * n

            def feasible_stages(copies: dict[int, int]) -> bool:
                cons = []  # (src, dst, w): k_dst >= k_src + w
                for e in edges:
                    u, v = idx[e["from"]], idx[e["to"]]
                    low = e.get("delay", 0) - ii * e.get("distance", 0)
                    if e.get("value", True) and u != v and grp[u] != grp[v]:
                        low += hand
                    cons.append((u, v, -(-(low - r[v] + r[u]) // ii)))
                for i in held:
                    if length[i] > copies[i] * ii:
                        return False
                    for e in edges:
                        d = e.get("distance", 0)
                        if e["from"] == names[i] and e.get("value", True) and (e["to"] != e["from"] or d >= 2):
                            w = idx[e["to"]]
                            # (a self-loop writes in place: its value lasts until the instance d - 1 later ends)
                            up = copies[i] * ii - ii * (d - (w == i)) - length[w]  # t_w - t_i <= up
                            cons.append((w, i, -((up - r[w] + r[i]) // ii)))
                k = [0] * n
                for _ in range(n + 1):
                    changed = False
                    for a, b, w in cons:
                        if k[a] + w > k[b]:
                            k[b] = k[a] + w
                            changed = True
                    if not changed:
                        return True
                return False

            def budgets_ok(copies: dict[int, int]) -> bool:
                total = 0
                for q in range(ngroups):
                    regs = base + sum((ops[i].get("regs") or 0) * copies.get(i, 1) for i in range(n) if grp[i] == q)
                    if regs > machine["regs_per_group_max"]:
                        return False
                    total += regs
                smem = sum((ops[i].get("smem") or 0) * copies.get(i, 1) for i in range(n))
                return total <= machine["regs_total"] and smem <= machine["smem_capacity"]

            fitting = [dict(zip(held, combo)) for combo in itertools.product(*(range(1, top + 1) for top in copy_caps))]
            fitting = [c for c in fitting if budgets_ok(c)]  # budgets depend on the grouping only
            # more buffers only relax the stage constraints: the maximal fitting buffer vectors suffice
            fitting = [c for c in fitting if not any(d != c and all(d[h] >= c[h] for h in held) for d in fitting)]
            if not fitting:
                continue

            def place(i: int) -> bool:
                nonlocal leaves
                if i == n:
                    for copies in fitting:
                        leaves += 1
                        if leaves > max_leaves:
                            raise OracleTooBig(f"more than {max_leaves} stage checks")
                        if feasible_stages(copies):
                            return True
                    return False
                for ri in range(ii):
                    cells = [((u, (ri + c) % ii), cnt) for (u, c), cnt in occ[i].items()]
                    cells += [(("#group", grp[i], (ri + c) % ii), 1) for c in range(hold[i])]
                    limit = {cell: (1 if cell[0] == "#group" else caps.get(cell[0], 0)) for cell, _ in cells}
                    tmp: dict = {}
                    for cell, cnt in cells:
                        tmp[cell] = tmp.get(cell, 0) + cnt
                    if all(load.get(cell, 0) + cnt <= limit[cell] for cell, cnt in tmp.items()):
                        for cell, cnt in tmp.items():
                            load[cell] = load.get(cell, 0) + cnt
                        r[i] = ri
                        ok = place(i + 1)
                        for cell, cnt in tmp.items():
                            load[cell] -= cnt
                        if ok:
                            return True
                return False

            if place(0):
                best_groups = ngroups
        if best_groups is not None:
            return ii, best_groups
    raise ValueError(f"no warp schedule up to I = {max_ii}")
