"""One small solver layer over PuLP/CBC and OR-Tools CP-SAT.

Every solve has a time limit, a fixed seed and thread count (deterministic output) and an optional warm
start; the returned :class:`SolveOutcome` carries an honest status:

- ``optimal``   the solver proved optimality (CBC: solution status 'Optimal' and not stopped by the limit;
                CP-SAT: OPTIMAL);
- ``feasible``  a solution exists but optimality is not proved (time limit), with the gap when a bound is known;
- ``infeasible``proved infeasible;
- ``timeout``   the limit hit before any solution (never reported as infeasible).

:func:`best_of` keeps the better of a heuristic and a solver result, so a plan is never worse than its warm start.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping

from .plan import SolverRecord, relative_gap

__all__ = ["SolveParams", "SolveOutcome", "solve_pulp", "solve_linear", "solve_cpsat", "heuristic_outcome", "best_of", "relative_gap"]

Status = Literal["optimal", "feasible", "heuristic", "infeasible", "timeout"]

MAX_THREADS = 1024
"""Most solver threads a SolveParams takes (CP-SAT refuses 100000 workers as an invalid model)."""

MAX_TIME_LIMIT_S = 7 * 24 * 3600.0
"""Longest time limit a SolveParams takes (the CLIs' cap, ``adasched.profiler.io.MAX_TIMEOUT_S``): 1e16 s
overflowed OR-Tools' int64 milliseconds (an OverflowError from inside SWIG)."""


@dataclass(frozen=True, kw_only=True)
class SolveParams:
    time_limit: float = 10.0
    """Wall-clock limit in seconds (up to :data:`MAX_TIME_LIMIT_S`); CBC through OR-Tools (``solve_linear``) counts
    CPU seconds instead, which its wrapper cannot change - the outcome's note says so."""
    seed: int = 0
    """Any int >= 0; the solvers (32-bit seeds) get :attr:`solver_seed`."""
    threads: int = 1
    """Solver threads (1..MAX_THREADS); 1 keeps CBC and CP-SAT deterministic."""
    mip_gap: float = 1e-6
    """Relative gap at which the MILP is considered solved (proved within this gap counts as optimal)."""
    msg: bool = False
    node_limit: int | None = None
    """Branch-and-bound nodes at most (CBC through PuLP, SCIP through OR-Tools): unlike the clock, a node limit
    that stops the search stops it at the same point on any machine load (with ``threads=1``), so the answer is
    reproducible; the time limit still applies as a cap."""

    def __post_init__(self):
        if not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise ValueError(f"time_limit must be a positive number of seconds, got {self.time_limit}")
        if self.time_limit > MAX_TIME_LIMIT_S:
            raise ValueError(f"time_limit must be at most {MAX_TIME_LIMIT_S:.0f} seconds (7 days), got "
                             f"{self.time_limit}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        # (2.5 threads passed and OR-Tools raised a SWIG TypeError)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 1..{MAX_THREADS} (an int), got {self.threads!r}")
        if self.node_limit is not None and (isinstance(self.node_limit, bool) or not isinstance(self.node_limit, int)
                                            or self.node_limit < 1):
            raise ValueError(f"node_limit must be a positive int number of nodes, got {self.node_limit!r}")

    @property
    def solver_seed(self) -> int:
        """The seed folded into [0, 2**31 - 2]: CP-SAT's random_seed and CBC's/SCIP's seeds are 32-bit (CBC gets
        it + 1); a larger ``seed`` (a data seed reused) raised a TypeError inside OR-Tools."""
        return self.seed % (2 ** 31 - 1)


@dataclass
class SolveOutcome:
    backend: str
    status: Status
    objective: float | None
    bound: float | None
    solve_seconds: float
    params: SolveParams
    values: dict[str, float] = field(default_factory=dict)
    """Variable name -> value for feasible/optimal results."""
    note: str | None = None

    @property
    def has_solution(self) -> bool:
        return self.status in ("optimal", "feasible", "heuristic")

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)

    def record(self) -> SolverRecord:
        """The plan's solver record of this solve; only a solve that found something has one (ValueError for
        "infeasible" and "timeout": a plan never carries them, see :data:`adasched.planner.plan.SolverStatus`)."""
        if self.status not in ("optimal", "feasible", "heuristic"):
            raise ValueError(f"record: a {self.status!r} solve found no solution a plan could record")
        return SolverRecord(
            backend=self.backend,
            status=self.status,
            gap=self.gap if self.status in ("optimal", "feasible") else None,
            objective=self.objective,
            bound=self.bound,
            solve_seconds=round(self.solve_seconds, 6),
            time_limit=self.params.time_limit,
            seed=self.params.seed,
            threads=self.params.threads,
            note=self.note,
        )


