"""Ctrl-C during a solve: solve_cpsat / solve_linear raise KeyboardInterrupt promptly (the solvers' own SIGINT
catching, which ended the search as if the time limit had been hit and returned a result, is off), and
`adasched plan twill` / `adasched plan sp` stopped in a solve exit 130 at once, with no plan file and no
traceback.

The CLI runs in a real subprocess through ``adasched.planner.cli.main`` (what the `adasched` script calls) with
OR-Tools' ``CpSolver.Solve`` / ``pywraplp.Solver.Solve`` wrapped to print a marker when a solve starts and ends,
so the SIGINT is sent while a solve is running whatever the machine's load (no sleeps guessed from timings)."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adasched.planner.solver import SolveParams, solve_cpsat, solve_linear

LONG = 60.0
"""Time limit (s) of every interrupted solve: far longer than the test allows, so only the interrupt ends it."""
PROMPT_S = 12.0
"""Most seconds from the SIGINT to the KeyboardInterrupt / process exit (measured ~0.05-1.5 s, SCIP's up to 1.5 s
under load: 3 s left 2x; a run to the limit takes LONG = 60 s, so 12 still tells the two apart)."""

_WRAP = r"""
import sys, time
from ortools.sat.python import cp_model
from ortools.linear_solver import pywraplp

def marked(cls):
    orig = cls.Solve
    def solve(self, *args, **kwargs):
        sys.stderr.write("@@solve-start\n"); sys.stderr.flush()
        try:
            return orig(self, *args, **kwargs)
        finally:
            sys.stderr.write("@@solve-end\n"); sys.stderr.flush()
    cls.Solve = solve

marked(cp_model.CpSolver)
marked(pywraplp.Solver)
from adasched.planner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _market_split(seed: int, m: int = 4, n: int = 30):
    """A random market-split instance (Cornuejols-Dawande): ``a x = d`` over binaries with d = half the row sums,
    minimising the total slack. Neither CP-SAT nor SCIP proves these within a minute (measured: both return
    'feasible' with objective 1 and bound 0 at a 15 s limit), so a solve of it runs to its limit."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 100, (m, n))
    return a, a.sum(axis=1) // 2


def _interrupt_once(started: threading.Event, cancel: threading.Event, settle: float
                    ) -> tuple[threading.Thread, list[float]]:
    """A thread that sends SIGINT to this process ``settle`` s after ``started`` is set (the solver's Solve was
    entered), not after a fixed delay from now that a loaded host may spend before the solve begins, unless
    ``cancel`` is set first; the list gets the sending time."""
    sent: list[float] = []

    def fire():
        # settle: a solve well under way (LONG is far away), not one just being set up
        if started.wait(120.0) and not cancel.wait(settle):
            sent.append(time.perf_counter())
            os.kill(os.getpid(), signal.SIGINT)

    return threading.Thread(target=fire, daemon=True), sent


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, as in a terminal: a runner started in the background (or under
    nohup) passes SIGINT ignored to the test process, and Python then installs none."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _assert_interrupted(call, monkeypatch, cls) -> float:
    """Run ``call()`` with a SIGINT 0.3 s into the solve; it must raise KeyboardInterrupt within PROMPT_S of the
    signal, and the solver's ``cls.Solve`` must have returned by then (the search stopped, not left running in a
    thread). Returns the latency in seconds."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (the python_sigint fixture)
    returned: list[float] = []
    started = threading.Event()
    orig = cls.Solve

    def solve(self, *args, **kwargs):
        started.set()
        try:
            return orig(self, *args, **kwargs)
        finally:
            returned.append(time.perf_counter())

    monkeypatch.setattr(cls, "Solve", solve)
    cancel = threading.Event()
    sender, sent = _interrupt_once(started, cancel, 0.3)
    t0 = time.perf_counter()
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        cancel.set()  # no SIGINT into a later test if call() failed otherwise
    done = time.perf_counter()
    sender.join(timeout=10)
    assert sent, "the solve ended before the SIGINT was sent"
    assert len(returned) == 1 and sent[0] < returned[0] <= done, "the solver was not stopped"
    monkeypatch.undo()
    latency = done - sent[0]
    assert latency < PROMPT_S, f"KeyboardInterrupt {latency:.2f} s after SIGINT ({done - t0:.2f} s in all)"
    print(f"{cls.__name__}: KeyboardInterrupt {latency:.3f} s after SIGINT")
    return latency


