"""Iterative modulo scheduling (after Rau's IMS): a fast schedule when CP-SAT has none, and its warm start.

At a fixed I, ops are taken highest *height* first (longest path to the end of the graph under edge weights
delay - I * distance); each goes to the first cycle from its earliest start (the latest of its scheduled
predecessors' issue + delay) whose reservation table fits the modulo reservation table (MRT). When no cycle in
[earliest, earliest + I) fits, it is forced in at the earliest start (or one cycle after where it last was) and
the ops it collides with - on a unit row or on a dependence with an already scheduled successor - are taken out
and rescheduled later. An op with no scheduled predecessor but scheduled successors goes as late as those allow.
A budget of placements bounds the work; when it runs out, I is raised.

Warp problem: a fixed assignment is tried for each count of consumer groups (variable-latency ops on one
producer group; the others spread over the consumer groups by a greedy that keeps value edges inside a group and
balances issue slots and registers); each group's issue slot (one op per cycle, a blocking op holding it for its
length) is one more row of the MRT, and a value crossing groups gets the machine's handoff added to its edge.
After scheduling, buffer depths (ceil(lifetime / I)) must fit the register and shared-memory budgets.

The search over I starts at a lower bound, steps by 1 four times, then gallops (doubling steps) to the first I
that schedules, and bisects back between the last failure and that success (feasibility is not monotone in I,
so this is a heuristic search, not a proof). A ``deadline`` stops all of it (a pass checks the clock every 16
placements), the search for a first schedule included. The result is checked by the independent validator before
it is returned; nothing here proves anything about optimality.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .graph import Problem
from .knobs import buffer_depths
from .mii import compute_mii, longest_paths, longest_paths_or_cycle

__all__ = ["HeuristicSchedule", "modulo_schedule", "heuristic_schedule", "assignments"]


@dataclass
class HeuristicSchedule:
    ii: int
    times: dict[str, int]
    groups: dict[str, int]
    copies: dict[str, int]
    warp: bool
    seconds: float = 0.0
    tried: list[int] = field(default_factory=list)
    """Every I the search tried, in order."""
    source: str = "iterative modulo scheduling"
    method: str = "heuristic"
    """The plan's ``method`` when this schedule is the answer: 'heuristic', or 'cp-sat-coarse' (CP-SAT in a
    coarser time unit, scaled back)."""


def _fold(row: list[int], ii: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for c, n in enumerate(row):
        if n:
            out[c % ii] = out.get(c % ii, 0) + n
    return out


def _runs_of(offs: np.ndarray, cnt: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, length, count) runs of consecutive residues with equal count (disjoint, covering offs)."""
    order = np.argsort(offs)
    out: list[tuple[int, int, int]] = []
    for o, c in zip(offs[order].tolist(), cnt[order].tolist()):
        if out and out[-1][2] == c and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + 1, c)
        else:
            out.append((o, 1, c))
    return out


def _window_max(a: np.ndarray, size: int) -> np.ndarray:
    """m[x] = max(a[x], ..., a[x + size - 1]) over the circular array a (doubling: O(len(a) log size))."""
    m, p = a, 1
    while 2 * p <= size:
        m = np.maximum(m, np.roll(m, -p))
        p *= 2
    return np.maximum(m, np.roll(m, -(size - p)))