# ---- Ctrl-C ----------------------------------------------------------------------------------------
_STOP_POLL_S = 0.05
"""How often the waiting main thread wakes (seconds): it bounds the delay from a SIGINT to the stop request."""


def _interruptible(solve: Callable[[], Any], stop: Callable[[], Any]) -> Any:
    """``solve()`` (a C++ solve that releases the GIL) in a worker thread while the main thread waits in Python,
    so Python's SIGINT handler runs: on KeyboardInterrupt, ``stop()`` (asked again until the worker ends, as a
    request made before the solver started is lost) and the KeyboardInterrupt is raised once the worker is done.

    The solvers' own SIGINT catching must be off (CP-SAT ``catch_sigint_signal``, SCIP ``misc/catchctrlc``):
    with it on, a Ctrl-C ends the search as if the time limit had been hit and the caller sees a result.
    Off the main thread (where no signal handler runs) ``solve()`` runs directly. Anything ``solve()`` raises is
    raised here with its traceback."""
    if threading.current_thread() is not threading.main_thread():
        return solve()
    box: dict[str, Any] = {}
    done = threading.Event()  # not Thread.join/is_alive: Python 3.11's join, interrupted by a KeyboardInterrupt,
    # can mark a running thread as stopped (threading._wait_for_tstate_lock), and the solve would go on unstopped

    def work() -> None:
        try:
            box["value"] = solve()
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err
        finally:
            done.set()

    worker = threading.Thread(target=work, name="adasched-solve", daemon=True)
    worker.start()
    try:
        while not done.wait(_STOP_POLL_S):
            pass
    except KeyboardInterrupt:
        while not done.is_set():
            try:
                stop()
                done.wait(_STOP_POLL_S)
            except KeyboardInterrupt:  # a second Ctrl-C while the solver winds down: it is already stopping
                pass
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- PuLP / CBC ----------------------------------------------------------------------------------
def solve_pulp(prob, params: SolveParams, warm_start: dict[str, float] | None = None) -> SolveOutcome:
    """Solve a ``pulp.LpProblem`` with the bundled CBC.

    ``warm_start`` maps variable names to values (a complete feasible assignment works best); CBC is then
    run with ``warmStart=True``. The status comes from PuLP's *solution* status: a CBC run stopped by its
    time limit reports status 'Optimal' but solution status 'Solution Found' (-> feasible)."""
    import pulp

    variables = prob.variablesDict()
    if warm_start:
        for name, val in warm_start.items():
            v = variables.get(name)
            if v is not None:
                v.setInitialValue(val)
    solver = pulp.PULP_CBC_CMD(
        msg=params.msg,
        timeLimit=params.time_limit,
        # one thread: CBC's serial search. "threads 1" runs its threaded search with one worker, whose start
        # races: 1 run in ~40 of a 3-sample MILP waited the whole 10 s watchdog ("Thread 0 used 0 times, waiting
        # to start 10.0") past a 1 s limit and came back unproved (a flaky test in CI)
        threads=params.threads if params.threads > 1 else None,
        gapRel=params.mip_gap,
        warmStart=bool(warm_start),
        options=[f"randomSeed {params.solver_seed + 1}", f"randomCbcSeed {params.solver_seed + 1}"]
        + ([f"maxNodes {int(params.node_limit)}"] if params.node_limit is not None else []),
    )
    # CBC's files in a folder of their own, removed whatever happens: a Ctrl-C (KeyboardInterrupt out of PuLP's
    # wait for CBC) left its .mps/.mst/.sol files in the temp folder and, when the SIGINT reached Python only (a
    # supervisor's kill -INT), CBC itself running to its time limit
    solver.tmpDir = tempfile.mkdtemp(prefix="adasched-cbc-")
    t0 = time.perf_counter()
    try:
        prob.solve(solver)
    except BaseException:
        _kill_processes_using(solver.tmpDir)
        raise
    finally:
        shutil.rmtree(solver.tmpDir, ignore_errors=True)
    dt = time.perf_counter() - t0
    sol = prob.sol_status
    if sol == pulp.LpSolutionOptimal:
        status: Status = "optimal"
    elif sol in (pulp.LpSolutionIntegerFeasible,):
        status = "feasible"
    elif sol == pulp.LpSolutionInfeasible or prob.status == pulp.LpStatusInfeasible:
        status = "infeasible"
    elif sol == pulp.LpSolutionUnbounded:
        raise ValueError(f"MILP {prob.name!r} is unbounded: a constraint is missing")
    else:
        status = "timeout"
    objective = None
    if status in ("optimal", "feasible"):  # a feasibility model has no objective (pulp.value(None) raised): 0
        objective = float(pulp.value(prob.objective) or 0.0) if prob.objective is not None else 0.0
    bound = _cbc_bound(prob)
    if status == "optimal" and objective is not None:
        bound = objective if bound is None else bound
    values = {}
    if status in ("optimal", "feasible"):
        values = {v.name: (v.varValue if v.varValue is not None else 0.0) for v in prob.variables()}
    # A run that used (nearly) all of its time limit and still says optimal is suspicious only when the
    # solution status disagrees, which is handled above; record the wall time either way.
    return SolveOutcome("pulp-cbc", status, objective, bound, dt, params, values)


