"""Twill at scale: I, MII, status and solve time on large random graphs and large-latency graphs.

``python -m adasched.planner.twill.scalebench [--quick]`` prints one markdown table; ``--first`` instead the CPU
seconds of the heuristic to its first schedule and for its whole search (40-120 ops); ``--adherence`` instead
times ``solve`` (wall and CPU seconds against the time limit) on random graphs of 40, 80 and 120 ops, seeds 1-3,
plain and warp, at limits 0.1, 0.3, 1 and 2 s. Each case runs the current
solver and a baseline from the same run: 'cp-sat only' (``solve(heuristic=False)``: no iterative modulo
scheduling, no coarse-unit solve) for the random graphs, 'one-hot' (the time-indexed encoding at every I, the
heuristic still on) for the large-latency graphs. Graphs: ``randgraph.random_graph(n, seed, warp=...)`` and the
built-in toy and FA3 loops with every delay and reservation cycle multiplied (the same loops in finer units).
"""
from __future__ import annotations

import time

from adasched.planner.ui import OneLineArgParser

__all__ = ["main"]


def _scaled(name: str, machine: str, k: int):
    from .graph import make_problem

    g = make_problem(name, machine).graph.model_copy(deep=True)
    for o in g.ops:
        o.reserve = {u: [c for c in row for _ in range(k)] for u, row in o.reserve.items()}
    for e in g.edges:
        e.delay *= k
    g.name = f"{name}-x{k}"
    return g


def _run(prob, seconds: float, variant: str) -> dict:
    from adasched.planner.solver import SolveParams

    from . import model

    params = SolveParams(time_limit=seconds, seed=0, threads=1)
    saved = model.INTERVAL_FROM
    t0 = time.perf_counter()
    try:
        if variant == "one-hot":
            model.INTERVAL_FROM = 10**9
        s = model.solve(prob, params, heuristic=variant != "cp-sat only")
        row = {"method": s.method, "ii": s.ii, "mii": s.mii.mii, "status": s.status,
               "gap": "-" if s.gap is None else f"{s.gap:.3f}"}
    except ValueError as err:
        row = {"method": "-", "ii": "none", "mii": "-", "status": f"error: {str(err)[:60]}", "gap": "-"}
    finally:
        model.INTERVAL_FROM = saved
    row["seconds"] = f"{time.perf_counter() - t0:.2f}"
    return row


def _adherence() -> int:
    """One row per (graph, limit): wall and CPU seconds of ``solve`` and what it returned; then the worst ratios."""
    from adasched.planner.solver import SolveParams

    from .graph import Graph, check_graph, load_machine
    from .model import TimeLimitError, solve
    from .randgraph import random_graph

    h100 = load_machine("h100")
    solve(check_graph(Graph.model_validate(random_graph(4, 0)), h100), SolveParams(time_limit=0.1))  # imports
    print("| graph | ops | time limit s | wall s | CPU s | wall / limit | result |")
    print("|---|---|---|---|---|---|---|")
    over = worst = 0.0
    runs = late = 0
    for n in (40, 80, 120):
        for seed in (1, 2, 3):
            for warp in (False, True):
                prob = check_graph(Graph.model_validate(random_graph(n, seed, warp=warp)), h100)
                for limit in (0.1, 0.3, 1.0, 2.0):
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        s = solve(prob, SolveParams(time_limit=limit, seed=0, threads=1))
                        res = f"I = {s.ii} (MII {s.mii.mii}), {s.method}, {s.status}"
                    except TimeLimitError:
                        res = "error: time limit ran out"
                    except ValueError as err:  # e.g. proved: no warp schedule within the register limits
                        res = f"error: {err}"
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    runs += 1
                    late += wall > 1.2 * limit + 0.1
                    worst, over = max(worst, wall / limit), max(over, wall - (1.2 * limit + 0.1))
                    print(f"| {prob.graph.name} | {n} | {limit:g} | {wall:.2f} | {cpu:.2f} | {wall / limit:.2f} "
                          f"| {res} |", flush=True)
    print(f"\nworst wall / limit {worst:.2f}; {late} of {runs} runs above 1.2 x limit + 0.1 s "
          f"(worst by {max(over, 0.0) * 1000:.0f} ms)")
    return 0


def _first(sizes: tuple[int, ...] = (40, 80, 120)) -> int:
    """CPU seconds of the iterative modulo-scheduling heuristic to its first schedule and for its whole search
    (``heuristic_schedule(time_limit=30)``), random graphs of 40, 80 and 120 ops, seeds 1-3, plain and warp."""
    from . import heuristic
    from .graph import Graph, check_graph, load_machine
    from .randgraph import random_graph

    h100 = load_machine("h100")
    print("| graph | ops | CPU s to first schedule | CPU s whole search | I | tried |")
    print("|---|---|---|---|---|---|")
    real = heuristic._search
    for n in sizes:
        for seed in (1, 2, 3):
            for warp in (False, True):
                prob = check_graph(Graph.model_validate(random_graph(n, seed, warp=warp)), h100)
                first: list[float] = []
                c0 = time.process_time()

                def timed(lower, cap, attempt, tried, deadline, hard=float("inf")):
                    def att(ii):
                        r = attempt(ii)
                        if r is not None and not first:
                            first.append(time.process_time() - c0)
                        return r
                    return real(lower, cap, att, tried, deadline, hard)

                heuristic._search = timed
                try:
                    h = heuristic.heuristic_schedule(prob, warp=warp, time_limit=30.0)
                finally:
                    heuristic._search = real
                whole = time.process_time() - c0
                print(f"| {prob.graph.name} | {n} | {first[0] if first else float('nan'):.3f} | {whole:.3f} | "
                      f"{h.ii if h else 'none'} | {len(h.tried) if h else '-'} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .graph import Graph, check_graph, load_machine
    from .randgraph import random_graph

    ap = OneLineArgParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()  # (--adherence --first dropped --first; --quick was ignored by both)
    mode.add_argument("--quick", action="store_true", help="40-op graphs and 0.5 s budgets only")
    mode.add_argument("--adherence", action="store_true", help="time solve() against its time limit instead")
    mode.add_argument("--first", action="store_true", help="CPU time of the heuristic's first schedule instead")
    a = ap.parse_args(argv)
    if a.adherence:
        return _adherence()
    if a.first:
        return _first()
    h100 = load_machine("h100")
    cases = []
    for n in ((40,) if a.quick else (40, 60, 80)):
        for warp in (False, True):
            prob = check_graph(Graph.model_validate(random_graph(n, 1, warp=warp)), h100)
            for limit in ((0.5,) if a.quick else (0.5, 10.0)):
                for variant in ("current", "cp-sat only"):
                    cases.append((prob, limit, variant))
    if not a.quick:
        for graph, k in (("toy-attention", 256), ("fa3-hopper", 64)):
            prob = check_graph(_scaled(graph, "h100", k), h100)
            for variant in ("current", "one-hot"):
                cases.append((prob, 30.0, variant))
        prob = check_graph(Graph.model_validate(random_graph(20, 3, scale=32)), h100)
        for variant in ("current", "one-hot"):
            cases.append((prob, 30.0, variant))
    print("| graph | ops | warp | time limit s | variant | method | I | MII | status | gap | solve s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for prob, limit, variant in cases:
        r = _run(prob, limit, variant)
        print(f"| {prob.graph.name} | {len(prob.graph.ops)} | {prob.warp} | {limit:g} | {variant} | {r['method']} | "
              f"{r['ii']} | {r['mii']} | {r['status']} | {r['gap']} | {r['seconds']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