def modulo_schedule(problem: Problem, ii: int, groups: dict[str, int] | None = None, *,
                    budget_ratio: int = 8, deadline: float | None = None) -> dict[str, int] | None:
    """Issue cycles of one modulo schedule at ``ii`` (with warp-group issue slots and handoffs when ``groups``
    is given), or None when the placement budget runs out, the grouping makes a recurrence too long, or
    ``deadline`` (a ``time.perf_counter()`` value, checked every 16 placements) passes."""
    g, m = problem.graph, problem.machine
    names = [o.name for o in g.ops]
    idx = {v: i for i, v in enumerate(names)}
    n = len(names)
    hand = m.handoff_cycles if groups is not None else 0

    # ---- modulo reservation rows: key -> capacity; per op [(key, folded offsets, counts)] --------------
    caps: dict[object, int] = dict(problem.units)
    cells: list[list[tuple[object, np.ndarray, np.ndarray]]] = []
    for o in g.ops:
        rows = {u: _fold(r, ii) for u, r in o.reserve.items()}
        if groups is not None:
            key = ("#group", groups[o.name])
            caps[key] = 1
            rows[key] = _fold([1] * (o.length if o.blocking else 1), ii)
        mine = []
        for key, fold in rows.items():
            if not fold:
                continue
            offs = np.fromiter(fold.keys(), dtype=np.int64)
            cnt = np.fromiter(fold.values(), dtype=np.int64)
            if cnt.max() > caps.get(key, 0):
                return None  # the op collides with itself at this I
            mine.append((key, offs, cnt))
        cells.append(mine)

    # ---- dependences with their weights at this I ------------------------------------------------------
    preds: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    succs: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    weighted = []
    for e in g.edges:
        u, v = idx[e.src], idx[e.dst]
        w = e.delay - ii * e.distance
        if groups is not None and e.value and u != v and groups[e.src] != groups[e.dst]:
            w += hand
        if u == v:
            if w > 0:
                return None
            continue
        preds[v].append((u, w))
        succs[u].append((v, w))
        weighted.append((u, v, w))
    height = longest_paths(range(n), [(v, u, w) for u, v, w in weighted])  # to the end of the graph
    if height is None:
        return None  # positive cycle: no schedule at this I (with these groups)
    order = sorted(range(n), key=lambda i: (-height[i], i))

    # ---- iterative scheduling ----------------------------------------------------------------------------
    t: list[int | None] = [None] * n
    last: list[int | None] = [None] * n

    # the MRT as Python lists (one cell read per check: a candidate cycle is tried cell by cell, stopping at the
    # first that is full, and most ops fit at one of the first cycles tried), who holds each (key, residue), and
    # per op its cells as (row, room = cap - count, offset)
    occ_l = {key: [0] * ii for key in caps}
    holders: dict[object, dict[int, set[int]]] = {key: {} for key in caps}
    flat = [[(occ_l[key], caps[key] - c, o) for key, offs, cnt in mine for o, c in zip(offs.tolist(), cnt.tolist())]
            for mine in cells]
    # the folded table as disjoint runs of equal count: a run of length L fits at residue r when the largest
    # occupancy in its window is at most cap - count (window maxima cost O(I log L), not O(I L)); used for the
    # whole window at once when a few cycles tried one by one do not fit
    runs = [[(key, _runs_of(offs, cnt)) for key, offs, cnt in mine] for mine in cells]

    def fits(i: int) -> np.ndarray:
        """ok[r]: op i fits the MRT when issued at residue r."""
        ok = np.ones(ii, dtype=bool)
        for key, rows in runs[i]:
            row = np.asarray(occ_l[key], dtype=np.int64)
            wmax: dict[int, np.ndarray] = {}
            for start, size, cnt in rows:
                if size not in wmax:
                    wmax[size] = _window_max(row, size)
                ok &= np.roll(wmax[size], -start) + cnt <= caps[key]
        return ok

    def fits_at(i: int, c: int) -> bool:
        for row, room, o in flat[i]:
            if row[(c + o) % ii] > room:
                return False
        return True

    def first_fit(i: int, lo: int, hi: int, forward: bool) -> int | None:
        """The first cycle of [lo, hi] (from lo when ``forward``, else from hi) where op i fits, or None."""
        span = range(lo, hi + 1) if forward else range(hi, lo - 1, -1)
        # one by one while cheap (a whole short window; else its first cycles, then the window maxima)
        few = len(span) if len(span) * len(flat[i]) <= 2048 else min(len(span), max(2, 256 // max(1, len(flat[i]))))
        for c in span[:few]:
            if fits_at(i, c):
                return c
        if few == len(span):
            return None
        rest = np.arange(span[few], span[-1] + (1 if forward else -1), 1 if forward else -1, dtype=np.int64)
        ok = fits(i)[rest % ii]
        return int(rest[int(np.argmax(ok))]) if ok.any() else None

    mine_l = [[(occ_l[key], holders[key], o, c) for key, offs, cnt in mine
               for o, c in zip(offs.tolist(), cnt.tolist())] for mine in cells]

    def place(i: int, at: int, sign: int) -> None:
        if sign > 0:
            for row, who, o, c in mine_l[i]:
                r = (at + o) % ii
                row[r] += c
                who.setdefault(r, set()).add(i)
        else:
            for row, who, o, c in mine_l[i]:
                r = (at + o) % ii
                row[r] -= c
                who[r].discard(i)

    # the unscheduled op of highest priority: a heap of positions in ``order`` (lazy: stale entries skipped)
    pos = {v: p for p, v in enumerate(order)}
    todo = list(range(n))  # positions, already a heap

    def unschedule(j: int) -> None:
        place(j, t[j], -1)
        t[j] = None
        heapq.heappush(todo, pos[j])

    budget = budget_ratio * n
    while budget > 0:
        while todo and t[order[todo[0]]] is not None:
            heapq.heappop(todo)
        if not todo:
            break
        i = order[heapq.heappop(todo)]
        budget -= 1
        if deadline is not None and budget % 16 == 0 and time.perf_counter() >= deadline:
            return None
        est = [t[u] + w for u, w in preds[i] if t[u] is not None]
        lst = [t[s] - w for s, w in succs[i] if t[s] is not None]
        if est:
            lo = max(est)
            hi = min([lo + ii - 1] + lst)
            forward = True
        elif lst:
            hi = min(lst)
            lo = hi - ii + 1
            forward = False
        else:
            lo, hi, forward = 0, ii - 1, True
        chosen = first_fit(i, lo, hi, forward) if lo <= hi else None
        if chosen is None:  # force it in and evict what collides
            base = lo if forward else hi
            if last[i] is not None and forward and base <= last[i]:
                base = last[i] + 1
            chosen = base
            for key, offs, cnt in cells[i]:
                row, who = occ_l[key], holders[key]
                evict: set[int] = set()
                for o, c in zip(offs.tolist(), cnt.tolist()):
                    r = (chosen + o) % ii
                    if row[r] + c > caps[key]:
                        evict |= who[r]
                for j in sorted(evict):
                    unschedule(j)
        t[i] = chosen
        last[i] = chosen
        place(i, chosen, +1)
        for s, w in succs[i]:
            if t[s] is not None and chosen + w > t[s]:
                unschedule(s)
        for u, w in preds[i]:
            if t[u] is not None and t[u] + w > chosen:
                unschedule(u)
    if any(x is None for x in t):
        return None
    shift = (min(t) // ii) * ii  # earliest op in stage 0
    return {v: t[i] - shift for i, v in enumerate(names)}


def _budgets_ok(problem: Problem, ii: int, times: dict[str, int], groups: dict[str, int]) -> dict[str, int] | None:
    """Buffer depths of the values holding registers or shared memory when they fit the budgets, else None."""
    g = problem.graph
    depth = buffer_depths(g, ii, times)
    held = {o.name: depth[o.name] for o in g.ops if (o.regs or 0) > 0 or (o.smem or 0) > 0}
    return held if _fits(problem, held, groups) else None


def _retime(problem: Problem, ii: int, times: dict[str, int], groups: dict[str, int],
            deadline: float | None = None) -> dict[str, int] | None:
    """Stages for the same residues that keep each held value within a buffer count (lifetime <= copies * I):
    difference constraints (dependences below, lifetimes above) solved by longest paths. Buffer counts start at
    one per value (or its length) and grow one at a time while the budgets allow: when the constraints have a
    positive cycle, a value whose lifetime row lies on it, the one with the fewest buffers first (then the
    cheapest in registers + shared memory); growing any other value could not break that cycle and only spent the
    budgets (on 120-op graphs every grouping failed that way). None also when ``deadline`` passes."""
    g, m = problem.graph, problem.machine
    names = [o.name for o in g.ops]
    res = {v: times[v] % ii for v in names}
    length = {o.name: o.length for o in g.ops}
    held = [o for o in g.ops if (o.regs or 0) > 0 or (o.smem or 0) > 0]
    lower = []
    for e in g.edges:
        w = e.delay - ii * e.distance
        if e.value and e.src != e.dst and groups[e.src] != groups[e.dst]:
            w += m.handoff_cycles
        lower.append((e.src, e.dst, -(-(w - res[e.dst] + res[e.src]) // ii)))  # k_dst >= k_src + this
    copies = {o.name: max(1, -(-o.length // ii)) for o in held}
    for e in g.edges:  # x[i] = f(x[i - d]) in place: the value outlives d - 1 later instances, whatever the stages
        if e.value and e.src == e.dst and e.src in copies:
            copies[e.src] = max(copies[e.src], e.distance - 1 + -(-length[e.src] // ii))
    cost = {o.name: (o.regs or 0) + (o.smem or 0) for o in held}
    # the budgets' running totals (one more buffer of v changes only its group's registers and the shared memory:
    # the same test as _fits, in O(1) per candidate)
    regs_of = {o.name: o.regs or 0 for o in g.ops}
    smem_of = {o.name: o.smem or 0 for o in g.ops}
    regs_q = {q: m.group_base_regs for q in set(groups.values())}
    for o in g.ops:
        regs_q[groups[o.name]] += regs_of[o.name] * copies.get(o.name, 1)
    regs_all = sum(regs_q.values())
    smem = sum(smem_of[o.name] * copies.get(o.name, 1) for o in g.ops)
    within = (max(regs_q.values()) <= m.regs_per_group_max and regs_all <= m.regs_total
              and smem <= m.smem_capacity)  # when not, no buffer can be added (_fits fails every trial)
    # consumers of each held value: (consumer, distance), for the lifetime rows
    reads = [(e.src, e.dst, e.distance) for e in g.edges if e.value and e.src != e.dst and e.src in copies]
    # (self-loops are met by the counts above: their rows do not depend on the stages)
    for _ in range(4 * len(held) + 4):
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        cons = list(lower)
        for src, dst, dist in reads:
            # t_dst + I * distance + len_dst - t_src <= copies * I  ->  k_src >= k_dst + this
            up = copies[src] * ii - ii * dist - length[dst]
            cons.append((dst, src, -((up - res[dst] + res[src]) // ii)))
        k, cycle = longest_paths_or_cycle(names, cons)
        if k is not None:
            lo = min(k.values())
            return {v: ii * (k[v] - lo) + res[v] for v in names}
        if not within:
            return None
        # only a buffer of a value whose lifetime row lies on the positive cycle can break it (a buffer of any
        # other value leaves the cycle as it is and only spends the budgets)
        on = {(cycle[j - 1], cycle[j]) for j in range(len(cycle))}
        cand = {src for src, dst, _ in reads if (dst, src) in on}
        for v in sorted(cand, key=lambda v: (copies[v], cost[v], v)):
            q, dr = groups[v], regs_of[v]
            if regs_q[q] + dr <= m.regs_per_group_max and regs_all + dr <= m.regs_total \
                    and smem + smem_of[v] <= m.smem_capacity:
                copies[v] += 1
                regs_q[q] += dr
                regs_all += dr
                smem += smem_of[v]
                break
        else:
            return None
    return None


def _fits(problem: Problem, copies: dict[str, int], groups: dict[str, int]) -> bool:
    """Registers per group (base + regs x buffers) and over all groups, and shared memory, within the machine's."""
    g, m = problem.graph, problem.machine
    total = 0
    for q in set(groups.values()):
        regs = m.group_base_regs + sum((o.regs or 0) * copies.get(o.name, 1) for o in g.ops if groups[o.name] == q)
        if regs > m.regs_per_group_max:
            return False
        total += regs
    return total <= m.regs_total and sum((o.smem or 0) * copies.get(o.name, 1) for o in g.ops) <= m.smem_capacity


def assignments(problem: Problem) -> list[dict[str, int]]:
    """Candidate warp-group assignments, fewest groups first: variable-latency ops on one producer group (when
    the graph also has fixed-latency ops), the others spread over 1, 2, ... consumer groups, two greedy ways
    each: keeping value edges inside a group, or only balancing issue slots (both within an even share of the
    issue slots and within the per-group registers, a value read d iterations later counted d times)."""
    g, m = problem.graph, problem.machine
    var = [o for o in g.ops if o.variable_latency]
    fixed = [o for o in g.ops if not o.variable_latency]
    if not var or not fixed:
        producer, first = {}, 0
        pool = list(g.ops)
    else:
        producer, first = {o.name: 0 for o in var}, 1
        pool = fixed
    hold = {o.name: (o.length if o.blocking else 1) for o in pool}
    nbrs: dict[str, list[str]] = {o.name: [] for o in g.ops}
    for e in g.edges:
        if e.value and e.src != e.dst:
            nbrs[e.src].append(e.dst)
            nbrs[e.dst].append(e.src)
    room = m.regs_per_group_max - m.group_base_regs
    # a value read d iterations later needs about d buffers whatever the schedule
    depth = {o.name: 1 for o in g.ops}
    for e in g.edges:
        if e.value:  # (a self-loop too: x[i] = f(x[i - d]) keeps d copies)
            depth[e.src] = max(depth[e.src], e.distance)
    need = {o.name: (o.regs or 0) * depth[o.name] for o in g.ops}
    out: list[dict[str, int]] = []
    for k in range(1, m.max_warp_groups - first + 1):
        if k > len(pool):
            break
        target = -(-sum(hold.values()) // k)
        for together_first in (True, False):  # keep value edges inside a group / balance issue slots only
            load = [0] * k
            regs = [0] * k
            grp: dict[str, int] = {}
            ordered = pool if together_first else sorted(pool, key=lambda o: -hold[o.name])
            for o in ordered:
                def score(q: int) -> tuple:
                    over = load[q] + hold[o.name] > target or regs[q] + need[o.name] > room
                    together = sum(1 for w in nbrs[o.name] if grp.get(w) == q) if together_first else 0
                    return (over, -together, load[q], regs[q], q)
                q = min(range(k), key=score)
                grp[o.name] = q + first
                load[q] += hold[o.name]
                regs[q] += need[o.name]
            if len(set(grp.values())) < k:
                continue  # a group stayed empty: the same as a smaller k
            cand = {**producer, **grp}
            if cand not in out:
                out.append(cand)
    return out


def _search(lower: int, cap: int, attempt: Callable[[int], HeuristicSchedule | None],
            tried: list[int], deadline: float, hard: float = float("inf")) -> HeuristicSchedule | None:
    """First I from ``lower`` that ``attempt`` schedules: +1 four times, then galloping, then bisection back
    (the bisection stops at ``deadline``; the first success is searched for up to ``cap``, until ``hard``)."""
    best = None
    failed = lower - 1
    ii, step, misses = lower, 1, 0
    while ii <= cap:
        if time.perf_counter() >= hard:
            return None
        tried.append(ii)
        best = attempt(ii)
        if best is not None:
            break
        failed = ii
        misses += 1
        if misses >= 4:
            step *= 2
        if ii == cap:
            break
        ii = min(ii + step, cap)
    if best is None:
        return None
    lo, hi = failed, best.ii
    while hi - lo > 1 and time.perf_counter() < min(deadline, hard):
        mid = (lo + hi) // 2
        tried.append(mid)
        r = attempt(mid)
        if r is not None:
            best, hi = r, mid
        else:
            lo = mid
    return best


def heuristic_schedule(problem: Problem, *, warp: bool | None = None, lower: int | None = None,
                       max_ii: int | None = None, time_limit: float = 30.0,
                       deadline: float | None = None) -> HeuristicSchedule | None:
    """The smallest I the heuristic schedules (plain, or the warp problem when ``warp``), checked by the
    independent validator; None when nothing up to ``max_ii`` (default: ``model.ii_cap``) fits, e.g. the
    register or shared-memory budgets cannot be met, or when ``deadline`` passes first. ``time_limit`` (s)
    bounds the refinement (bisection below the first I that schedules, further groupings); ``deadline`` (a
    ``time.perf_counter()`` value; default: none) bounds everything, the search for a first schedule included:
    at it the best schedule found so far is returned (validated), or None."""
    from .model import ii_cap

    warp = problem.warp if warp is None else warp
    t0 = time.perf_counter()
    hard = float("inf") if deadline is None else deadline
    deadline = min(t0 + time_limit, hard)
    lb = max(lower or 1, compute_mii(problem, deadline=hard).mii)
    cap = max(max_ii or ii_cap(problem, warp), lb)
    tried: list[int] = []
    if not warp:
        zero = {o.name: 0 for o in problem.graph.ops}

        def plain(ii: int) -> HeuristicSchedule | None:
            times = modulo_schedule(problem, ii, deadline=hard)
            return None if times is None else HeuristicSchedule(ii, times, zero, {}, False)

        best = _search(lb, cap, plain, tried, deadline, hard)
    else:
        best = None
        deferred: list[tuple[int, Callable[[int], HeuristicSchedule | None]]] = []
        for grp in assignments(problem):
            if time.perf_counter() >= hard:
                break
            hold: dict[int, int] = {}
            for o in problem.graph.ops:
                hold[grp[o.name]] = hold.get(grp[o.name], 0) + (o.length if o.blocking else 1)
            start = max(lb, max(hold.values()))
            floor = {q: problem.machine.group_base_regs for q in hold}  # registers with one buffer per value
            for o in problem.graph.ops:
                floor[grp[o.name]] += o.regs or 0
            if max(floor.values()) > problem.machine.regs_per_group_max or \
                    sum(floor.values()) > problem.machine.regs_total:
                continue  # over the register budget at any I
            if best is not None and (start >= best.ii or time.perf_counter() > deadline):
                continue  # more groups cannot give a smaller I from here / out of time

            def joint(ii: int, grp=grp) -> HeuristicSchedule | None:
                times = modulo_schedule(problem, ii, grp, deadline=hard)
                if times is None:
                    return None
                copies = _budgets_ok(problem, ii, times, grp)
                if copies is None:  # too many buffers: the same residues, stages chosen to shorten lifetimes
                    times = _retime(problem, ii, times, grp, hard)
                    copies = None if times is None else _budgets_ok(problem, ii, times, grp)
                return None if copies is None else HeuristicSchedule(ii, times, grp, copies, True)

            top = cap if best is None else best.ii - 1
            if best is None and time.perf_counter() > deadline:
                # past the deadline with no schedule yet (the search below ignores the deadline then): first try
                # this grouping at the cap and, when even that fails, gallop through it only after every other
                # grouping had its probe (a whole gallop took about a second per grouping on a 120-op graph before
                # the scheduler got faster; ~0.05 s now). A heuristic order: feasibility is not monotone in I (a
                # register-bound grouping can fit at a small I and not at the cap, where every stage is one)
                tried.append(top)
                if joint(top) is None:
                    deferred.append((start, joint))
                    continue
            r = _search(start, top, joint, tried, deadline, hard)
            if r is not None and (best is None or r.ii < best.ii):
                best = r
        for start, joint in deferred:
            if best is not None or time.perf_counter() >= hard:
                break
            best = _search(start, cap, joint, tried, deadline, hard)
    if best is None:
        return None
    if _validate(problem, best):
        raise RuntimeError(f"twill heuristic: schedule at I = {best.ii} fails the validator: "
                           f"{'; '.join(_validate(problem, best))}")
    best.seconds = time.perf_counter() - t0
    best.tried = tried
    return best


def _validate(problem: Problem, s: HeuristicSchedule) -> list[str]:
    from .validator import validate

    plan = {"ii": s.ii, "warp_specialised": s.warp, "buffers": s.copies,
            "ops": [{"name": v, "issue_cycle": t, "warp_group": s.groups[v]} for v, t in s.times.items()]}
    return validate(problem.graph.model_dump(by_alias=True), problem.machine.model_dump(), plan)
