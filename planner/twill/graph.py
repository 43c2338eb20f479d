"""Twill input model: a loop-body dependence graph of tile-level ops and a machine model.

A graph (JSON) lists functional ``units`` (optional; they override the machine's counts), ``ops`` with a
reservation table (``reserve[unit][c]`` = units of that kind held in the c-th cycle after issue) and
optional warp-related fields (``regs`` per thread, ``smem`` in KiB, ``variable_latency``, ``blocking``), and
``edges`` (u -> v: v issues at least ``delay`` cycles after u, ``distance`` iterations later). All times are
*normalised cycles* (small integers, see :func:`normalise_costs`).

A machine (JSON, ``machines/<name>.json``) gives unit counts, register and shared-memory budgets per warp
group, the cross-warp-group handoff cost and the maximum number of warp groups.

:func:`check_graph` turns every illegal input into one :class:`InputError` naming the op or edge.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adasched.profiler.io import InputError, load_model

__all__ = [
    "Op", "Edge", "Graph", "Machine", "Problem",
    "GRAPHS_DIR", "MACHINES_DIR", "MAX_OPS", "MAX_CYCLES", "MAX_UNITS", "MAX_RESOURCE", "MAX_WARP_GROUPS", "builtin_graphs", "builtin_machines",
    "load_graph", "load_machine", "check_graph", "make_problem", "normalise_costs",
]

GRAPHS_DIR = Path(__file__).with_name("graphs")
MACHINES_DIR = Path(__file__).with_name("machines")

#: Most ops in a graph and most normalised cycles of an edge's delay or an op's reservation table (graphs use small
#: integers, normalise_costs; scalebench's finest loops have 120 ops and 256-cycle delays). Beyond them the solve
#: and the schedule simulator ran for hours whatever --time-limit said (a delay of 10**9, 5000 ops). An edge's
#: distance is bounded by MAX_CYCLES too (10**30 failed inside OR-Tools).
MAX_OPS = 256
MAX_CYCLES = 1024
#: warp groups of a CTA: 1,024 threads / 128
MAX_WARP_GROUPS = 8
#: Most units of one kind (a machine's or graph's count, an op's entry in a reservation table); 10**30 overflowed
#: the schedule's int64 arrays.
MAX_UNITS = 1024

_Count = Annotated[int, Field(le=MAX_UNITS)]
#: Most registers or KiB of shared memory a machine or an op states: far beyond any GPU (an H100 SM: 64K registers,
#: 228 KiB); 2**63 KiB overflowed CP-SAT's linear sums (a traceback from `plan twill --machine`)
MAX_RESOURCE = 2 ** 31 - 1


class Op(BaseModel):
    """One tile-level operation of the loop body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    reserve: dict[str, list[_Count]] = Field(description="unit -> units held in each cycle after issue")
    regs: int | None = Field(default=None, ge=0, le=MAX_RESOURCE, description="registers per thread its result holds while live")
    smem: int | None = Field(default=None, ge=0, le=MAX_RESOURCE, description="shared memory (KiB) one live copy of its result holds")
    variable_latency: bool | None = Field(default=None, description="latency unknown at compile time (TMA loads)")
    blocking: bool | None = Field(default=None, description="its warp group can issue nothing else while it runs")
    category: str = Field(default="", description="label for plots (e.g. 'tma', 'mma', 'softmax')")

    @field_validator("reserve")
    @classmethod
    def _rows(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for unit, row in v.items():
            if not row:
                raise ValueError(f"reserve[{unit!r}] is empty (give at least one cycle)")
            if len(row) > MAX_CYCLES:
                raise ValueError(f"reserve[{unit!r}] has {len(row):,} cycles, at most {MAX_CYCLES}")
            if any(x < 0 for x in row):
                raise ValueError(f"reserve[{unit!r}] has a negative count")
        return v

    @property
    def length(self) -> int:
        """Cycles of its reservation table (>= 1): how long it runs."""
        return max([len(r) for r in self.reserve.values()] + [1])

    def usage(self, unit: str) -> int:
        return sum(self.reserve.get(unit, ()))


class Edge(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)
    src: str = Field(alias="from")
    dst: str = Field(alias="to")
    delay: int = Field(default=0, ge=0, le=MAX_CYCLES, description="minimum issue-to-issue distance (normalised "
                                                                  "cycles)")
    distance: int = Field(default=0, ge=0, le=MAX_CYCLES, description="iteration distance (1 = loop-carried)")
    value: bool = Field(default=True, description="carries a value (crossing warp groups costs a handoff)")

    def label(self) -> str:
        return f"{self.src}->{self.dst}"


class Graph(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = "graph"
    description: str = ""
    machine: str | None = Field(default=None, description="machine the graph was written for (hint)")
    units: dict[str, _Count] | None = Field(default=None, description="unit counts; override the machine's")
    ops: list[Op] = Field(min_length=1, max_length=MAX_OPS)
    edges: list[Edge] = Field(default_factory=list)

    @field_validator("units")
    @classmethod
    def _units(cls, v):
        if v is not None:
            for k, n in v.items():
                if n < 0:
                    raise ValueError(f"units[{k!r}] = {n} must be >= 0")
        return v

    def has_warp_fields(self) -> bool:
        """True when any op gives registers or shared memory (> 0), variable latency or a blocking wait (true).
        A field that states the default ("variable_latency": false, "regs": 0) asks for nothing: it switched the
        warp-specialised model on and could raise I over the plain minimum (5 independent ALU ops on 5 ALUs: I = 2
        instead of 1 for one "variable_latency": false)."""
        return any((o.regs or 0) > 0 or (o.smem or 0) > 0 or bool(o.variable_latency) or bool(o.blocking)
                   for o in self.ops)

    def value_uses(self) -> list[tuple[str, str, int]]:
        """(producer, consumer, iterations later) of every read that keeps a value live: each value edge, except
        that a self-loop of distance d writes in place, so its value outlives only the d - 1 later instances
        (src, src, d - 1) and an in-place accumulator (d = 1) adds nothing. The lifetime rule
        ``t_consumer + I * distance + len_consumer - t_producer`` then gives every user of it (the solver's model
        and the knobs) the same buffer counts; the validator and the simulator re-derive the rule from the plan's
        JSON on their own, as independent checks."""
        return [(e.src, e.dst, e.distance - (e.src == e.dst)) for e in self.edges
                if e.value and (e.src != e.dst or e.distance >= 2)]

    def min_copies(self) -> dict[str, int]:
        """Buffers each op's value needs at every I: d for a value self-loop of distance d >= 2 (its lifetime
        (d - 1) * I + length spans more than d - 1 iterations), else 1."""
        out = {o.name: 1 for o in self.ops}
        for e in self.edges:
            if e.value and e.src == e.dst and e.src in out:
                out[e.src] = max(out[e.src], e.distance)
        return out

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)


class Machine(BaseModel):
    """Per-SM resources of one GPU, in normalised cycles (``cycle_ns`` converts back)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    description: str = ""
    # finite numbers only (Infinity/NaN were written as null into a plan that `show` then refused)
    cycle_ns: float = Field(gt=0, allow_inf_nan=False, description="nanoseconds per normalised cycle")
    units: dict[str, _Count]
    max_warp_groups: int = Field(ge=1, le=MAX_WARP_GROUPS, description="a CTA holds at most 1,024 threads: 8 "
                                                                       "groups of 128 (10**6 ran 100 s and 1.8 GB "
                                                                       "past a 3 s limit)")
    threads_per_group: int = Field(default=128, ge=32, le=1024)
    regs_per_group_max: int = Field(ge=1, le=MAX_RESOURCE, description="registers per thread a warp group may hold (setmaxnreg cap)")
    regs_total: int = Field(ge=1, le=MAX_RESOURCE, description="registers per thread summed over warp groups (register file / 128)")
    group_base_regs: int = Field(default=0, ge=0, le=MAX_RESOURCE, description="registers per thread every used group needs")
    smem_capacity: int = Field(ge=1, le=MAX_RESOURCE, description="shared memory per CTA (KiB)")
    handoff_cycles: int = Field(ge=0, le=MAX_CYCLES, description="extra delay when a value crosses warp groups "
                                                                  "(mbarrier)")
    warp_specialize: bool = Field(description="Triton's tl.range(warp_specialize=True) is supported here")
    raw_cycles: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict, description="hardware cycles of op classes")
    clock_ghz: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    tensor_flops_per_cycle: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                          description="dense fp16 FLOP per SM cycle")


    @field_validator("units")
    @classmethod
    def _units(cls, v):
        # (a negative count was blamed on the graph that used the unit, or planned where the graph overrode it)
        return Graph._units(v)

    @model_validator(mode="after")
    def _base_within_cap(self) -> "Machine":
        # a base above the per-group cap read as "an op needs None registers ... at most -60"
        if self.group_base_regs > self.regs_per_group_max:
            raise ValueError(f"group_base_regs {self.group_base_regs} is above regs_per_group_max "
                             f"{self.regs_per_group_max}")
        # the maxnreg knob is setmaxnreg's argument: a multiple of 8, at most 255 registers per thread (so 248); a
        # cap of 255 let a group hold 250 and the knob said 248 (the kernel would spill)
        if self.warp_specialize and (self.regs_per_group_max % 8 or not 24 <= self.regs_per_group_max <= 248):
            raise ValueError(f"regs_per_group_max {self.regs_per_group_max}: a warp_specialize machine's cap is "
                             f"setmaxnreg's, a multiple of 8 in [24, 248]")
        return self


class Problem(BaseModel):
    """A checked graph with the effective unit counts of graph + machine."""

    model_config = ConfigDict(extra="forbid")
    graph: Graph
    machine: Machine
    units: dict[str, int]
    warp: bool = Field(description="solve the joint SWP + warp-specialisation problem")


def builtin_graphs() -> list[str]:
    return sorted(p.stem for p in GRAPHS_DIR.glob("*.json"))


def builtin_machines() -> list[str]:
    return sorted(p.stem for p in MACHINES_DIR.glob("*.json"))


def _resolve(spec: str | os.PathLike, folder: Path, what: str, names: list[str]) -> Path:
    s = os.fspath(spec)
    if (folder / f"{s}.json").is_file() and os.sep not in s and not s.endswith(".json"):
        return folder / f"{s}.json"
    p = Path(s)
    if p.is_file() or s.endswith(".json") or os.sep in s:
        return p
    raise InputError(f"--{what}", f"{s!r} is neither a built-in {what} ({', '.join(names)}) nor a file")


def load_graph(spec: str | os.PathLike) -> tuple[Graph, str]:
    """A built-in graph name or a JSON file -> (Graph, where) where 'where' names it in errors."""
    path = _resolve(spec, GRAPHS_DIR, "graph", builtin_graphs())
    return load_model(path, Graph), str(path)


def load_machine(spec: str | os.PathLike) -> Machine:
    path = _resolve(spec, MACHINES_DIR, "machine", builtin_machines())
    return load_model(path, Machine)


def _zero_distance_cycle(graph: Graph) -> list[str] | None:
    """Ops on a cycle made only of distance-0 edges (iterative DFS), or None."""
    succ: dict[str, list[str]] = {o.name: [] for o in graph.ops}
    for e in graph.edges:
        if e.distance == 0:
            succ[e.src].append(e.dst)
    colour = {n: 0 for n in succ}  # 0 new, 1 on stack, 2 done
    for root in succ:
        if colour[root]:
            continue
        stack = [(root, iter(succ[root]))]
        path = [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
                path.append(nxt)
    return None


def check_graph(graph: Graph, machine: Machine, where: str = "graph") -> Problem:
    """Validate a graph against a machine; every problem is an InputError naming the op or edge."""
    seen: set[str] = set()
    for i, o in enumerate(graph.ops):
        if o.name in seen:
            raise InputError(where, f"ops[{i}]: duplicate op name {o.name!r}")
        seen.add(o.name)
    units = dict(machine.units)
    units.update(graph.units or {})
    for i, e in enumerate(graph.edges):
        for end in (e.src, e.dst):
            if end not in seen:
                raise InputError(where, f"edges[{i}] {e.label()}: unknown op {end!r}")
    cyc = _zero_distance_cycle(graph)
    if cyc:
        delay = {}
        for e in graph.edges:
            if e.distance == 0:
                delay[e.src, e.dst] = max(e.delay, delay.get((e.src, e.dst), e.delay))
        total = sum(delay[a, b] for a, b in zip(cyc, cyc[1:]))
        why = "no legal schedule" if total > 0 else (  # (delays summing to <= 0: the ops could issue in one
            # cycle; "no legal schedule" was not true)
            f"a dependence cycle inside one iteration, here of total delay {total}: not supported - merge its ops or "
            f"give one edge distance 1")
        raise InputError(where, f"edges: cycle of zero total distance {' -> '.join(cyc)} ({why})")
    warp = graph.has_warp_fields()
    room = machine.regs_per_group_max - machine.group_base_regs
    copies = graph.min_copies()

    def times(o) -> str:  # "2 copies x 120" where a self-loop needs several buffers at any I
        return f"{copies[o.name]} copies x " if copies[o.name] > 1 else ""
    for i, o in enumerate(graph.ops):
        for unit, row in o.reserve.items():
            if unit not in units:
                raise InputError(where, f"ops[{i}] {o.name!r}: reserves unit {unit!r} which machine "
                                        f"{machine.name!r} lacks (has {', '.join(sorted(units))})")
            if max(row) > units[unit]:
                raise InputError(where, f"ops[{i}] {o.name!r}: holds {max(row)} {unit!r} in one cycle but only "
                                        f"{units[unit]} exist")
        if warp and (o.regs or 0) * copies[o.name] > room:
            raise InputError(where, f"ops[{i}] {o.name!r}: needs {times(o)}{o.regs} registers per thread but a warp "
                                    f"group has at most {room} (machine {machine.name!r})"
                                    + (" - a value self-loop of distance d keeps d copies live at every I"
                                       if copies[o.name] > 1 else ""))
        if warp and (o.smem or 0) * copies[o.name] > machine.smem_capacity:
            raise InputError(where, f"ops[{i}] {o.name!r}: needs {times(o)}{o.smem} KiB of shared memory but machine "
                                    f"{machine.name!r} has {machine.smem_capacity} KiB"
                                    + (" - a value self-loop of distance d keeps d copies live at every I"
                                       if copies[o.name] > 1 else ""))
    var = [i for i, o in enumerate(graph.ops) if o.variable_latency]
    fixed = [o.name for o in graph.ops if not o.variable_latency]
    if warp and machine.max_warp_groups < 2:
        if var and fixed:  # the producer group of its own needs a second group (the solver searched in vain)
            i = var[0]
            raise InputError(where, f"ops[{i}] {graph.ops[i].name!r}: variable latency needs a producer warp group "
                                    f"of its own, but machine {machine.name!r} has max_warp_groups = "
                                    f"{machine.max_warp_groups} and op {fixed[0]!r} has a fixed latency")
    if warp:
        # one buffer per value at least (d for a value self-loop of distance d), at any I: registers and shared
        # memory that cannot fit then are refused here (3 ops of 200 registers searched every I and said "raise
        # --time-limit"; a distance-2 accumulator of 120 searched up to I = 5 and named no op)
        need = sum((o.regs or 0) * copies[o.name] for o in graph.ops)
        buffers = ("one buffer per value" if max(copies.values()) == 1 else
                   "the buffers any I needs (one per value, d for a value self-loop of distance d)")
        groups = max(-(-need // room) if room > 0 else 1, 2 if var and fixed else 1)
        if groups > machine.max_warp_groups or need + groups * machine.group_base_regs > machine.regs_total:
            raise InputError(where, f"ops: {need} registers per thread with {buffers} need at least {groups} warp "
                                    f"group(s) and {need + groups * machine.group_base_regs} registers with their "
                                    f"base, but machine {machine.name!r} has {machine.max_warp_groups} groups of at "
                                    f"most {room} above the base {machine.group_base_regs}, {machine.regs_total} in "
                                    f"all: no I fits")
        smem = sum((o.smem or 0) * copies[o.name] for o in graph.ops)
        if smem > machine.smem_capacity:
            raise InputError(where, f"ops: {smem} KiB of shared memory with {buffers}, but machine "
                                    f"{machine.name!r} has {machine.smem_capacity} KiB: no I fits")
    return Problem(graph=graph, machine=machine, units=units, warp=warp)


def make_problem(graph: str | os.PathLike | Graph, machine: str | os.PathLike | Machine | None = None) -> Problem:
    """Load (if given names/paths) and check a graph and a machine (default: the graph's ``machine`` hint,
    else h100)."""
    where = "graph"
    if not isinstance(graph, Graph):
        graph, where = load_graph(graph)
    if machine is None and graph.machine:  # the graph file's hint: an unknown one is the file's error, not --machine's
        try:
            machine = load_machine(graph.machine)
        except InputError as err:
            raise InputError(where, f"machine: {err.what}") from None
    if machine is None:
        machine = "h100"
    if not isinstance(machine, Machine):
        machine = load_machine(machine)
    return check_graph(graph, machine, where)


def normalise_costs(raw: dict[str, float], max_cost: int = 16, tolerance: float = 0.15,
                    overhead: float = 1 / 8) -> tuple[dict[str, int], float]:
    """Scale raw costs (e.g. hardware cycles) to small integers in [1, max_cost] keeping their ratios.

    Exact search over the candidate cycle units ``u = raw_i / k`` (k = 1..max_cost, every i), with
    cost_i = max(1, floor(raw_i / u + 1/2)). The error of a unit is the largest relative error
    |cost_i * u - raw_i| / raw_i over the *main* costs, those of at least ``overhead`` times the largest;
    smaller ones (issue and barrier overheads) are rounded up to 1, never collapsed to 0. The coarsest unit
    (smallest integers) whose error is within ``tolerance`` wins; when none is, the unit with the smallest
    error. Returns (costs, unit) with the unit in the raw costs' own units (e.g. SM cycles per normalised
    cycle)."""
    if not raw:
        return {}, 1.0
    for k, v in raw.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"raw cost {k!r} = {v} must be a positive number")
    top = max(raw.values())
    main = [k for k, v in raw.items() if v >= overhead * top]
    # exact fractions: limit_denominator(10**6) rounded costs below ~5e-7 to a unit of 0 (ZeroDivisionError)
    cands = {Fraction(v) / k for v in raw.values() for k in range(1, max_cost + 1)}
    fallback: tuple[float, float, dict[str, int]] | None = None
    for u in sorted(cands, reverse=True):  # coarsest first
        uf = float(u)
        costs = {k: max(1, math.floor(v / uf + 0.5)) for k, v in raw.items()}
        if max(costs.values()) > max_cost:
            continue
        err = max(abs(costs[k] * uf - raw[k]) / raw[k] for k in main)
        if err <= tolerance:
            return costs, uf
        if fallback is None or err < fallback[0] - 1e-12:
            fallback = (err, uf, costs)
    assert fallback is not None
    return fallback[2], fallback[1]