def test_solve_cpsat_raises_keyboard_interrupt_promptly(monkeypatch, python_sigint):
    from ortools.sat.python import cp_model

    a, d = _market_split(0)
    m, n = a.shape
    model = cp_model.CpModel()
    x = [model.NewBoolVar(f"x{j}") for j in range(n)]
    dev = [model.NewIntVar(0, int(a[i].sum()), f"dev{i}") for i in range(m)]
    for i in range(m):
        row = sum(int(a[i, j]) * x[j] for j in range(n))
        model.Add(row - int(d[i]) <= dev[i])
        model.Add(int(d[i]) - row <= dev[i])
    model.Minimize(sum(dev))
    _assert_interrupted(lambda: solve_cpsat(model, SolveParams(time_limit=LONG), variables=x), monkeypatch,
                        cp_model.CpSolver)
    # the solver layer is usable afterwards: a small model solves to its brute-force optimum
    small = cp_model.CpModel()
    y = [small.NewBoolVar(f"y{j}") for j in range(6)]
    w = [int(v) for v in a[0, :6]]
    small.Add(sum(w[j] * y[j] for j in range(6)) <= sum(w) // 2)
    small.Maximize(sum(w[j] * y[j] for j in range(6)))
    best = max(sum(w[j] for j in range(6) if mask >> j & 1) for mask in range(64)
               if sum(w[j] for j in range(6) if mask >> j & 1) <= sum(w) // 2)
    out = solve_cpsat(small, SolveParams(time_limit=10), variables=y)
    assert out.status == "optimal" and out.objective == best


def test_solve_linear_scip_raises_keyboard_interrupt_promptly(monkeypatch, python_sigint):
    from ortools.linear_solver import pywraplp

    a, d = _market_split(1)
    m, n = a.shape
    solver = pywraplp.Solver.CreateSolver("SCIP")
    x = [solver.BoolVar(f"x{j}") for j in range(n)]
    over = [solver.NumVar(0, float(a[i].sum()), f"over{i}") for i in range(m)]
    under = [solver.NumVar(0, float(a[i].sum()), f"under{i}") for i in range(m)]
    for i in range(m):
        solver.Add(sum(int(a[i, j]) * x[j] for j in range(n)) - over[i] + under[i] == int(d[i]))
    solver.Minimize(sum(over) + sum(under))
    _assert_interrupted(lambda: solve_linear(solver, SolveParams(time_limit=LONG)), monkeypatch, pywraplp.Solver)


def _interrupt_cli(args: list[str], cwd: Path, out: Path, settle: float = 0.3) -> tuple[float, str, str]:
    """Start the CLI, wait for a solve that is still running ``settle`` s after it started, send SIGINT, and wait
    for the exit. Returns (seconds from SIGINT to exit, stdout, stderr without the markers)."""
    # SIGINT at its default in the child (a runner started in the background passes it ignored, and Python then
    # installs no KeyboardInterrupt handler: the CLI would go on solving), as when started from a terminal
    proc = subprocess.Popen([sys.executable, "-c", _WRAP, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue = queue.Queue()
    err_lines: list[str] = []

    def pump():  # every stderr line, in order, into the queue ('' at EOF)
        for ln in proc.stderr:
            err_lines.append(ln)
            lines.put(ln)
        lines.put("")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.perf_counter() + 120.0  # the first import of OR-Tools/torch can be slow on a loaded host
        line = None
        while True:
            if line is None:
                line = lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            assert line, f"the CLI exited (rc {proc.wait()}) before a solve long enough to interrupt"
            if line.strip() != "@@solve-start":
                line = None
                continue
            try:  # still running `settle` s later? (one that ends in the meantime prints @@solve-end first)
                line = lines.get(timeout=settle)
            except queue.Empty:
                break
        sent = time.perf_counter()
        n_before = len(err_lines)
        proc.send_signal(signal.SIGINT)
        stdout = proc.stdout.read()
        proc.wait(timeout=LONG + 30)
        latency = time.perf_counter() - sent
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(ln for ln in err_lines if not ln.startswith("@@solve-"))
    assert proc.returncode == 130, f"exit {proc.returncode} after {latency:.2f} s (stderr: {err[-2000:]!r})"
    assert latency < PROMPT_S, f"exited {latency:.2f} s after SIGINT"
    assert not out.exists(), "a plan was written after Ctrl-C"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == ["aborted"], err  # one line says so (typer's Exit(130) printed nothing)
    # the solver was stopped (its Solve returned) before the exit, not abandoned in a thread at shutdown
    assert "@@solve-end\n" in err_lines[n_before:], err_lines[n_before:]
    print(f"{args[:2]}: exit 130 {latency:.2f} s after SIGINT")
    return latency, stdout, err


def test_plan_twill_ctrl_c_exits_130_without_plan(tmp_path):
    from adasched.planner.twill.randgraph import random_graph

    graph = tmp_path / "rg120.json"
    graph.write_text(json.dumps(random_graph(120, 2, warp=True)))  # its CP-SAT solves run for seconds each
    out = tmp_path / "i.json"
    _interrupt_cli(["plan", "twill", "--graph", str(graph), "--time-limit", str(LONG), "--out", str(out)],
                   tmp_path, out)


def test_plan_sp_ctrl_c_in_milp_exits_130_without_plan(tmp_path):
    out = tmp_path / "i.json"
    # the first global batch's SCIP MILP runs ~3 s at a 5 s limit (each solve gets what is left of the batch's
    # limit after the heuristics); 20 s leaves it seconds on a loaded host too
    _interrupt_cli(["plan", "sp", "--seqlens", "builtin", "--steps", "2", "--time-limit", "20", "--out", str(out)],
                   tmp_path, out, settle=0.2)


def test_solve_pulp_interrupted_stops_cbc_and_leaves_no_files(monkeypatch, python_sigint):
    """A SIGINT to the Python process only (a supervisor's kill -INT, not a terminal's Ctrl-C to the whole group):
    PuLP's wait for CBC raised KeyboardInterrupt, but CBC ran on to its time limit and its .mps/.mst/.sol files
    stayed in the temp folder. solve_pulp stops it and removes its folder now."""
    import subprocess as sp

    import pulp
    import pulp.apis.coin_api as coin

    from adasched.planner.solver import solve_pulp

    started = threading.Event()
    procs: list = []

    class Recording(sp.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            procs.append(self)
            started.set()

    monkeypatch.setattr(coin.subprocess, "Popen", Recording)
    a, d = _market_split(2, m=6, n=50)
    m, n = a.shape
    prob = pulp.LpProblem("ms", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{j}", cat="Binary") for j in range(n)]
    over = [pulp.LpVariable(f"over{i}", 0) for i in range(m)]
    under = [pulp.LpVariable(f"under{i}", 0) for i in range(m)]
    prob += pulp.lpSum(over) + pulp.lpSum(under)
    for i in range(m):
        prob += pulp.lpSum(int(a[i, j]) * x[j] for j in range(n)) - over[i] + under[i] == int(d[i])
    cancel = threading.Event()
    sender, sent = _interrupt_once(started, cancel, 0.5)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            solve_pulp(prob, SolveParams(time_limit=LONG))
    finally:
        cancel.set()
    sender.join(timeout=10)
    assert sent and len(procs) == 1
    cbc = procs[0]
    arg = next(str(arg) for arg in cbc.args if "adasched-cbc-" in str(arg))  # a file in solve_pulp's folder
    cut = arg.index("adasched-cbc-")
    folder = arg[:cut] + arg[cut:].split(os.sep)[0]
    deadline = time.perf_counter() + PROMPT_S
    while cbc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert cbc.poll() is not None, "CBC still running after the interrupt"
    assert not os.path.exists(folder), os.listdir(folder)
