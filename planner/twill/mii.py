"""Lower bounds on the initiation interval: MII = max(ResMII, RecMII).

ResMII = max over units f of ceil(total reservation of f per iteration / cap(f)).
RecMII = the smallest I >= 1 such that no cycle is positive under edge weights d - I * distance (Bellman-Ford
longest paths; binary search on I, since every weight falls as I grows).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .graph import Problem

__all__ = ["MII", "res_mii", "rec_mii", "compute_mii", "has_positive_cycle", "longest_paths",
           "longest_paths_or_cycle", "rec_mii_bound"]


@dataclass(frozen=True)
class MII:
    res: int
    rec: int
    exact: bool = True
    """False when a deadline stopped the RecMII search: ``rec`` is then only a lower bound on RecMII (every use of
    MII here is as a lower bound on I, so that stays sound)."""

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
    solution of d[v] >= d[u] + w >= 0 over the (u, v, w) edges, or None when a cycle is positive.

    Queue-based (only the successors of a node whose value rose are relaxed again), with the predecessor graph
    checked for a cycle after every n improvements (a cycle there is a positive cycle of the graph), and an
    improving path of more than n edges as a last resort: the same least solution as the round-based version,
    with far fewer relaxations on the near-acyclic graphs here, and a positive cycle found after a few laps of it
    instead of n rounds over every edge."""
    return longest_paths_or_cycle(nodes, weighted)[0]


def longest_paths_or_cycle(nodes, weighted) -> tuple[dict | None, list | None]:
    """(:func:`longest_paths`' solution, None), or (None, the nodes of a positive cycle in edge order: each
    node's successor on the cycle is the next one, the last's is the first)."""
    dist = {n: 0 for n in nodes}
    succ: dict = {n: [] for n in dist}
    for u, v, w in weighted:
        succ[u].append((v, w))
    n = len(dist)
    pred: dict = {}
    hops = dict.fromkeys(dist, 0)  # edges on the improving path that set dist[v]
    queue = deque(dist)
    queued = set(dist)
    since = 0
    while queue:
        u = queue.popleft()
        queued.discard(u)
        du, hu = dist[u], hops[u] + 1
        for v, w in succ[u]:
            if du + w > dist[v]:
                dist[v] = du + w
                hops[v] = hu
                pred[v] = u
                since += 1
                if hu > n or since >= n:  # an improving path of > n edges repeats a node; or a periodic check
                    since = 0
                    cyc = _pred_cycle(pred)
                    if cyc is not None:
                        return None, cyc
                if v not in queued:
                    queued.add(v)
                    queue.append(v)
    return dist, None


def _pred_cycle(pred: dict) -> list | None:
    """A cycle closed by the predecessor links (v -> pred[v]) in edge order (pred[x] -> x), or None. A cycle
    there is a positive cycle of the graph (each link was set by a strict improvement)."""
    state: dict = {}  # 1: on the current walk, 2: known to reach a root
    for start in pred:
        if start in state:
            continue
        walk = []
        v = start
        while v in pred and v not in state:
            state[v] = 1
            walk.append(v)
            v = pred[v]
        if state.get(v) == 1:
            cyc = walk[walk.index(v):]  # v, pred[v], pred[pred[v]], ...: edges run backwards along the walk
            return cyc[::-1]
        for x in walk:
            state[x] = 2
    return None


def has_positive_cycle(nodes: list[str], weighted: list[tuple[str, str, int]]) -> bool:
    return longest_paths(nodes, weighted) is None


def rec_mii(problem: Problem, deadline: float | None = None) -> int:
    """RecMII; with ``deadline`` (a ``time.perf_counter()`` value) checked between the bisection's steps, a lower
    bound on it when the deadline passes first (see :func:`rec_mii_bound`)."""
    return rec_mii_bound(problem, deadline)[0]


def rec_mii_bound(problem: Problem, deadline: float | None = None) -> tuple[int, bool]:
    """(RecMII, True), or (a lower bound on it, False) when ``deadline`` passed before the bisection ended (each
    step is one longest-path pass: ~1 ms on 120 ops, ~15 ms on 1000)."""
    g = problem.graph
    nodes = [o.name for o in g.ops]
    if not any(e.distance > 0 for e in g.edges):
        return 1, True

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    def positive(ii: int) -> bool:
        return has_positive_cycle(nodes, [(e.src, e.dst, e.delay - ii * e.distance) for e in g.edges])

    lo, hi = 1, sum(e.delay for e in g.edges) + 1  # every cycle has distance >= 1 (checked), so hi is safe
    if late():
        return 1, False
    if not positive(lo):
        return 1, True
    while hi - lo > 1:  # invariant: positive(lo), not positive(hi)
        if late():
            return lo + 1, False  # positive(lo): RecMII > lo
        mid = (lo + hi) // 2
        if positive(mid):
            lo = mid
        else:
            hi = mid
    return hi, True


def compute_mii(problem: Problem, deadline: float | None = None) -> MII:
    """ResMII and RecMII; past ``deadline`` (``time.perf_counter()`` value) RecMII is a lower bound (``exact``
    False)."""
    rec, exact = rec_mii_bound(problem, deadline)
    return MII(res=res_mii(problem), rec=rec, exact=exact)
