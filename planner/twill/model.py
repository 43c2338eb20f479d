"""Modulo scheduling and joint software pipelining + warp specialisation with OR-Tools CP-SAT.

At a fixed initiation interval I each op v gets a residue r_v < I and a stage k_v;
its issue cycle is t_v = I * k_v + r_v. Constraints (OR-Tools section order below):

- dependences: t_v - t_u >= delay - I * distance (+ handoff when the value crosses warp groups);
- resources: one capacity row per (unit, residue s): sum_{v, c} RRT[v][unit][c] * x[v, (s - c) mod I] <= cap.
  Exact even when an op holds a unit for more than I cycles (its cycles c and c + I land on the same row);
- warp mode (when the graph gives registers, shared memory, variable latency or blocking waits):
  each op on one of the machine's warp groups; variable-latency ops only share a group with other
  variable-latency ops (producer group); each group issues at most one op per cycle and a blocking op holds
  its group's issue slot for its whole length (rows per (group, residue)); a value live for L cycles needs
  ceil(L / I) copies (buffer depth); registers per group (base + copies * regs of the values it produces)
  within the per-group cap and the register file; shared memory (copies * smem) within capacity.

Objective at fixed I, lexicographic by weights: fewest warp groups, then fewest cross-group edges
(channels), then (``load_slack``) the most slack after variable-latency loads, then the shortest iteration span
(fewest stages). The driver :func:`solve` first runs iterative modulo scheduling (``heuristic.py``) and, when
every cost is a multiple of a unit g > 1, CP-SAT on the problem in units of g (scaled back); the better of the
two caps the search over I and is CP-SAT's hint there. It then raises I from MII until a schedule exists; the
plain problem first (so without warp fields the reported I is exactly the modulo-scheduling minimum; with them
it only decides feasibility), then the warp problem from that I. Each I first gets a feasibility solve on at
most half of the remaining time (so a time-out still leaves time for a larger I), then the objective is
optimised from the schedule found; when the range up to the cap is wide, a bisection looks for a smaller I with
a schedule first. When CP-SAT has none in time, the heuristic's (or the coarse) schedule is the answer
(``method``), status 'feasible'. Up to I = INTERVAL_FROM the residues are one-hot (I booleans per op); above,
they are integers and the reservations wrapped intervals (model size independent of I). ``proven`` is True when
every I below the result, down to MII, was proved infeasible; a time-out is recorded as such, never as
infeasible, and the gap then is at least (I - the smallest I not proved infeasible) / I. One deadline (start +
time limit) bounds every phase - MII, the heuristics, the coarse solve, each CP-SAT model build and solve; past
it only finishing work runs, for at most :data:`GRACE` (0.2 x limit + 0.1 s) more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from math import gcd

import numpy as np

from adasched.planner.solver import SolveParams, solve_cpsat

from .graph import Problem
from .heuristic import HeuristicSchedule, _runs_of, _validate, heuristic_schedule
from .knobs import buffer_depths
from .mii import MII, compute_mii, longest_paths

__all__ = ["Attempt", "Schedule", "TimeLimitError", "solve_at", "solve", "horizon_stages", "ii_cap"]


class TimeLimitError(ValueError):
    """:func:`solve` found no schedule within its time limit and proved none impossible: raise the limit. A
    ValueError (the CLI prints it as its one ``error:`` line, exit 2), told apart from a graph with no schedule
    (a plain ValueError) by its type."""


@dataclass
class Attempt:
    """One CP-SAT solve at a fixed I."""

    ii: int
    warp: bool
    status: str  # optimal | feasible | infeasible | timeout
    seconds: float
    objective: float | None = None
    bound: float | None = None
    times: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    copies: dict[str, int] = field(default_factory=dict)

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "feasible")


@dataclass
class Schedule:
    """The result of :func:`solve`."""

    ii: int
    mii: MII
    plain_ii: int
    plain_proven: bool
    proven: bool
    """Every I in [MII, ii) was proved infeasible (or ii == MII)."""
    status: str  # optimal | feasible
    gap: float | None
    objective: float | None
    bound: float | None
    seconds: float
    times: dict[str, int]
    groups: dict[str, int]
    copies: dict[str, int]
    attempts: list[Attempt]
    warp: bool
    note: str = ""
    params: SolveParams | None = None
    load_slack: bool = False
    """The objective preferred slack after variable-latency loads (``solve(load_slack=True)``)."""
    method: str = "cp-sat"
    """What produced the schedule: 'cp-sat'; when CP-SAT found none in time, 'heuristic' (iterative modulo
    scheduling) or 'cp-sat-coarse' (CP-SAT on the problem in a coarser time unit, scaled back)."""


def _max_weight(problem: Problem, ii: int, warp: bool) -> int:
    hand = problem.machine.handoff_cycles if warp else 0
    return max([e.delay - ii * e.distance + (hand if e.value else 0) for e in problem.graph.edges] + [0])


def horizon_stages(problem: Problem, ii: int, warp: bool) -> int:
    """Largest stage index needed: with residues fixed the stages solve a difference system whose least
    solution has k_v <= (n - 1) * (W + 1) (longest path of at most n - 1 edges), W the largest edge weight in
    stages: ceil(w_max / I) for the dependences; in the warp problem also a buffered value's lifetime row
    (t_p >= t_c + I * distance + len_c - I * copies, copies >= 1 capped by memory) read as an edge from its
    consumer back to its producer, of at most distance + ceil(len_c / I) stages. Leaving those out bounded the
    stages too tightly: a producer that must run stages after its consumer (a value read 5 iterations later with
    room for 2 buffers) was cut off, and CP-SAT proved a schedulable I infeasible."""
    n = len(problem.graph.ops)
    w = -(-_max_weight(problem, ii, warp) // ii)
    if warp:
        length = {o.name: o.length for o in problem.graph.ops}
        buffered = {o.name for o in problem.graph.ops if o.regs or o.smem}
        for v, uses in _value_consumers(problem).items():
            if v in buffered:
                w = max([w] + [dist + -(-length[c] // ii) for c, dist in uses])
    return max(1, (n - 1) * (w + 1) + 1)


def ii_cap(problem: Problem, warp: bool) -> int:
    """An I at which the problem is certainly feasible when it is feasible at all (ops one after another)."""
    g = problem.graph
    hand = problem.machine.handoff_cycles if warp else 0
    return (sum(o.length for o in g.ops) + sum(e.delay for e in g.edges) + hand * len(g.edges)
            + max(o.length for o in g.ops) + 1)


def _value_consumers(problem: Problem):
    """op -> [(consumer, distance)] over value edges. A self-loop of distance d reads the value d iterations
    later and the op writes in place, so the value outlives d - 1 later instances: (op, d - 1), which the
    lifetime rule ``t_c + I * distance + len_c - t_p`` turns into (d - 1) I + len; an in-place accumulator
    (d = 1) adds nothing. (Dropping every self-loop gave x[i] = f(x[i - 3]) one buffer: 224 registers planned
    for a value needing 3 x 200 + 24.)"""
    out: dict[str, list[tuple[str, int]]] = {o.name: [] for o in problem.graph.ops}
    for src, dst, d in problem.graph.value_uses():
        out[src].append((dst, d))
    return out


BISECT_FROM = 16
"""When the heuristic's I exceeds the lower bound by more than this, ``solve`` bisects between them first."""

