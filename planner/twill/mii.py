"""Lower bounds on the initiation interval: MII = max(ResMII, RecMII).

ResMII = max over units f of ceil(total reservation of f per iteration / cap(f)).
RecMII = the smallest I >= 1 such that no cycle is positive under edge weights d - I * distance (Bellman-Ford
longest paths; binary search on I, since every weight falls as I grows).
"""
from __future__ import annotations

from dataclasses import dataclass

from .graph import Problem

__all__ = ["MII", "res_mii", "rec_mii", "compute_mii", "has_positive_cycle", "longest_paths"]


@dataclass(frozen=True)
class MII:
    res: int
    rec: int

    @property
    def mii(self) -> int:
        return max(self.res, self.rec, 1)


def res_mii(problem: Problem) -> int:
    best = 1
    for unit, cap in problem.units.items():
        use = sum(o.usage(unit) for o in problem.graph.ops)
        if use == 0:
            continue
        if cap <= 0:
            raise ValueError(f"unit {unit!r} has no instances but ops reserve it")
        best = max(best, -(-use // cap))
    return best


def longest_paths(nodes, weighted) -> dict | None:
    """Bellman-Ford longest paths from a virtual source joined to every node with weight 0: the least
    solution of d[v] >= d[u] + w >= 0 over the (u, v, w) edges, or None when a cycle is positive."""
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


def has_positive_cycle(nodes: list[str], weighted: list[tuple[str, str, int]]) -> bool:
    return longest_paths(nodes, weighted) is None


def rec_mii(problem: Problem) -> int:
    g = problem.graph
    nodes = [o.name for o in g.ops]
    if not any(e.distance > 0 for e in g.edges):
        return 1

    def positive(ii: int) -> bool:
        return has_positive_cycle(nodes, [(e.src, e.dst, e.delay - ii * e.distance) for e in g.edges])

    lo, hi = 1, sum(e.delay for e in g.edges) + 1  # every cycle has distance >= 1 (checked), so hi is safe
    if not positive(lo):
        return 1
    while hi - lo > 1:  # invariant: positive(lo), not positive(hi)
        mid = (lo + hi) // 2
        if positive(mid):
            lo = mid
        else:
            hi = mid
    return hi


def compute_mii(problem: Problem) -> MII:
    return MII(res=res_mii(problem), rec=rec_mii(problem))