def _kill_processes_using(folder: str) -> None:
    """SIGKILL this process's own children whose command line names ``folder`` (CBC, started by PuLP with its files
    there), then reap them so the folder is no longer written when it is removed; where there is no /proc (not
    Linux) nothing is found. Only direct children of this process with this user's uid are touched."""
    import signal

    needle = os.fsencode(folder)
    me, uid = os.getpid(), os.getuid()
    killed = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state": the parent's pid
            if ppid != me or entry.stat().st_uid != uid or needle not in (entry / "cmdline").read_bytes():
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    for pid in killed:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # already reaped (by PuLP's Popen)
            pass


def _cbc_bound(prob) -> float | None:
    """CBC's best bound is not exposed by PuLP; None unless the solve proved optimality."""
    return None


# ---- OR-Tools linear solvers (SCIP, CBC, HiGHS through pywraplp): these expose the best bound ----------
def solve_linear(solver, params: SolveParams, hint: dict[Any, float] | None = None,
                 variables: Iterable[Any] | None = None, name: str | None = None) -> SolveOutcome:
    """Solve an ``ortools.linear_solver.pywraplp.Solver`` (made with e.g. ``Solver.CreateSolver('SCIP')``).

    Unlike PuLP/CBC this reports the best bound, so a time-limited result carries a real MIP gap.
    ``name`` labels the backend in the record (default: from ``SolverVersion()``; pass it for HiGHS, whose
    OR-Tools 9.15 wrapper reports itself as 'PDLP Solver')."""
    from ortools.linear_solver import pywraplp

    # whole milliseconds, at least 1: int(0.0004 * 1000) = 0 is "no limit" to OR-Tools (a SCIP knapsack ran 6.7 s
    # and came back optimal at a 0.4 ms limit)
    solver.SetTimeLimit(max(1, math.ceil(params.time_limit * 1000)))
    solver.SetNumThreads(params.threads)
    name = (name or (solver.SolverVersion().split()[0] if solver.SolverVersion() else "mip")).lower()
    if "scip" in name:
        extra = f"limits/nodes = {int(params.node_limit)}\n" if params.node_limit is not None else ""
        # misc/catchctrlc off: SCIP's own SIGINT handler would end the solve as if a limit were hit; Python's
        # handler raises KeyboardInterrupt instead and the solve is stopped with InterruptSolve
        solver.SetSolverSpecificParametersAsString(
            f"randomization/randomseedshift = {params.solver_seed}\nmisc/catchctrlc = FALSE\n{extra}")
    elif params.node_limit is not None:
        raise ValueError(f"node_limit: supported with SCIP (and CBC through solve_pulp), not {name}")
    if "highs" in name:  # (HIGHS, HIGHS_MIXED_INTEGER_PROGRAMMING; the wrapper names itself 'PDLP Solver', so
        # pass name= - and real PDLP's parameters would reject the HiGHS options)
        # HiGHS prints its banner ("Running HiGHS 1.12.0 ...") on stdout without EnableOutput: a --json stdout
        # was no longer one JSON object. The gap: MPSolverParameters' RELATIVE_MIP_GAP does not reach HiGHS, which
        # stopped at its own 1e-4 and reported "optimal" 5.7e-5 below the optimum of a knapsack. (The wrapper
        # answers False to the call but applies it.)
        solver.SetSolverSpecificParametersAsString(
            ("" if params.msg else "output_flag=false\n") + f"mip_rel_gap={params.mip_gap!r}\n")
    note = None
    version = solver.SolverVersion() or ""
    if hint and (name in ("highs", "pdlp") or version.startswith("PDLP")):
        # OR-Tools 9.15's HiGHS wrapper (which reports itself as 'PDLP Solver') segfaults on SetHint
        note = "warm-start hint not passed: the OR-Tools HiGHS/PDLP wrapper crashes on SetHint"
    elif hint:
        solver.SetHint(list(hint.keys()), [float(v) for v in hint.values()])
    mp = pywraplp.MPSolverParameters()
    mp.SetDoubleParam(mp.RELATIVE_MIP_GAP, params.mip_gap)
    if params.msg:
        solver.EnableOutput()
    t0 = time.perf_counter()
    # Ctrl-C: InterruptSolve where the backend supports it (SCIP); one that does not (it returns False) ends
    # at its time limit and the KeyboardInterrupt follows then
    code = _interruptible(lambda: solver.Solve(mp), solver.InterruptSolve)
    dt = time.perf_counter() - t0
    if code == pywraplp.Solver.OPTIMAL:
        status: Status = "optimal"
    elif code == pywraplp.Solver.FEASIBLE:
        status = "feasible"
    elif code == pywraplp.Solver.INFEASIBLE:
        status = "infeasible"
    elif code == pywraplp.Solver.UNBOUNDED:
        raise ValueError("MILP is unbounded: a constraint is missing")
    elif code in (pywraplp.Solver.MODEL_INVALID, pywraplp.Solver.ABNORMAL):
        # (an infinite coefficient came back as "timeout" within 1 ms)
        raise ValueError(f"{name}: the solver rejected the model "
                         f"({'MODEL_INVALID' if code == pywraplp.Solver.MODEL_INVALID else 'ABNORMAL'})")
    else:  # NOT_SOLVED: stopped by its limits before a solution
        status = "timeout"
    objective = solver.Objective().Value() if status in ("optimal", "feasible") else None
    bound = solver.Objective().BestBound() if status in ("optimal", "feasible") else None
    if name.startswith("cbc"):
        note = ((note + "; ") if note else "") + "CBC through OR-Tools limits CPU seconds, not wall seconds " \
                                                 "(solve_pulp's CBC keeps the wall-clock limit)"
    if "highs" in name and bound is not None:
        # the HiGHS wrapper answers BestBound() with the objective itself (a gap of 0 for any answer): unknown
        # unless proved optimal (within mip_gap, as CBC's through solve_pulp)
        bound = objective if status == "optimal" else None
    if bound is not None and not abs(bound) < 1e20:  # OR-Tools' "no bound yet" (SCIP cut off before its root):
        bound = None                                   # recorded as a bound, it made a gap of 1e29
    vs = list(variables) if variables is not None else list(solver.variables())
    values = {v.name(): v.solution_value() for v in vs} if status in ("optimal", "feasible") else {}
    return SolveOutcome(f"ortools-{name}", status, objective, bound, dt, params, values, note=note)