INTERVAL_FROM = 48
"""Above this I, ``solve_at`` encodes residues as integers and reservations as wrapped intervals (model size
independent of I) instead of I booleans per op."""


def _runs(row: list[int]) -> list[tuple[int, int, int]]:
    """(offset, length, count) of the maximal runs of equal non-zero counts in a reservation row."""
    offs = np.flatnonzero(np.asarray(row, dtype=np.int64))
    return _runs_of(offs, np.asarray(row, dtype=np.int64)[offs])


def _window(model, ii: int, r, offset: int, size: int, name: str, presence=None) -> list:
    """Intervals covering the circular window [r + offset, r + offset + size) mod ii (0 < size < ii): its start
    p in [0, ii) and the same interval at p + ii; on [ii, 2 ii) they cover exactly the window's residues, and
    elsewhere a subset of them, so a cumulative over the line is the capacity row of every residue."""
    off = offset % ii
    if off == 0:
        p = r
    else:
        wrap = model.NewBoolVar(f"wrap[{name}]")
        p = model.NewIntVar(0, ii - 1, f"p[{name}]")
        model.Add(p == r + off - ii * wrap)
    if presence is None:
        return [model.NewFixedSizeIntervalVar(p, size, f"w[{name}]"),
                model.NewFixedSizeIntervalVar(p + ii, size, f"w2[{name}]")]
    return [model.NewOptionalFixedSizeIntervalVar(p, size, presence, f"w[{name}]"),
            model.NewOptionalFixedSizeIntervalVar(p + ii, size, presence, f"w2[{name}]")]


