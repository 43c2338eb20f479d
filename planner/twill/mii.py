"""Lower bounds on the initiation interval: MII = max(ResMII, RecMII, the exclusive-cells bound).

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
           "longest_paths_or_cycle", "rec_mii_bound",
           "exclusive_mii"]


@dataclass(frozen=True)
class MII:
    res: int
    rec: int
    exact: bool = True
    """False when a deadline stopped the RecMII search: ``rec`` is then only a lower bound on RecMII (every use of
    MII here is as a lower bound on I, so that stays sound)."""
    excl: int = 0
    """The exclusive-cells bound (:func:`exclusive_mii`), when it is above ResMII and RecMII (else 0)."""

    @property
    def mii(self) -> int:
        return max(self.res, self.rec, self.excl, 1)


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


def _exclusive(rows: list[list[int]], cap: int) -> tuple[int, int, int]:
    """(E, N, span) of one unit: E cells held at full capacity, N a lower bound on the residues that cannot be
    full, span the longest stretch from an op's first to its last non-zero cell (see :func:`exclusive_mii`)."""
    full = left = right = span = 0
    for row in rows:
        nz = [c for c, n in enumerate(row) if n]
        if not nz:
            continue
        span = max(span, nz[-1] - nz[0] + 1)
        full += sum(1 for n in row if n == cap)
        for c, n in enumerate(row):
            if n != cap:
                continue
            p = 0  # partial cells right before this full one (a run of its own full cells counts once)
            while c - p - 1 >= 0 and 0 < row[c - p - 1] < cap:
                p += 1
            left += p
            q = 0
            while c + q + 1 < len(row) and 0 < row[c + q + 1] < cap:
                q += 1
            right += q
    return full, max(left, right), span


def exclusive_mii(problem: Problem, start: int = 1) -> int:
    """The smallest I >= ``start`` that the exclusive-cells bound does not rule out (``start`` when none is ruled
    out), per unit f of capacity C:

    A cell where an op holds all C units is *full*: at its residue no other op holds f (E full cells, at distinct
    residues). A run of p partial cells (0 < count < C) right before an op's full cell lies on p residues that are
    not full, right before a full residue; two such runs of different full cells never share a residue (the later
    one would contain the earlier one's full residue), so at least N_L = sum of those p residues are not full; the
    same for runs right after full cells (N_R). So I >= E + max(N_L, N_R) whenever no op spans more than I cycles
    from its first to its last non-zero cell (then an op's cells fall on distinct residues). ResMII is this
    bound's special case with no partial runs next to full cells counted, so it is never weaker; with capacity
    1 every held cell is full and it equals ResMII. E.g. random_graph(20, 3, scale=32): ALU (2 units) has 15 x 32
    full cycles and partial runs of 6 x 32 before full ones: I >= 672, where ResMII = 640."""
    best = max(start, 1)
    bounds = []
    for unit, cap in problem.units.items():
        if cap <= 0:
            continue
        rows = [o.reserve[unit] for o in problem.graph.ops if unit in o.reserve]
        full, n, span = _exclusive(rows, cap)
        if n:
            bounds.append((full + n, span))
    changed = True
    while changed:  # every I in [span, bound) is ruled out; raising I may bring another unit's window into play
        changed = False
        for bound, span in bounds:
            if span <= best < bound:
                best, changed = bound, True
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
    res = res_mii(problem)
    excl = exclusive_mii(problem, max(res, rec))
    return MII(res=res, rec=rec, exact=exact, excl=excl if excl > max(res, rec) else 0)