# ---- OR-Tools CP-SAT -----------------------------------------------------------------------------
def solve_cpsat(model, params: SolveParams, hint: dict[Any, int] | None = None,
                variables: Iterable[Any] = (), *, overrides: Mapping[str, Any] | None = None) -> SolveOutcome:
    """Solve a ``cp_model.CpModel``. ``hint`` maps IntVar/BoolVar -> value (AddHint); ``variables`` are
    read back into ``values`` by name. ``overrides`` sets further CP-SAT parameters by their SatParameters name
    (e.g. ``{"symmetry_level": 0}``; a repeated field takes a list, which replaces its entries) after those from
    ``params``; an unknown name or a value of the wrong type is a ValueError, and the ones ``params`` owns (time
    limit, workers, seed, logging) cannot be overridden here, nor ``catch_sigint_signal`` (kept off: a Ctrl-C
    stops the search and raises KeyboardInterrupt, see :func:`_interruptible`)."""
    from ortools.sat import sat_parameters_pb2
    from ortools.sat.python import cp_model

    if params.node_limit is not None:
        raise ValueError("node_limit: CP-SAT has no node limit (its deterministic work limit is "
                         "max_deterministic_time); supported with SCIP and CBC")
    if hint:
        model.ClearHints()
        for var, val in hint.items():
            model.AddHint(var, int(val))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = params.time_limit
    solver.parameters.num_search_workers = params.threads
    solver.parameters.random_seed = params.solver_seed
    solver.parameters.log_search_progress = params.msg
    solver.parameters.catch_sigint_signal = False  # Ctrl-C -> KeyboardInterrupt, not a result (_interruptible)
    for key, val in (overrides or {}).items():
        if key == "catch_sigint_signal":
            raise ValueError(f"CP-SAT parameter {key!r}: kept off here (Ctrl-C raises KeyboardInterrupt)")
        if key in _CPSAT_OWNED:
            raise ValueError(f"CP-SAT parameter {key!r}: set through SolveParams, not overrides")
        desc = sat_parameters_pb2.SatParameters.DESCRIPTOR.fields_by_name.get(key)
        if desc is None:
            raise ValueError(f"CP-SAT parameter {key!r}: no such SatParameters field")
        try:
            repeated = desc.is_repeated if hasattr(desc, "is_repeated") else desc.label == desc.LABEL_REPEATED
            if repeated:  # e.g. subsolvers: a list, replacing the default entries
                if isinstance(val, (str, bytes)):
                    raise TypeError(val)
                items = list(val)
                getattr(solver.parameters, key).clear()
                getattr(solver.parameters, key).extend(items)
            else:
                setattr(solver.parameters, key, val)
        except TypeError as err:
            raise ValueError(f"CP-SAT parameter {key!r}: {val!r} has the wrong type") from err
    t0 = time.perf_counter()
    code = _interruptible(lambda: solver.Solve(model), solver.stop_search)
    dt = time.perf_counter() - t0
    has_obj = model.HasObjective()
    if code == cp_model.OPTIMAL:
        status: Status = "optimal"
    elif code == cp_model.FEASIBLE:
        status = "feasible"
    elif code == cp_model.INFEASIBLE:
        status = "infeasible"
    elif code == cp_model.MODEL_INVALID:
        raise ValueError(f"CP-SAT model invalid: {model.Validate()}")
    else:
        status = "timeout"
    objective = solver.ObjectiveValue() if (has_obj and status in ("optimal", "feasible")) else None
    bound = solver.BestObjectiveBound() if (has_obj and status in ("optimal", "feasible")) else None
    values = {v.Name(): solver.Value(v) for v in variables} if status in ("optimal", "feasible") else {}
    out = SolveOutcome("ortools-cp-sat", status, objective, bound, dt, params, values)
    out.solver = solver  # type: ignore[attr-defined]  # callers read further values from it
    return out


