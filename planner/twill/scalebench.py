"""Twill at scale: I, MII, status and solve time on large random graphs and large-latency graphs.

``python -m adasched.planner.twill.scalebench [--quick]`` prints one markdown table. Each case runs the current
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


def main(argv: list[str] | None = None) -> int:
    from .graph import Graph, check_graph, load_machine
    from .randgraph import random_graph

    ap = OneLineArgParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40-op graphs and 0.5 s budgets only")
    a = ap.parse_args(argv)
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
