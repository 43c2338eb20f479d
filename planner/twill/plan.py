"""The Twill plan: a modulo schedule with warp-group assignment, buffer depths and Triton knobs.

``predicted_ms`` is the steady-state time of one loop iteration on one SM (I * cycle_ns); the baseline
``no-pipelining`` runs one iteration after the other (a resource-aware list schedule of one iteration).
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adasched.planner.plan import NonNegMs, Plan, inputs_digest
from adasched.planner.solver import Status
from adasched.profiler.io import describe_validation_error
from .graph import Graph, Problem
from .knobs import TritonKnobs, buffer_depths, derive_knobs

__all__ = ["OpSlot", "WarpGroup", "AttemptRecord", "TwillPlan", "make_plan", "plan_twill", "serial_cycles"]


class OpSlot(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    issue_cycle: int = Field(ge=0, description="issue cycle of iteration 0 (normalised cycles)")
    stage: int = Field(ge=0)
    residue: int = Field(ge=0)
    warp_group: int = Field(ge=0)
    length: int = Field(ge=1)
    category: str = ""
    units: list[str] = Field(default_factory=list)


class WarpGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    role: Literal["producer", "consumer", "all"]
    ops: list[str]
    kinds: list[str] = Field(default_factory=list, description="categories of its ops (e.g. tma, mma, softmax)")
    regs: int = Field(description="registers per thread its live values need (incl. the base)")


#: the largest I a plan may state (an edited 10**400 failed the float checks with OverflowError, a traceback)
MAX_II = 2 ** 31 - 1


#: seconds verify spends re-solving the I's a plan's attempts record infeasible (see
#: TwillPlan._infeasible_attempt_errors; those proofs take milliseconds on the built-in graphs)
REPROVE_BUDGET_S = 2.0


class AttemptRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ii: int = Field(ge=1, le=MAX_II)
    warp: bool
    status: Status
    seconds: NonNegMs  # (seconds, not ms: the same non-negative finite number)


class TwillPlan(Plan):
    kind: Literal["twill"] = "twill"
    graph_name: str
    machine_name: str
    ii: int = Field(ge=1, le=MAX_II, description="initiation interval (normalised cycles per iteration)")
    mii: int = Field(ge=1, description="the lower bound on I the status refers to: max(res_mii, rec_mii, excl_mii, 1) "
                                       "(optimal only when ii = mii or every I in [mii, ii) was proved infeasible)")
    res_mii: int = Field(ge=0, description="ResMII: max over units of ceil(reservation per iteration / capacity)")
    rec_mii: int = Field(ge=0, description="RecMII: smallest I with no positive cycle under weights delay - I * distance "
                                     "(a lower bound on it when the solve's deadline cut its search short)")
    excl_mii: int = Field(default=0, ge=0, description="the exclusive-cells bound (mii.exclusive_mii) when it is above "
                                                       "res_mii and rec_mii, else 0 (0 in plans written before it)")
    plain_ii: int = Field(ge=1, le=MAX_II, description="smallest I of plain modulo scheduling (no warp constraints) "
                                                       "found: minimal when plain_ii_proven; when CP-SAT found no plain "
                                                       "schedule in time, a heuristic's I")
    plain_ii_proven: bool | None = Field(default=None, description="plain_ii was proved minimal (None in plans "
                                                                   "written before this field)")
    ii_proven_minimal: bool
    method: Literal["cp-sat", "heuristic", "cp-sat-coarse"] = Field(
        default="cp-sat", description="what produced the schedule: CP-SAT; when it found none in time, iterative "
                                      "modulo scheduling or CP-SAT in a coarser time unit, scaled back")
    warp_specialised: bool = Field(description="the joint SWP + warp-specialisation problem was solved")
    load_slack: bool = Field(default=False, description="the objective preferred slack (deeper buffers) after "
                                                        "variable-latency loads, below groups and channels")
    stages: int = Field(ge=1)
    cycle_ns: float = Field(gt=0, allow_inf_nan=False)
    ops: list[OpSlot]
    warp_groups: list[WarpGroup]
    channels: list[str] = Field(description="value edges that cross warp groups (u->v)")
    buffers: dict[str, int] = Field(description="live copies (buffer depth) of each value held in regs/smem")
    peeled: list[str] = Field(description="ops issued at an earlier stage than their group's last op: their "
                                          "first instances run in the prologue")
    knobs: TritonKnobs
    attempts: list[AttemptRecord]
    sim_cycles_per_iteration: float | None = Field(default=None, ge=0, allow_inf_nan=False,
                                                   description="simsched, ASAP in-order issue")
    sim_deadlock: bool | None = None
    sim_replay_exact: bool | None = Field(default=None, description="simsched replaying the static schedule "
                                          "issued every op instance exactly at its scheduled cycle")
    graph: dict[str, Any]
    machine: dict[str, Any]

    def verify(self) -> list[str]:
        """The independent validator (``validator.validate``) on the embedded graph and machine, plus the plan's
        own bookkeeping: I not below its MII, every op in a listed warp group and each group listing exactly
        its ops, ``stages`` = the last op's stage + 1. ``make_plan`` runs it on every plan it emits and
        ``load_plan`` on every plan it reads."""
        from .validator import validate

        errors = super().verify()
        if self.ii < self.mii:
            errors.append(f"ii {self.ii} is below the plan's MII {self.mii}")
        if self.mii < max(self.res_mii, self.rec_mii, self.excl_mii):
            errors.append(f"mii {self.mii} is below its own bounds (res {self.res_mii}, rec {self.rec_mii}, exclusive "
                          f"cells {self.excl_mii})")
        errors += self._solver_record_errors()
        groups = {g.index: g for g in self.warp_groups}
        for s in self.ops:
            if s.warp_group not in groups:
                errors.append(f"op {s.name}: warp group {s.warp_group} is not one of the plan's {sorted(groups)}")
        for q, g in groups.items():
            members = sorted(s.name for s in self.ops if s.warp_group == q)
            if sorted(g.ops) != members:
                errors.append(f"warp group {q} lists ops {sorted(g.ops)}, the schedule puts {members} there")
        if self.ops and self.stages != max(s.stage for s in self.ops) + 1:
            errors.append(f"stages {self.stages} != the last op's stage + 1 ({max(s.stage for s in self.ops) + 1})")
        try:
            from adasched.profiler.io import InputError

            from .graph import Graph, Machine, check_graph

            graph = Graph.model_validate(self.graph)
            machine = Machine.model_validate(self.machine)
            digest = inputs_digest(graph, machine)
            try:  # the rules a graph file meets (unique op names, known endpoints and units, no zero-distance cycle)
                check_graph(graph, machine)
            except InputError as err:
                errors.append(f"graph / machine: {err}")
            # (on the validated graph: a hand-edited 'reserve' of another shape was a TypeError traceback)
            reserved = {o.name: sorted(u for u, row in o.reserve.items() if any(row)) for o in graph.ops}
            for s in self.ops:  # the units drawn for an op are the ones its reservation table holds
                if s.name in reserved and sorted(s.units) != reserved[s.name]:
                    errors.append(f"op {s.name}: units {sorted(s.units)}, its reservation table holds "
                                  f"{reserved[s.name]}")
            if graph.has_warp_fields() != self.warp_specialised:
                # the validator checks groups, buffers and registers by this flag: a plan of a warp graph with it
                # turned off passed with every op in one group and one buffer per value
                errors.append(f"warp_specialised {self.warp_specialised}: the graph "
                              f"{'gives' if graph.has_warp_fields() else 'gives no'} warp fields (registers, shared "
                              f"memory, variable latency, blocking waits), so the plan must be "
                              f"{'warp-specialised' if graph.has_warp_fields() else 'a plain modulo schedule'}"
                              # a plan made before 2026-11-30 from a graph whose only warp fields state their
                              # defaults ("regs": 0, "variable_latency": false) was warp-specialised then
                              + ("" if graph.has_warp_fields() or not any(
                                  o.regs is not None or o.smem is not None or o.variable_latency is not None
                                  or o.blocking is not None for o in graph.ops) else
                                 " (its only warp fields state their defaults, which no longer select the warp model "
                                 "since 2026-11-30: re-plan it)"))
            if digest != self.inputs_digest:
                errors.append(f"graph / machine: not the ones the plan was solved for (inputs digest {digest[:12]}... "
                              f"!= {self.inputs_digest[:12]}...)")
        except ValidationError as err:
            errors.append(f"graph / machine: not a valid graph and machine ({describe_validation_error(err)})")
        try:
            errors += validate(self.graph, self.machine, self.model_dump(mode="json"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            errors.append(f"graph / machine: not a graph and machine the validator can read ({type(err).__name__}: "
                          f"{err})")
        if not math.isclose(self.predicted_ms, self.ii * self.cycle_ns * 1e-6, rel_tol=1e-9, abs_tol=1e-12):
            errors.append(f"predicted_ms {self.predicted_ms} is not I x cycle_ns ({self.ii} x {self.cycle_ns} ns)")
        if not errors:  # a schedule the validator accepts: what the plan derives from it, recomputed
            from .graph import Graph, Machine

            errors += self._derived_errors(Graph.model_validate(self.graph), Machine.model_validate(self.machine))
        return errors

    def _open_iis(self) -> list[int]:
        """The I from MII up to (not including) the plan's that no attempt of its kind (any attempt for a
        warp-specialized plan, plain ones for a plain plan) proved infeasible, ascending."""
        dead = {a.ii for a in self.attempts if a.status == "infeasible" and (self.warp_specialised or not a.warp)}
        return [i for i in range(self.mii, self.ii) if i not in dead]

    def _solver_record_errors(self) -> list[str]:
        """The solver record agrees with the schedule's own claims: status optimal only with I proved minimal, I = MII
        proved minimal, an unproved I's gap at least (I - the smallest I >= MII no attempt proved infeasible) / I, the
        backend the method's (a heuristic plan edited to 'optimal, gap 0' showed as such beside 'not proved
        minimal')."""
        errors = []
        sol = self.solver
        want_backend = "heuristic" if self.method == "heuristic" else "ortools-cp-sat"
        if sol.backend != want_backend:
            errors.append(f"solver.backend {sol.backend!r}: method {self.method} is solved by {want_backend!r}")
        if sol.status not in ("optimal", "feasible"):
            errors.append(f"solver.status {sol.status!r}: a Twill plan's is 'optimal' or 'feasible'")
        if self.ii == self.mii and not self.ii_proven_minimal:
            errors.append(f"ii_proven_minimal false, but I = MII = {self.ii} (a lower bound) proves it")
        if self.plain_ii == self.mii and self.plain_ii_proven is False:
            errors.append(f"plain_ii_proven false, but plain_ii = MII = {self.plain_ii} (a lower bound) proves it")
        if not self.warp_specialised and self.plain_ii_proven is not None and (
                self.plain_ii != self.ii or self.plain_ii_proven != self.ii_proven_minimal):
            errors.append(f"plain_ii {self.plain_ii} (proved {self.plain_ii_proven}): a plain modulo schedule's is "
                          f"its own I {self.ii} (proved {self.ii_proven_minimal})")
        # the plan holds a schedule at I (and plain_ii is where a plain one was found): an attempt that proved one
        # of them infeasible contradicts it (a plain-infeasible I is infeasible for warp schedules too)
        for a in self.attempts:
            if a.status == "infeasible" and (a.ii == self.ii and (self.warp_specialised or not a.warp)
                                             or a.ii == self.plain_ii and not a.warp):
                errors.append(f"attempts: I = {a.ii} ({'warp-specialised' if a.warp else 'plain'}) is recorded "
                              f"infeasible, but the plan holds a schedule at "
                              f"{'I' if a.ii == self.ii else 'plain_ii'} = {a.ii}")
                break
        if sol.status == "optimal" and not self.ii_proven_minimal:
            errors.append(f"solver.status 'optimal', but I = {self.ii} is not proved minimal")
        if not self.ii_proven_minimal:
            lowest = (self._open_iis() + [self.ii])[0]
            need = (self.ii - lowest) / self.ii
            if sol.gap is None or sol.gap < need - 1e-9:
                errors.append(f"solver.gap {sol.gap}: I = {self.ii} is not proved minimal and I = {lowest} is open, "
                              f"so the gap is at least {need:.6g}")
        return errors

    def _derived_errors(self, graph, machine) -> list[str]:
        """The fields that follow from the schedule, graph and machine, recomputed (see :func:`_derived_fields`),
        the lower bounds (ResMII exactly; the MII never above the graph's, which would make "proved minimal" a false
        claim), the plain I at or above MII, and a proved-minimal I whose every
        smaller I down to MII the attempts proved infeasible."""
        from .graph import make_problem
        from .mii import compute_mii

        errors = []
        names = {o.name for o in graph.ops}
        if {s.name for s in self.ops} != names or len(self.ops) != len(names):
            return [f"ops: {sorted(s.name for s in self.ops)}, the graph's ops are {sorted(names)}"]
        if self.cycle_ns != machine.cycle_ns:
            errors.append(f"cycle_ns {self.cycle_ns}: the machine's is {machine.cycle_ns}")
        # (the labels show and simulate print: an edited machine_name showed an H100 plan as made for a B200)
        if self.machine_name != machine.name:
            errors.append(f"machine_name {self.machine_name!r}: the embedded machine is {machine.name!r}")
        if self.graph_name != graph.name:
            errors.append(f"graph_name {self.graph_name!r}: the embedded graph is {graph.name!r}")
        times = {s.name: s.issue_cycle for s in self.ops}
        groups = {s.name: s.warp_group for s in self.ops}
        if any(t < 0 for t in times.values()):
            return errors + ["ops: a negative issue cycle"]
        want = _derived_fields(graph, machine, self.ii, times, groups, self.warp_specialised)
        for key, value in want.items():
            have = _plain(getattr(self, key))
            if have != _plain(value):
                errors.append(f"{key}: {_short(have)}, the schedule on the embedded graph and machine gives "
                              f"{_short(_plain(value))}" + (" (knobs of an earlier mapping - made before 2026-11-30? "
                                                            "re-plan)" if key == "knobs" else ""))
        if self.plain_ii < self.mii:
            errors.append(f"plain_ii {self.plain_ii} is below the MII {self.mii} (a bound of every schedule)")
        found = [a.ii for a in self.attempts if not a.warp and a.status in ("optimal", "feasible")]
        if found and self.plain_ii > min(found):
            errors.append(f"plain_ii {self.plain_ii} is above I = {min(found)}, where the plan's attempts found a plain "
                          "schedule (plain_ii is the smallest found)")
        problem = make_problem(graph, machine)
        # the baseline and the simulation's figures `show` prints (an edited 1e-9 ms baseline, "DEADLOCK" beside a
        # rate were shown as planned). The rate itself is not bounded here: it is measured over a finite window,
        # which can sit a little below the units' bound (bursts of a unit's copies) - a plan failed its own check
        serial = serial_cycles(graph, problem.units, handoff=machine.handoff_cycles if self.warp_specialised else 0,
                               groups=groups if self.warp_specialised else None)
        base = self.baselines_ms.get("no-pipelining")
        if base is None or not math.isclose(base, serial * machine.cycle_ns * 1e-6, rel_tol=1e-9, abs_tol=1e-15):
            errors.append(f"baselines_ms.no-pipelining: {base}, the graph without pipelining takes {serial} cycles "
                          f"= {serial * machine.cycle_ns * 1e-6} ms")
        cpi = self.sim_cycles_per_iteration
        if (cpi is None) != (self.sim_deadlock is not False) or (self.sim_deadlock is None) != (
                self.sim_replay_exact is None):
            errors.append(f"sim_cycles_per_iteration {cpi}, sim_deadlock {self.sim_deadlock}, sim_replay_exact "
                          f"{self.sim_replay_exact}: a simulation gives a rate without deadlock, none with one, and "
                          f"a skipped one none of the three")
        elif self.sim_deadlock is not None:  # the figures themselves, re-simulated (an edited rate was shown as is)
            too_big = _too_big_to_simulate(graph, self.stages)
            have = (cpi, self.sim_deadlock, self.sim_replay_exact)
            got = None if too_big else _simulation(graph, machine, problem.units, self.ii, times, groups,
                                                   self.warp_specialised)
            if too_big:
                errors.append(f"sim_cycles_per_iteration {cpi}: a schedule this size is not simulated ({too_big})")
            elif have != got:
                errors.append(f"simulation (cycles/iteration, deadlock, replay exact) {have}: re-simulating the "
                              f"schedule gives {got}")
        bounds = compute_mii(problem, deadline=time.perf_counter() + VERIFY_MII_SECONDS)
        if self.res_mii != bounds.res:
            errors.append(f"res_mii {self.res_mii}: the graph's reservations give {bounds.res}")
        if bounds.exact:  # (only an exact RecMII decides them; excl_mii follows from it, where the plan has it: a
            # plan written before the field loads with 0)
            from .model import _INEXACT_MII

            # a plan whose own RecMII search ran out of time (its note says so) recorded a lower bound: at most the
            # graph's; its exclusive-cells bound was computed from that one (the planner's own --time-limit 0.001
            # plans failed their verify here)
            inexact = _INEXACT_MII.split(":")[0] in (self.solver.note or "")
            for name, have, want in (("rec_mii", self.rec_mii, bounds.rec), ("excl_mii", self.excl_mii, bounds.excl)):
                if name not in self.model_fields_set or (inexact and (name == "excl_mii" or have <= want)):
                    continue
                if have != want:  # (an edited one was shown as the graph's bound)
                    errors.append(f"{name} {have}: the graph gives {want}"
                                  + (" (a bound whose search ran out of time is at most that)" if inexact else ""))
        if bounds.exact and self.mii > bounds.mii:  # (mii >= rec_mii, excl_mii is checked above)
            errors.append(f"mii {self.mii} (rec {self.rec_mii}, exclusive cells {self.excl_mii}): above the graph's "
                          f"MII {bounds.mii} (a lower bound that high would make a longer I look minimal)")
        if self.ii_proven_minimal:
            open_ = self._open_iis()
            if open_:
                errors.append(f"ii_proven_minimal: I = {open_[0]} (>= MII {self.mii}, < ii {self.ii}) was not "
                              f"proved infeasible by any attempt")
        if not errors:
            errors += self._infeasible_attempt_errors(problem)
        return errors

    def _infeasible_attempt_errors(self, problem) -> list[str]:
        """The attempts recorded infeasible re-solved, as feasibility problems, within
        :data:`REPROVE_BUDGET_S` in all (smallest I first): one where a schedule exists refutes the record (a
        forged "I = 2 infeasible" made a valid I = 3 schedule show as "optimal, proved minimal"; h47). Those the
        budget does not reach, or whose solve runs out of time, stand as the solver recorded them."""
        import importlib
        import time

        from ..solver import SolveParams
        from .model import solve_at

        claims = sorted({(a.ii, a.warp) for a in self.attempts if a.status == "infeasible"})
        if not claims:
            return []
        # OR-Tools imported before the clock starts: under load the import alone took the budget, and a forged
        # record stood or fell with the machine's load (r11)
        importlib.import_module("ortools.sat.python.cp_model")

        end = time.perf_counter() + REPROVE_BUDGET_S
        for ii, warp in claims:
            left = end - time.perf_counter()
            if left <= 0.01:
                break
            att = solve_at(problem, ii, SolveParams(time_limit=left), warp=warp, optimise=False,
                           deadline=time.perf_counter() + left)
            if att.has_solution:
                kind = "warp-specialised" if warp else "plain"
                return [f"attempts: I = {ii} ({kind}) is recorded infeasible, but a {kind} schedule exists there "
                        f"(found re-solving it)"]
        return []

    # ---- presentation ----------------------------------------------------------------------------------
    def summary_rows(self) -> list[tuple[str, str]]:
        rows = super().summary_rows()
        rows[3:3] = [
            ("graph / machine", f"{self.graph_name} / {self.machine_name}"),
            ("method", self.method + _METHOD_NOTE.get(self.method, "")),
            ("ii (cycles/iter)", f"{self.ii} (MII {self.mii}: res {self.res_mii}, rec {self.rec_mii}"
             + (f", exclusive cells {self.excl_mii}" if self.excl_mii
                else ", exclusive-cells bound" if self.mii > max(self.res_mii, self.rec_mii, 1) else "")
             + f"; plain {self.plain_ii}" + (", not proved minimal" if self.plain_ii_proven is False else "") + ")"
             + ((", proved minimal" + ("; the solver's gap is the tie-breakers' (groups, channels, span)"
                                        if self.solver.gap else "")) if self.ii_proven_minimal
                else ", not proved minimal")),
            ("stages", str(self.stages) + (" (objective preferred load slack)" if self.load_slack else "")),
            ("warp groups", "; ".join(f"WG{g.index} {g.role}: {' '.join(g.ops)} ({g.regs} regs)"
                                      for g in self.warp_groups)),
            ("channels", ", ".join(self.channels) or "-"),
            ("buffers", ", ".join(f"{k}x{v}" for k, v in self.buffers.items()) or "-"),
            ("peeled", ", ".join(self.peeled) or "-"),
            ("triton knobs", f"num_stages={self.knobs.num_stages} num_warps={self.knobs.num_warps} "
                             f"warp_specialize={self.knobs.warp_specialize} maxnreg={self.knobs.maxnreg}"
                             + (f" ({self.knobs.note})" if self.knobs.note else "")),
        ]
        if self.sim_cycles_per_iteration is not None or self.sim_deadlock:
            cpi = self.sim_cycles_per_iteration
            rows.insert(4, ("simulated", (f"{cpi:.2f} cycles/iter (ASAP issue)" if cpi is not None else
                                          "no cycles/iter (ASAP issue)")
                            + (", DEADLOCK" if self.sim_deadlock else "")
                            + (", replay exact" if self.sim_replay_exact else ", replay NOT exact")
                            # reservation tables with gaps ([1, 0, 1]): an op issued early takes the cell a later
                            # op on that unit was scheduled in, and greedy issue settles slower than the schedule
                            + (f" - slower than I = {self.ii}: issued as early as possible the ops take unit cells "
                               f"the schedule gave to others; issued at the schedule's times they keep I"
                               if cpi is not None and cpi > self.ii + 1e-9 and self.sim_replay_exact else "")))
        return rows

    def _unit_runs(self) -> dict[str, dict[str, list[tuple[int, int]]]]:
        """Per op, per unit it reserves: the [start, end) cycle offsets of the runs of non-zero cells of its
        reservation row (the whole op where the plan's graph does not say: an op of another name)."""
        try:
            reserve = {o.name: o.reserve for o in Graph.model_validate(self.graph).ops}
        except ValueError:  # (a plan verify refuses; drawn as before)
            reserve = {}
        out: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for s in self.ops:
            rows = reserve.get(s.name)
            per: dict[str, list[tuple[int, int]]] = {}
            for u in s.units:
                row = rows.get(u) if rows is not None else None
                if row is None:
                    per[u] = [(0, s.length)]
                    continue
                per[u] = []
                c = 0
                for busy, cells in itertools.groupby(row, key=bool):
                    n = len(list(cells))
                    if busy:
                        per[u].append((c, c + n))
                    c += n
            out[s.name] = per
        return out

    def drawn_iterations(self, runs: dict | None = None) -> int:
        """Iterations the Gantt chart holds: ``stages + 1`` overlapped ones, at most :data:`MAX_GANTT_BARS` bars
        (a plan of 11,265 stages drew 50 s and 1.3 GB of them)."""
        runs = self._unit_runs() if runs is None else runs
        per_iteration = max(1, sum(sum(len(r) for r in runs[s.name].values()) + 1 for s in self.ops))
        return max(1, min(self.stages + 1, MAX_GANTT_BARS // per_iteration))

    def gantt_tasks(self) -> list:
        """Bars of ``stages + 1`` overlapped iterations (at most :meth:`drawn_iterations`), one lane per unit and
        one per warp group. A unit lane holds the cells the op's reservation row takes (a row [1, 0, 0, 1] is two
        one-cycle bars), the warp group's lane the whole op: a unit drawn busy for the op's whole length showed a
        capacity-1 unit running three ops at once and `simulate` counted 11 busy cycles of 12 where 8 were."""
        bars = []
        role = {g.index: g.role + (f" ({'+'.join(g.kinds)})" if g.kinds else "") for g in self.warp_groups}
        runs = self._unit_runs()
        for it in range(self.drawn_iterations(runs)):
            for s in self.ops:
                start = s.issue_cycle + it * self.ii
                for u in s.units:
                    for a, b in runs[s.name][u]:
                        bars.append(_Bar(f"{s.name}#{it}", f"unit {u}", start + a, start + b, s.category or s.name))
                bars.append(_Bar(f"{s.name}#{it}", f"WG{s.warp_group} {role.get(s.warp_group, '')}", start,
                                 start + s.length, s.category or s.name))
        return bars

    def plot(self, path: str | os.PathLike) -> None:
        from adasched.planner.gantt import render_gantt

        render_gantt(self.gantt_tasks(), path, xlabel="cycle (normalised)", lane_of=lambda b: b.lane,
                     title=f"twill {self.graph_name} on {self.machine_name}: I = {self.ii} (MII {self.mii}), "
                           f"{self.stages} stages, {len(self.warp_groups)} warp groups"
                           + (f"\n(the first {self.drawn_iterations():,} of {self.stages + 1:,} overlapped iterations)"
                              if self.drawn_iterations() < self.stages + 1 else ""))

    def simulate(self):
        """Re-simulate as per-lane tasks (for `adasched simulate plan.json`); times in normalised cycles
        (``unit="cycles"``; one cycle is ``cycle_ns`` ns)."""
        from adasched.planner.simulator import ScheduledTask, Simulation

        return Simulation(tasks=[ScheduledTask(b.name, 0, b.lane, b.start_ms, b.end_ms, b.category)
                                 for b in self.gantt_tasks()], unit="cycles")


#: op instances (iterations x ops) make_plan simulates at most (~10 us each: the simulation ignores the solve's
#: time limit); a plan past it records why it has no simulated cycles per iteration
MAX_SIM_INSTANCES = 300_000
#: reservation cells (iterations x the ops' non-zero table cells) make_plan simulates at most: 64 ops of 1,024-cycle
#: tables were 3,072 instances, well under MAX_SIM_INSTANCES, yet took far longer to simulate than to solve
MAX_SIM_CELLS = 1_000_000
#: bars the Gantt chart of a plan (show --plot, simulate) draws at most
MAX_GANTT_BARS = 20_000

_METHOD_NOTE = {
    "heuristic": " (iterative modulo scheduling: CP-SAT found no schedule in time)",
    "cp-sat-coarse": " (CP-SAT in a coarser time unit, scaled back: CP-SAT found no schedule in the original units "
                     "in time)",
}


@dataclass(frozen=True)
class _Bar:
    name: str
    lane: str
    start_ms: float
    end_ms: float
    category: str


def serial_cycles(graph: Graph, units: dict[str, int], *, handoff: int = 0,
                  groups: dict[str, int] | None = None) -> int:
    """Cycles per iteration without software pipelining: a resource-aware list schedule of one iteration
    (ops in topological order of the distance-0 edges, each as early as its inputs and free units allow),
    the next iteration starting when this one has finished and its loop-carried edges allow. With ``groups``
    (warp specialisation) a value edge between two groups takes ``handoff`` cycles more, as in the schedule, and a
    group issues one op per cycle, a blocking op holding its group for its whole length (without that rule two
    blocking ops of one group overlapped: a 4-cycle baseline beside a proved-minimal I of 8). Register and
    buffer limits are not modelled: one iteration at a time keeps one copy of a value, except across a
    loop-carried edge of distance d, which would keep d."""
    def delay(e) -> int:
        crosses = groups is not None and e.value and e.src != e.dst and groups[e.src] != groups[e.dst]
        return e.delay + (handoff if crosses else 0)

    order, preds = _topo(graph)
    busy: dict[str, dict[int, int]] = {u: {} for u in units}
    issue: dict[int, dict[int, int]] = {q: {} for q in set((groups or {}).values())}
    t: dict[str, int] = {}
    for v in order:
        op = graph.op(v)
        cells = [(busy[u], c, n, units[u]) for u, row in op.reserve.items() for c, n in enumerate(row) if n]
        if groups is not None:  # the group's issue slot: one cycle, or the whole op when it blocks
            cells += [(issue[groups[v]], c, 1, 1) for c in range(op.length if op.blocking else 1)]
        s = max([t[e.src] + delay(e) for e in preds[v]] + [0])
        while True:
            hit = next(((b, c, n, cap) for b, c, n, cap in cells if b.get(s + c, 0) + n > cap), None)
            if hit is None:
                break
            # the first conflicting cell moves past its busy run: every start in between puts it on a cycle
            # where it still does not fit (stepping s by one was quadratic in the table length)
            b, c, n, cap = hit
            x = s + c + 1
            while b.get(x, 0) + n > cap:
                x += 1
            s = x - c
        for b, c, n, _ in cells:
            b[s + c] = b.get(s + c, 0) + n
        t[v] = s
    span = max(t[o.name] + o.length for o in graph.ops)
    for e in graph.edges:
        if e.distance > 0:
            span = max(span, -(-(t[e.src] + delay(e) - t[e.dst]) // e.distance))
    return span


def _topo(graph: Graph):
    preds = {o.name: [] for o in graph.ops}
    indeg = {o.name: 0 for o in graph.ops}
    for e in graph.edges:
        if e.distance == 0:
            preds[e.dst].append(e)
            indeg[e.dst] += 1
    ready = [o.name for o in graph.ops if indeg[o.name] == 0]
    order = []
    while ready:
        v = ready.pop(0)
        order.append(v)
        for e in graph.edges:
            if e.distance == 0 and e.src == v:
                indeg[e.dst] -= 1
                if indeg[e.dst] == 0:
                    ready.append(e.dst)
    return order, preds


VERIFY_MII_SECONDS = 2.0
"""Most seconds ``TwillPlan.verify`` spends on the RecMII search (past it the stored RecMII is not checked)."""


def _plain(value):
    """Models as dicts, lists of them as lists of dicts (for comparing a plan's fields with recomputed ones)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _short(value, limit: int = 160) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _derived_fields(g, m, ii: int, times: dict[str, int], groups: dict[str, int], warp: bool) -> dict:
    """What a plan derives from its schedule (issue cycles ``times``, warp ``groups``) on graph ``g`` and machine
    ``m``: the op slots, the warp groups (role, kinds, registers), channels, buffer depths, peeled ops and the Triton
    knobs. :func:`make_plan` writes them; :meth:`TwillPlan.verify` recomputes them from the embedded graph and
    machine (edited knobs, roles or registers verified and were shown as planned)."""
    depth = buffer_depths(g, ii, times)
    held = {o.name for o in g.ops if (o.regs or 0) > 0 or (o.smem or 0) > 0}
    buffers = {v: depth[v] for v in (o.name for o in g.ops) if v in held}
    slots = [OpSlot(name=o.name, issue_cycle=times[o.name], stage=times[o.name] // ii, residue=times[o.name] % ii,
                    warp_group=groups[o.name], length=o.length, category=o.category,
                    units=[u for u, row in o.reserve.items() if any(row)]) for o in g.ops]
    wgs = []
    for q in sorted(set(groups.values())):
        members = [o for o in g.ops if groups[o.name] == q]
        if not warp:
            role = "all"
        elif all(o.variable_latency for o in members):
            role = "producer"
        else:
            role = "consumer"
        regs = m.group_base_regs + sum((o.regs or 0) * depth[o.name] for o in members)
        kinds = sorted({o.category for o in members if o.category})
        wgs.append(WarpGroup(index=q, role=role, ops=[o.name for o in members], kinds=kinds,
                             regs=regs if warp else 0))
    channels = [e.label() for e in g.edges if e.value and e.src != e.dst and groups[e.src] != groups[e.dst]]
    stage = {s.name: s.stage for s in slots}
    last = {q: max(stage[o.name] for o in g.ops if groups[o.name] == q) for q in set(groups.values())}
    peeled = [o.name for o in g.ops if stage[o.name] < last[groups[o.name]]]
    return {"ops": slots, "warp_groups": wgs, "channels": channels, "buffers": buffers, "peeled": peeled,
            "knobs": derive_knobs(g, m, ii, times, groups)}


def _too_big_to_simulate(g, n_stages: int) -> str | None:
    """Why a schedule of ``n_stages`` stages is not simulated (too many op instances or reservation cells), or None."""
    from .simsched import simulated_iterations

    instances = simulated_iterations(n_stages) * len(g.ops)
    cells = simulated_iterations(n_stages) * sum(sum(1 for row in o.reserve.values() for x in row if x) for o in g.ops)
    if instances > MAX_SIM_INSTANCES:  # minutes and GBs past the solve's time limit (11,265 stages)
        return (f"not simulated: {n_stages:,} stages x {len(g.ops)} ops = {instances:,} op instances "
                f"(at most {MAX_SIM_INSTANCES:,})")
    if cells > MAX_SIM_CELLS:
        return f"not simulated: {instances:,} op instances hold {cells:,} reservation cells (at most {MAX_SIM_CELLS:,})"
    return None


def _simulation(g, m, units: dict, ii: int, times: dict[str, int], groups: dict[str, int],
                warp: bool) -> tuple[float | None, bool, bool]:
    """The plan's simulation figures: (cycles per iteration issued as early as possible, rounded to 4 places, None
    on a deadlock; deadlock; replay at the schedule's own times exact)."""
    from .simsched import simulate_schedule

    gd, md = g.model_dump(by_alias=True), m.model_dump()
    sim = simulate_schedule(gd, md, ii, times, groups, units=units, warp=warp)
    # a deadlocked simulation has no cycles per iteration (inf failed the plan's validation: exit 2 on a schedule
    # the validator accepted); the flag says it
    cpi = round(sim.cycles_per_iteration, 4) if math.isfinite(sim.cycles_per_iteration) else None
    rep = simulate_schedule(gd, md, ii, times, groups, units=units, warp=warp, mode="timed")
    replay = (not rep.deadlock) and all(c == times[v] + it * ii for (v, it), c in rep.issued.items())
    return cpi, sim.deadlock, replay


def make_plan(problem: Problem, schedule, *, simulate: bool = True) -> TwillPlan:
    """Turn a :class:`model.Schedule` into a plan (knobs, groups, buffers, prologue, simulation)."""
    g, m = problem.graph, problem.machine
    ii, times = schedule.ii, schedule.times
    groups = schedule.groups if schedule.warp else {o.name: 0 for o in g.ops}
    # renumber groups 0.. in order of first appearance in the op list
    remap: dict[int, int] = {}
    for o in g.ops:
        remap.setdefault(groups[o.name], len(remap))
    groups = {v: remap[q] for v, q in groups.items()}
    derived = _derived_fields(g, m, ii, times, groups, schedule.warp)
    stage = {o.name: times[o.name] // ii for o in g.ops}
    sim_cpi = sim_dead = replay = None
    n_stages = max(stage.values()) + 1
    sim_skipped = _too_big_to_simulate(g, n_stages) if simulate else None
    if simulate and sim_skipped is None:
        sim_cpi, sim_dead, replay = _simulation(g, m, problem.units, ii, times, groups, schedule.warp)
    # without pipelining, in the plan's warp groups (a value crossing them pays the handoff as in the schedule):
    # the baseline ignoring them was faster than an optimal warp-specialised plan (0.67x of it)
    serial = serial_cycles(g, problem.units, handoff=m.handoff_cycles if schedule.warp else 0,
                           groups=groups if schedule.warp else None)
    rec = schedule.params
    from adasched.planner.plan import SolverRecord

    solver = SolverRecord(
        backend="heuristic" if schedule.method == "heuristic" else "ortools-cp-sat", status=schedule.status, gap=schedule.gap, objective=schedule.objective,
        bound=schedule.bound, solve_seconds=round(schedule.seconds, 6),
        time_limit=rec.time_limit if rec else None, seed=rec.seed if rec else None,
        threads=rec.threads if rec else None,
        note="; ".join(x for x in (schedule.note, sim_skipped) if x) or None,
    )
    plan = TwillPlan(
        inputs_digest=inputs_digest(g, m),
        solver=solver,
        predicted_ms=ii * m.cycle_ns * 1e-6,
        baselines_ms={"no-pipelining": serial * m.cycle_ns * 1e-6},
        graph_name=g.name, machine_name=m.name, ii=ii, mii=schedule.mii.mii, res_mii=schedule.mii.res,
        rec_mii=schedule.mii.rec, excl_mii=schedule.mii.excl, plain_ii=schedule.plain_ii,
        plain_ii_proven=schedule.plain_proven, ii_proven_minimal=schedule.proven,
        method=schedule.method, load_slack=schedule.load_slack,
        warp_specialised=schedule.warp, stages=n_stages, cycle_ns=m.cycle_ns, **derived,
        attempts=[AttemptRecord(ii=a.ii, warp=a.warp, status=a.status, seconds=round(a.seconds, 6))
                  for a in schedule.attempts],
        sim_cycles_per_iteration=sim_cpi, sim_deadlock=sim_dead, sim_replay_exact=replay,
        graph=g.model_dump(by_alias=True, exclude_none=True), machine=m.model_dump(),
    )
    errors = plan.verify()
    if errors:  # the solver and the validator share no code: a disagreement is a bug in one of them
        raise RuntimeError(f"twill: the emitted schedule fails the independent validator: {'; '.join(errors)}")
    return plan


def plan_twill(graph, machine=None, params=None, *, simulate: bool = True, load_slack: bool = False) -> TwillPlan:
    """One call: load/check (names, paths or models; machine default: the graph's hint, else h100), solve
    (``params``: adasched.planner.solver.SolveParams, default 10 s, seed 0, 1 thread; ``load_slack``: prefer
    slack after variable-latency loads, see ``model.solve_at``) and build the plan."""
    from .graph import make_problem
    from .model import solve

    problem = make_problem(graph, machine)
    if load_slack and not problem.warp:  # accepted and ignored: it ranks warp-specialised schedules only
        from adasched.profiler.io import InputError

        raise InputError("--load-slack", f"graph {problem.graph.name!r} gives no warp fields (registers, shared "
                                         "memory, variable latency, blocking waits): it ranks warp-specialised "
                                         "schedules only")
    try:
        schedule = solve(problem, params, load_slack=load_slack)
    except ValueError as err:  # no schedule (or none in time): named by the graph's file or name as given (the
        # message named the graph's "name" field, 'graph' for a file without one)
        from adasched.profiler.io import InputError

        if isinstance(err, InputError) or isinstance(graph, Graph):
            raise
        what = str(err).removeprefix(f"graph {problem.graph.name!r}: ")
        raise type(err)(f"{graph}: {what}") from None
    return make_plan(problem, schedule, simulate=simulate)