_CPSAT_OWNED = ("max_time_in_seconds", "num_search_workers", "num_workers", "random_seed", "log_search_progress")


def heuristic_outcome(objective: float, seconds: float, params: SolveParams, note: str | None = None) -> SolveOutcome:
    return SolveOutcome("heuristic", "heuristic", objective, None, seconds, params, note=note)


def best_of(heuristic: SolveOutcome, solved: SolveOutcome | None, *, minimize: bool = True,
            better: Callable[[float, float], bool] | None = None) -> SolveOutcome:
    """The better of a heuristic and a solver result; ties go to the solver (it carries a proof).

    When the heuristic wins, the result keeps the solver's bound (if any) so the gap stays honest, and its
    status is 'heuristic' (a heuristic strictly better than a proved optimum can only mean a wrong model; nothing
    here proves the heuristic's value)."""
    if solved is None or not solved.has_solution or solved.objective is None:
        if solved is not None and solved.status == "infeasible":
            raise ValueError("solver proved the model infeasible but the heuristic found a solution: the model is wrong")
        return heuristic
    if better is None:
        better = (lambda a, b: a < b - 1e-9) if minimize else (lambda a, b: a > b + 1e-9)
    if better(heuristic.objective, solved.objective):
        out = SolveOutcome(
            backend=f"heuristic+{solved.backend}", status="heuristic", objective=heuristic.objective,
            bound=solved.bound, solve_seconds=heuristic.solve_seconds + solved.solve_seconds,
            params=solved.params, values=heuristic.values,
            note=f"heuristic beat the {solved.status} solver result {solved.objective:.6g}",
        )
        return out
    solved.solve_seconds += heuristic.solve_seconds
    return solved
