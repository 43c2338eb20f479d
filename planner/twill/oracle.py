"""Brute-force minimal initiation interval of plain modulo scheduling, for small graphs (tests).

Independent of the solver (plain dicts in). For I = 1, 2, ...: enumerate every residue assignment
r_v in [0, I) by backtracking, keeping only those whose reservation tables fit modulo I; for each, the
stages must satisfy the difference constraints k_v - k_u >= ceil((delay - I * distance - r_v + r_u) / I),
which have an integer solution iff that constraint graph has no positive cycle (Bellman-Ford). The first I
with a fitting assignment is the minimum; the schedule found is returned with it.
"""
from __future__ import annotations

__all__ = ["min_ii", "OracleTooBig"]


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
    raise OracleTooBig(f"no schedule up to I = {max_ii}")