def _wrapped_resources(model, problem: Problem, ii: int, res: list) -> None:
    """Unit capacities modulo I with integer residues: a run of c units for L cycles holds c * (L // I) units
    at every residue (a constant) plus c on a window of L % I cycles (two intervals under a cumulative)."""
    for unit, cap in problem.units.items():
        const = 0
        ivs, dem = [], []
        for i, o in enumerate(problem.graph.ops):
            for j, (off, size, cnt) in enumerate(_runs(o.reserve.get(unit, []))):
                const += cnt * (size // ii)
                if size % ii:
                    ivs += _window(model, ii, res[i], off, size % ii, f"{o.name},{unit},{j}")
                    dem += [cnt, cnt]
        if const > cap:
            model.AddBoolOr([])  # the tables alone hold more than the unit has at every residue: infeasible
        elif ivs and sum(dem) // 2 + const > cap:
            model.AddCumulative(ivs, dem, cap - const)


def _wrapped_issue_slots(model, ii: int, res: list, occ: list[int], a: list, names: list[str]) -> None:
    """One issue per warp group and cycle with integer residues: op i holds its group's slot for occ[i] cycles
    from its issue (optional intervals present when it is on that group, under a no-overlap per group)."""
    G = len(a[0])
    for q in range(G):
        ivs = []
        for i in range(len(names)):
            if q > i:
                continue  # op i is never on group q (groups are opened in op order; a[i][q] is fixed to 0)
            full, rest = divmod(occ[i], ii)
            if full >= 2 or (full == 1 and rest):
                model.Add(a[i][q] == 0)  # it would hold the slot twice at some residue
            elif full == 1:  # it holds the slot at every residue: alone on the group
                for j in range(len(names)):
                    if j != i:
                        model.AddBoolOr([a[i][q].Not(), a[j][q].Not()])
            else:
                ivs += _window(model, ii, res[i], 0, rest, f"slot[{names[i]},{q}]", presence=a[i][q])
        if len(ivs) > 2:
            model.AddNoOverlap(ivs)


PRESOLVE_FIX = {"symmetry_level": 0}
"""CP-SAT parameters for the interval encoding: OR-Tools 9.15's presolve symmetry detection (on at the default
``symmetry_level`` 2, and at 1) raises IndexError ('absl::container_internal::raw_hash_map<>::at') on some warp
models in this encoding (4 of 286 small ones: random 3-8-op warp graphs at I = MII .. MII + 2); with symmetry
detection off it solves them, and decides the rest the same (the group numbering already breaks the symmetry)."""


def _presolve_index_error(err: IndexError) -> bool:
    """The known OR-Tools 9.15 presolve failure: an absl hash-map ``at`` miss raised out of CpSolver's solve."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code
        tb = tb.tb_next
    return ("raw_hash_map" in str(err) and last is not None and last.co_name == "solve"
            and last.co_filename.replace("\\", "/").endswith("ortools/sat/python/cp_model.py"))


def solve_at(problem: Problem, ii: int, params: SolveParams, *, warp: bool, optimise: bool = True,
             hint_times: dict[str, int] | None = None, hint_groups: dict[str, int] | None = None,
             encoding: str = "auto", load_slack: bool = False, deadline: float | None = None) -> Attempt:
    """See :func:`_solve_at`. The interval encoding is solved with :data:`PRESOLVE_FIX` (OR-Tools 9.15's presolve
    symmetry detection raised IndexError on it); should that known failure still happen, that I is solved with
    the time-indexed encoding, which is exact too, only larger, in the time the failed attempt left (not a second
    full limit). Any other error propagates. ``deadline`` (``time.perf_counter()`` value): the solve ends by it,
    model building included (a 'timeout' attempt when building took it all)."""
    kw = dict(warp=warp, optimise=optimise, hint_times=hint_times, hint_groups=hint_groups, load_slack=load_slack,
              deadline=deadline)
    t0 = time.perf_counter()
    try:
        return _solve_at(problem, ii, params, encoding=encoding, **kw)
    except IndexError as err:
        if encoding == "time" or (encoding == "auto" and ii <= INTERVAL_FROM) or not _presolve_index_error(err):
            raise
        left = max(0.05, params.time_limit - (time.perf_counter() - t0))
        return _solve_at(problem, ii, _with_time(params, left), encoding="time", **kw)


def _solve_at(problem: Problem, ii: int, params: SolveParams, *, warp: bool, optimise: bool = True,
              hint_times: dict[str, int] | None = None, hint_groups: dict[str, int] | None = None,
              encoding: str = "auto", load_slack: bool = False, deadline: float | None = None) -> Attempt:
    """Build and solve the CP-SAT model at initiation interval ``ii``; ``hint_times`` (issue cycles, e.g.
    the plain schedule at the same I) become a warm-start hint for residues and stages, ``hint_groups`` (warp
    mode; e.g. the heuristic's) for the group of each op. ``encoding``: 'time' (one-hot residues), 'interval'
    (integer residues, wrapped intervals) or 'auto' (interval when ``ii`` > INTERVAL_FROM). ``load_slack``
    (warp mode): after fewest groups and channels, prefer slack between variable-latency loads and their
    consumers (up to I cycles per edge; deeper load buffers) over a short span. ``deadline``: see
    :func:`solve_at` (checked between the model's sections; CP-SAT gets what is left of it at most)."""
    from ortools.sat.python import cp_model

    t_start = time.perf_counter()

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    def out_of_time() -> Attempt:
        return Attempt(ii=ii, warp=warp, status="timeout", seconds=time.perf_counter() - t_start)

    # ---- data ----------------------------------------------------------------------------------------
    g, m = problem.graph, problem.machine
    ops = g.ops
    names = [o.name for o in ops]
    idx = {n: i for i, n in enumerate(names)}
    n = len(ops)
    kmax = horizon_stages(problem, ii, warp)
    tmax = ii * kmax + ii - 1
    G = m.max_warp_groups if warp else 1
    hand = m.handoff_cycles
    length = [o.length for o in ops]
    consumers = _value_consumers(problem)

    # ---- model & variables ---------------------------------------------------------------------------
    model = cp_model.CpModel()
    if encoding == "auto":
        encoding = "interval" if ii > INTERVAL_FROM else "time"
    if encoding not in ("time", "interval"):
        raise ValueError(f"encoding must be 'auto', 'time' or 'interval', got {encoding!r}")
    timed = encoding == "time"
    k = [model.NewIntVar(0, kmax, f"k[{v}]") for v in names]
    if timed:
        x = [[model.NewBoolVar(f"x[{v},{r}]") for r in range(ii)] for v in names]
        res = [sum(r * x[i][r] for r in range(ii)) for i in range(n)]
    else:
        x = []
        res = [model.NewIntVar(0, ii - 1, f"r[{v}]") for v in names]
    t = [ii * k[i] + res[i] for i in range(n)]

    # ---- constraints ---------------------------------------------------------------------------------
    for i in range(n):
        if timed:
            model.AddExactlyOne(x[i])
    if not timed:
        _wrapped_resources(model, problem, ii, res)
    if late():
        return out_of_time()
    for unit, cap in (problem.units.items() if timed else ()):  # one capacity row per (unit, residue)
        # rows[s][(i, r)] = units op i holds at residue s when it issues at residue r (built per row: looping
        # over every (op, residue) pair for every row was O(I^2 n) and took the whole budget at I = 2000)
        rows: list[dict[tuple[int, int], int]] = [{} for _ in range(ii)]
        for i, o in enumerate(ops):
            for c, use in enumerate(o.reserve.get(unit, ())):
                if use:
                    for r in range(ii):
                        row = rows[(r + c) % ii]
                        row[(i, r)] = row.get((i, r), 0) + use
        for row in rows:
            if row and sum(row.values()) > cap:
                model.Add(sum(w * x[i][r] for (i, r), w in row.items()) <= cap)

    if late():
        return out_of_time()
    cross: dict[int, cp_model.IntVar] = {}
    a = used = None
    if warp:
        a = [[model.NewBoolVar(f"a[{v},{q}]") for q in range(G)] for v in names]
        used = [model.NewBoolVar(f"used[{q}]") for q in range(G)]
        for i in range(n):
            model.AddExactlyOne(a[i])
            for q in range(G):
                model.AddImplication(a[i][q], used[q])
        for q in range(G):
            model.AddBoolOr([a[i][q] for i in range(n)]).OnlyEnforceIf(used[q])
            if q + 1 < G:
                model.AddImplication(used[q + 1], used[q])
        # symmetry: groups numbered by their first op (op i may open group q only if an earlier op is in q-1)
        for i in range(n):
            for q in range(1, G):
                if q > i:
                    model.Add(a[i][q] == 0)
                else:
                    model.Add(a[i][q] <= sum(a[j][q - 1] for j in range(i)))
        # variable-latency ops on producer groups of their own
        for i, o in enumerate(ops):
            if o.variable_latency:
                for j, p in enumerate(ops):
                    if not p.variable_latency:
                        for q in range(G):
                            model.AddBoolOr([a[i][q].Not(), a[j][q].Not()])
        # one issue per group per cycle; a blocking op holds its group for its whole length
        occ = [length[i] if o.blocking else 1 for i, o in enumerate(ops)]
        if not timed:
            _wrapped_issue_slots(model, ii, res, occ, a, names)
        for q in (range(G) if timed else ()):
            if late():
                return out_of_time()
            z = [[None] * ii for _ in range(n)]
            for i in range(n):
                for r in range(ii):
                    zz = model.NewBoolVar(f"z[{names[i]},{q},{r}]")
                    model.Add(zz >= a[i][q] + x[i][r] - 1)
                    z[i][r] = zz
            for s in range(ii):
                cnt: dict[tuple[int, int], int] = {}
                for i in range(n):
                    for c in range(occ[i]):
                        key = (i, (s - c) % ii)
                        cnt[key] = cnt.get(key, 0) + 1
                model.Add(sum(w * z[i][r] for (i, r), w in cnt.items()) <= 1)

    for ei, e in enumerate(g.edges):
        u, v = idx[e.src], idx[e.dst]
        rhs = e.delay - ii * e.distance
        if warp and e.value and u != v and hand > 0:
            c = model.NewBoolVar(f"cross[{ei}]")
            for q in range(G):
                model.Add(c >= a[u][q] - a[v][q])
            cross[ei] = c
            model.Add(t[v] - t[u] >= rhs + hand * c)
        else:
            model.Add(t[v] - t[u] >= rhs)
            if warp and e.value and u != v:
                c = model.NewBoolVar(f"cross[{ei}]")
                for q in range(G):
                    model.Add(c >= a[u][q] - a[v][q])
                cross[ei] = c

    if late():
        return out_of_time()
    copies: dict[int, cp_model.IntVar] = {}
    if warp:
        max_dist = max([e.distance for e in g.edges] + [0])
        cmax = kmax + max_dist + 2 + -(-max(length) // ii)
        for i, o in enumerate(ops):
            if not (o.regs or o.smem):
                continue
            life = model.NewIntVar(length[i], tmax + ii * (max([d for _, d in consumers[o.name]] + [0]) + 1)
                                   + max(length), f"life[{o.name}]")
            for w, dist in consumers[o.name]:
                j = idx[w]
                model.Add(life >= t[j] + ii * dist + length[j] - t[i])
            cp = model.NewIntVar(1, cmax, f"copies[{o.name}]")
            model.Add(ii * cp >= life)
            copies[i] = cp
        R = []
        for q in range(G):
            terms = []
            for i, o in enumerate(ops):
                if o.regs and i in copies:
                    y = model.NewIntVar(0, cmax, f"y[{o.name},{q}]")
                    model.Add(y >= copies[i] - cmax * (1 - a[i][q]))
                    terms.append(o.regs * y)
            Rq = model.NewIntVar(0, m.regs_per_group_max, f"regs[{q}]")
            model.Add(Rq >= m.group_base_regs * used[q] + sum(terms))
            R.append(Rq)
        model.Add(sum(R) <= m.regs_total)
        smem_terms = [o.smem * copies[i] for i, o in enumerate(ops) if o.smem and i in copies]
        if smem_terms:
            model.Add(sum(smem_terms) <= m.smem_capacity)

    # ---- objective -----------------------------------------------------------------------------------
    if optimise:
        span = model.NewIntVar(0, tmax + max(length), "span")
        for i in range(n):
            model.Add(span >= t[i] + length[i])
        w_slack = tmax + max(length) + 1
        slack = []
        if warp and load_slack:
            # spare buffering for variable-latency loads: cycles (at most I per edge) between a load's nominal
            # arrival and its consumer's issue, which absorb a late load; they lengthen the load's lifetime, so
            # they take buffers (shared memory, within capacity), and rank below groups and channels
            for ei, e in enumerate(g.edges):
                u, v = idx[e.src], idx[e.dst]
                if ops[u].variable_latency and e.value and u != v:
                    sl = model.NewIntVar(0, ii, f"slack[{ei}]")
                    model.Add(sl <= t[v] + ii * e.distance - t[u] - e.delay
                              - (hand * cross[ei] if ei in cross else 0))
                    slack.append(sl)
        w_chan = w_slack * (ii * len(slack) + 1)
        obj = span - w_slack * sum(slack)
        if warp:
            w_grp = w_chan * (len(cross) + 1)
            obj = w_grp * sum(used) + w_chan * sum(cross.values()) + obj
        model.Minimize(obj)

    # ---- solve ---------------------------------------------------------------------------------------
    hint = None
    if hint_times:
        hint = {}
        for i, v in enumerate(names):
            tv = hint_times.get(v)
            if tv is not None and 0 <= tv // ii <= kmax:
                hint[k[i]] = tv // ii
                if timed:
                    for r in range(ii):
                        hint[x[i][r]] = int(r == tv % ii)
                else:
                    hint[res[i]] = tv % ii
        if warp and hint_groups and set(hint_groups) == set(names):
            remap: dict[int, int] = {}  # canonical numbering (groups opened in op order), as the symmetry rule wants
            for v in names:
                remap.setdefault(hint_groups[v], len(remap))
            if len(remap) <= G:
                for i, v in enumerate(names):
                    for q in range(G):
                        hint[a[i][q]] = int(q == remap[hint_groups[v]])
    if deadline is not None:
        rest = deadline - time.perf_counter()
        if rest <= 0.005:
            return out_of_time()
        params = _with_time(params, min(params.time_limit, rest))
    out = solve_cpsat(model, params, hint=hint, overrides=None if timed else PRESOLVE_FIX)

    # ---- extract -------------------------------------------------------------------------------------
    att = Attempt(ii=ii, warp=warp, status=out.status, seconds=out.solve_seconds,
                  objective=out.objective, bound=out.bound)
    if out.has_solution:
        sv = out.solver  # type: ignore[attr-defined]
        for i, v in enumerate(names):
            r = next(r for r in range(ii) if sv.Value(x[i][r])) if timed else sv.Value(res[i])
            att.times[v] = ii * sv.Value(k[i]) + r
            att.groups[v] = next(q for q in range(G) if sv.Value(a[i][q])) if warp else 0
            if i in copies:
                att.copies[v] = sv.Value(copies[i])
        base = min(att.times.values())
        shift = (base // ii) * ii  # normalise so the earliest op is in stage 0
        att.times = {v: tv - shift for v, tv in att.times.items()}
    return att


def _with_time(params: SolveParams, seconds: float) -> SolveParams:
    return replace(params, time_limit=max(seconds, 0.01))


def time_unit(problem: Problem, warp: bool) -> int:
    """The largest g such that every delay and every reservation table (constant on aligned blocks of g cycles
    and a whole number of blocks long) are multiples of g: the problem can then be stated in units of g cycles
    (exactly, up to the warp problem's handoff, which is rounded up there)."""

    g = 0
    for e in problem.graph.edges:
        g = gcd(g, e.delay)
    for o in problem.graph.ops:
        for row in o.reserve.values():
            g = gcd(g, len(row))
            change = [c for c in range(1, len(row)) if row[c] != row[c - 1]]
            for c in change:
                g = gcd(g, c)
        if o.blocking and warp:
            g = gcd(g, o.length)
    return max(g, 1)


def _coarse(problem: Problem, g: int) -> Problem:
    """The problem in units of g cycles (see :func:`time_unit`), the handoff rounded up: each of its schedules,
    times and I multiplied by g, is a schedule of the original (every constraint scales, a handoff of
    g * ceil(h / g) >= h cycles included)."""
    graph = problem.graph.model_copy(deep=True)
    for o in graph.ops:
        o.reserve = {u: row[::g] for u, row in o.reserve.items()}
    for e in graph.edges:
        e.delay //= g
    machine = problem.machine.model_copy(update={"handoff_cycles": -(-problem.machine.handoff_cycles // g)})
    return problem.model_copy(update={"graph": graph, "machine": machine})


def _coarse_schedule(problem: Problem, warp: bool, params: SolveParams,
                     hard_deadline: float | None = None) -> HeuristicSchedule | None:
    """When the costs share a unit g > 1: solve the problem stated in units of g (small I, fast), scale its
    schedule back (times x g, I x g: valid in the original units, so an upper bound there, not a proof of
    minimality; in the warp problem the rounded-up handoff may cost more), checked by the validator; None
    when there is no such unit or no schedule. ``hard_deadline``: see :func:`solve`."""
    g = time_unit(problem, warp)
    if g == 1:
        return None
    small = _coarse(problem, g)
    try:
        s = solve(small, params, warp=warp, hard_deadline=hard_deadline)
    except ValueError:
        return None
    times = {v: t * g for v, t in s.times.items()}
    groups = s.groups if warp else {v: 0 for v in times}
    depth = buffer_depths(problem.graph, s.ii * g, times)
    copies = {o.name: depth[o.name] for o in problem.graph.ops if (o.regs or 0) > 0 or (o.smem or 0) > 0}
    out = HeuristicSchedule(ii=s.ii * g, times=times, groups=groups, copies=copies if warp else {}, warp=warp,
                            seconds=s.seconds, method="cp-sat-coarse" if s.method == "cp-sat" else "heuristic",
                            source=f"{'CP-SAT' if s.method == 'cp-sat' else 'iterative modulo scheduling'} in units "
                                   f"of {g} cycles (I = {s.ii}, {s.status}), scaled back")
    return None if _validate(problem, out) else out


def compact(problem: Problem, ii: int, times: dict[str, int], groups: dict[str, int] | None,
            warp: bool) -> dict[str, int]:
    """The same residues with the fewest stages each (least solution of the dependence constraints on the
    stages, + handoff across groups): a feasibility solve's schedule can spread over many stages. Resources
    depend only on the residues; in warp mode the result is kept only when it passes the validator (shorter
    issue times can lengthen a value's lifetime). Returns ``times`` unchanged otherwise."""

    names = [o.name for o in problem.graph.ops]
    hand = problem.machine.handoff_cycles if warp else 0
    cons = []
    for e in problem.graph.edges:
        w = e.delay - ii * e.distance
        if warp and groups and e.value and e.src != e.dst and groups[e.src] != groups[e.dst]:
            w += hand
        r_u, r_v = times[e.src] % ii, times[e.dst] % ii
        cons.append((e.src, e.dst, -(-(w - r_v + r_u) // ii)))  # k_v >= k_u + this
    k = longest_paths(names, cons)
    if k is None:
        return times
    lo = min(k.values())
    out = {v: ii * (k[v] - lo) + times[v] % ii for v in names}
    if warp:
        depth = buffer_depths(problem.graph, ii, out)
        copies = {o.name: depth[o.name] for o in problem.graph.ops if (o.regs or 0) > 0 or (o.smem or 0) > 0}
        if _validate(problem, HeuristicSchedule(ii, out, groups or {}, copies, True)):
            return times
    return out


def _lower_bound(bounds: MII, attempts: list[Attempt], warp: bool) -> int:
    """The smallest I >= MII not proved infeasible (a plain infeasibility proof also rules out the warp
    problem at that I; a warp proof says nothing about the plain problem)."""
    dead = {a.ii for a in attempts if a.status == "infeasible" and (warp or not a.warp)}
    lb = bounds.mii
    while lb in dead:
        lb += 1
    return lb


def _unproved(bounds: MII, attempts: list[Attempt], ii: int, warp: bool) -> tuple[list[int], list[int]]:
    """The I in [MII, ii) not proved infeasible (see :func:`_lower_bound`), split into those where an attempt
    (of the answer's problem, or the plain one) timed out and those never tried."""
    dead = {a.ii for a in attempts if a.status == "infeasible" and (warp or not a.warp)}
    timed = {a.ii for a in attempts if a.status == "timeout" and (warp or not a.warp)}
    left = [i for i in range(bounds.mii, ii) if i not in dead]
    return [i for i in left if i in timed], [i for i in left if i not in timed]


def _ranges(values: list[int]) -> str:
    """Sorted ints as runs: [3, 4, 5, 7] -> '3-5, 7'."""
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


_INEXACT_MII = "the RecMII search ran out of time: MII {} is a lower bound, not the exact MII"


def _from_heuristic(h: HeuristicSchedule, bounds: MII, attempts: list[Attempt], plain_ii: int,
                    plain_proven: bool, warp: bool, seconds: float, params: SolveParams, why: str) -> Schedule:
    lb = _lower_bound(bounds, attempts, warp)
    # a plain I at the smallest one not proved infeasible is minimal, whoever found it (at the MII: a heuristic's
    # plain 27 = MII 27 was recorded 'not proved minimal' beside the same I 'proved minimal')
    plain_proven = plain_proven or plain_ii <= _lower_bound(bounds, attempts, False)
    if lb > h.ii:
        raise RuntimeError(f"twill: CP-SAT proved I = {h.ii} infeasible but the heuristic's schedule there passes "
                           "the validator: the model is wrong")
    note = (f"{h.method} schedule ({h.source}, {h.seconds:.3g} s): {why}; "
            f"I >= {lb} proved" + ("" if lb == h.ii else f", so I = {h.ii} is within {(h.ii - lb) / h.ii:.1%}")
            + "; secondary objective (groups, channels, span) not optimised"
            + ("" if bounds.exact else "; " + _INEXACT_MII.format(bounds.mii)))
    return Schedule(
        ii=h.ii, mii=bounds, plain_ii=plain_ii, plain_proven=plain_proven, proven=lb == h.ii, status="feasible",
        gap=(h.ii - lb) / h.ii, objective=None, bound=None, seconds=seconds, times=dict(h.times),
        groups=dict(h.groups) if warp else {}, copies=dict(h.copies), attempts=attempts, warp=warp, note=note,
        params=params, method=h.method,
    )


GRACE = (0.2, 0.1)
"""(ratio, seconds): :func:`solve` searches until its time limit L; past it only finishing work runs, until
(1 + ratio) L + seconds at most: the heuristic's search for a *first* schedule (when it has none yet), the stage
compaction of the answer, and the validator. So ``Schedule.seconds`` <= 1.2 L + 0.1 s, plus what one step of
that work takes past the bound (a modulo-scheduling pass checks the clock every 16 placements, the validator and
the compaction run to their end) and CP-SAT's own overrun of its limit."""


def solve(problem: Problem, params: SolveParams | None = None, *, warp: bool | None = None,
          max_ii: int | None = None, heuristic: bool = True, load_slack: bool = False,
          hard_deadline: float | None = None) -> Schedule:
    """Smallest I with a schedule (plain modulo scheduling, then the warp problem when the graph asks).

    ``params.time_limit`` is the budget of the whole search (seconds), the heuristic included. With
    ``heuristic`` (default) iterative modulo scheduling runs first: its I caps the CP-SAT search (no larger I is
    tried), its schedule is CP-SAT's warm start at that I, and it is the answer when CP-SAT finds no schedule in
    time (``method`` 'heuristic', status 'feasible', gap (I - smallest I not proved infeasible) / I). At each I a
    feasibility solve gets at most half of what is left (all of it at the last I), then, when it found a
    schedule, the secondary objective is optimised from it with the rest. ``load_slack``: see :func:`solve_at`.

    One deadline, t0 + L, bounds every phase's search (MII, heuristics, the coarse solve, every CP-SAT model
    build and solve); past it only the finishing work of :data:`GRACE` runs. ``hard_deadline`` (a
    ``time.perf_counter()`` value) caps both, for a solve nested in another's budget. A schedule found is always
    returned (status 'feasible' with its gap when unproved); with none found by then, a :class:`TimeLimitError` (a
    ValueError) says the time limit ran out (never 'infeasible')."""
    # OR-Tools' CP-SAT module (it imports pandas) before the clock starts: a one-time cost per process (~0.5 s
    # idle, 7-69 s measured on this machine under load 185), which no deadline can interrupt mid-import
    from ortools.sat.python import cp_model  # noqa: F401

    params = params or SolveParams(time_limit=10.0)
    warp = problem.warp if warp is None else warp
    t0 = time.perf_counter()
    deadline = t0 + params.time_limit
    hard = deadline + GRACE[0] * params.time_limit + GRACE[1]
    if hard_deadline is not None:
        deadline, hard = min(deadline, hard_deadline), min(hard, hard_deadline)
    bounds = compute_mii(problem, deadline=deadline)
    attempts: list[Attempt] = []

    def left() -> float:
        return deadline - time.perf_counter()

    heur_plain = heur_warp = None
    if heuristic:
        # refinement (a smaller I than the first found) until the deadline at most (it ends far earlier on small
        # graphs, leaving CP-SAT the rest); the first schedule until the hard deadline, but in the warp problem the
        # plain one (only a cap and hint there) gets a quarter of the time in all
        heur_plain = heuristic_schedule(problem, warp=False, max_ii=max_ii,
                                        time_limit=max(left(), 0.0) / (8 if warp else 1),
                                        deadline=min(hard, t0 + params.time_limit / 4) if warp else hard)
        if warp:
            heur_warp = heuristic_schedule(problem, warp=True, max_ii=max_ii, time_limit=max(left(), 0.0),
                                           deadline=hard)
        # costs in a coarser unit (e.g. raw cycles, all multiples of 256): the problem in that unit solved
        # exactly is a far better start than the heuristic at large I (a third of what is left)
        coarse = None
        if left() > 0.03:
            coarse = _coarse_schedule(problem, warp, _with_time(params, left() / 3), hard_deadline=deadline)
        if coarse is not None:
            if warp and (heur_warp is None or coarse.ii < heur_warp.ii):
                heur_warp = coarse
            elif not warp and (heur_plain is None or coarse.ii < heur_plain.ii):
                heur_plain = coarse
        if heur_warp is not None and (heur_plain is None or heur_warp.ii < heur_plain.ii):
            # a warp-specialised schedule is a plain one too: without this the plain search was capped at the
            # plain heuristic's larger I, and the warp search, starting from the plain I found, could skip
            # (or, timing out there, raise an error despite) the better warp schedule in hand
            heur_plain = HeuristicSchedule(ii=heur_warp.ii, times=dict(heur_warp.times),
                                           groups={v: 0 for v in heur_warp.times}, copies={}, warp=False,
                                           seconds=heur_warp.seconds, source=heur_warp.source,
                                           method=heur_warp.method)

    def search(start: int, use_warp: bool, hint: Attempt | None = None, optimise: bool = True,
               heur: HeuristicSchedule | None = None) -> tuple[Attempt | None, bool]:
        cap = max_ii or ii_cap(problem, use_warp)
        top = max(cap, start)
        if heur is not None:
            top = max(min(top, heur.ii), start)  # the heuristic has a schedule there: no larger I is needed
        dead: set[int] = set()
        found: Attempt | None = None
        reserve = 0.0
        if heur is not None and top - start > BISECT_FROM:
            # a wide range (large latencies): bisect between the lower bound and the heuristic's I for a smaller
            # I with a schedule, a quarter of what is left per probe. Feasibility is not monotone in I, so this
            # only finds schedules; minimality still needs every I below proved infeasible
            lo, hi = start - 1, top
            while hi - lo > 1 and left() > 0.05:
                mid = (lo + hi) // 2
                att = solve_at(problem, mid, _with_time(params, left() / 4), warp=use_warp, optimise=False,
                               hint_times=hint.times if hint is not None and hint.ii == mid else None,
                               deadline=deadline)
                attempts.append(att)
                if att.has_solution:
                    att.status = "feasible"
                    hi, found = mid, att
                else:
                    lo = mid
                    if att.status == "infeasible":
                        dead.add(mid)
            top = hi
            reserve = 0.5  # of what is left when the scan below starts: kept for the answer's objective
        proven = True
        scan_end = time.perf_counter() + left() * (1 - reserve)
        for ii in range(start, top + 1):
            if ii in dead:
                continue
            rem = left() if ii == top or found is None else scan_end - time.perf_counter()
            if rem <= 0.01:
                if found is not None and ii < top:
                    proven = False
                    continue  # the scan's share is spent: straight on to the bisection's I
                return (found, False) if found is not None else (None, False)
            # feasibility first, on at most half of what is left unless this is the last I: a time-out here
            # still leaves time for a larger I (one attempt used to take the whole budget, so a time-out at
            # MII ended the search with no schedule at all); proofs of infeasibility are also faster without
            # the objective
            p = _with_time(params, rem / 2 if ii < top else rem)
            hint_times = hint_groups = None
            if found is not None and found.ii == ii:
                hint_times, hint_groups = found.times, found.groups
            elif heur is not None and heur.ii == ii:
                hint_times, hint_groups = heur.times, heur.groups
            elif hint is not None and hint.ii == ii:
                hint_times = hint.times
            att = solve_at(problem, ii, p, warp=use_warp, optimise=False, hint_times=hint_times,
                           hint_groups=hint_groups, deadline=deadline)
            if att.has_solution:
                att.status = "feasible"  # a satisfaction model says 'optimal' for any solution
                if optimise and left() > 0.01:
                    best = solve_at(problem, ii, _with_time(params, left()), warp=use_warp, optimise=True,
                                    hint_times=att.times, hint_groups=att.groups, load_slack=load_slack,
                                    deadline=deadline)
                    best.seconds += att.seconds
                    if best.has_solution:
                        att = best
                attempts.append(att)
                return att, proven
            attempts.append(att)
            if att.status != "infeasible":
                proven = False
        if found is not None:  # the bisection's schedule (no time left to improve it)
            return found, False
        if heur is not None:
            return None, False  # the last I (the heuristic's) timed out: it answers
        what = ("no warp-specialised schedule: the register, shared-memory or warp-group limits cannot be met"
                if use_warp else "no modulo schedule")
        raise (ValueError if proven else TimeLimitError)(
            f"graph {problem.graph.name!r}: {what} up to I = {cap}"
            + (" (nor at any larger I: at this one the ops already run one after another)" if proven
               else " (some attempts timed out; raise --time-limit)"))

    # with the warp problem to follow, the plain stage only decides feasibility at each I (its schedule is a
    # hint, its span is thrown away): optimising the span there spent the whole budget on a 30-op graph
    plain, plain_proven = search(bounds.mii, False, optimise=not warp, heur=heur_plain)
    plain_proven = plain_proven or (plain is not None and plain.ii == bounds.mii)
    if plain is None and not warp:
        if heur_plain is None:
            raise TimeLimitError(f"graph {problem.graph.name!r}: no schedule found within the time limit of "
                                 f"{params.time_limit:g} s (raise --time-limit)")
        return _from_heuristic(heur_plain, bounds, attempts, heur_plain.ii, False, False, time.perf_counter() - t0,
                               params, "CP-SAT found no schedule within the time limit")
    best, proven = plain, plain_proven
    if warp:
        ws = None
        ws_proven = False
        if plain is not None:
            ws, ws_proven = search(plain.ii, True, hint=plain, heur=heur_warp)
        if ws is None:
            if heur_warp is None:
                raise TimeLimitError(f"graph {problem.graph.name!r}: "
                                     + (f"plain modulo schedule at I = {plain.ii} found, but " if plain else "")
                                     + f"no warp-specialised schedule within the time limit of "
                                     f"{params.time_limit:g} s (raise --time-limit)")
            why = ("CP-SAT found no warp-specialised schedule within the time limit" if plain is not None else
                   "CP-SAT found no schedule within the time limit")
            plain_ii = plain.ii if plain is not None else (heur_plain.ii if heur_plain is not None else heur_warp.ii)
            return _from_heuristic(heur_warp, bounds, attempts, plain_ii, plain is not None and plain_proven, True,
                                   time.perf_counter() - t0, params, why)
        best, proven = ws, plain_proven and ws_proven
    assert best is not None
    timed_out, untried = _unproved(bounds, attempts, best.ii, warp)
    # e.g. the bisection's schedule at MII, not re-solved in time; or every I below proved infeasible, some out of
    # the scan's order (by the bisection)
    proven = proven or not (timed_out or untried)
    notes = []
    if not proven:
        notes.append(f"I = {best.ii} not proved minimal: " + "; ".join(
            ([f"I = {_ranges(timed_out)} timed out"] if timed_out else [])
            + ([f"I = {_ranges(untried)} not tried (out of time)"] if untried else [])))
    if best.status != "optimal":
        notes.append("secondary objective (groups, channels, span) not proved optimal")
    if not bounds.exact:
        notes.append(_INEXACT_MII.format(bounds.mii))
    heur_used = heur_warp if warp else heur_plain
    if heur_used is not None:
        notes.append(f"upper bound and hint from {heur_used.source}: I = {heur_used.ii} in {heur_used.seconds:.3g} s")
    status = "optimal" if proven and best.status == "optimal" else "feasible"
    gap = None
    if best.objective is not None and best.bound is not None:
        gap = max(0.0, (best.objective - best.bound) / max(abs(best.objective), 1e-9))
    if not proven:
        # I itself is not proved minimal: the smallest I not proved infeasible bounds it from below, and the gap
        # covers it (a time-out at MII gave 'feasible' with gap 0.0, as if only the tie-breakers were open)
        # (the smallest I >= MII not proved infeasible: with the bisection some I below were never tried)
        lowest = min(_lower_bound(bounds, attempts, warp), best.ii)
        gap = max(gap or 0.0, (best.ii - lowest) / best.ii)
    times = best.times
    # its span was not minimised: the least stages for its residues; not when the objective ran for load slack
    # (the least stages would take back the slack after the loads that it preferred over a short span)
    if time.perf_counter() >= hard:
        notes.append("stages not compacted: out of time")
    elif best.status != "optimal" and not (load_slack and warp and best.objective is not None):
        times = compact(problem, best.ii, best.times, best.groups, warp)
        if times != best.times:
            notes.append("stages compacted after the solve (fewest stages for its residues)")
            if warp:
                depth = buffer_depths(problem.graph, best.ii, times)
                best.copies = {v: depth[v] for v in best.copies}
    # (every smaller plain I proved infeasible proves it too - the bisection's proofs, out of the scan's order)
    plain_proven = plain_proven or plain.ii <= _lower_bound(bounds, attempts, False) or (not warp and proven)
    return Schedule(
        ii=best.ii, mii=bounds, plain_ii=plain.ii, plain_proven=plain_proven, proven=proven, status=status,
        gap=gap, objective=best.objective, bound=best.bound, seconds=time.perf_counter() - t0,
        times=times, groups=best.groups, copies=best.copies, attempts=attempts, warp=warp,
        note="; ".join(notes), params=params, load_slack=load_slack and warp,
    )
