"""Seeded random loop-body graphs of any size, for scale tests and benchmarks.

``python -m adasched.planner.twill.randgraph --ops 60 --seed 1 [--warp] [--scale 256] > g.json`` writes one.

A graph has ``ops`` operations on units TC (1), SFU (1), ALU (2), TMA (1) with 1-3-cycle reservation tables,
forward edges (distance 0, delays 0-4) from each op to 1-2 later ops, and a few loop-carried edges (distance
1-2, delays 0-4) back to earlier ops or the op itself. With ``warp`` every 8th op is a variable-latency TMA load
holding shared memory that feeds the next ops, and the others hold 0-16 registers (most none), some blocking. ``scale``
multiplies every delay and every reservation cycle (a table [1, 1] becomes 2 * scale cycles of 1): the same
problem in finer time units, with I that many times larger.
"""
from __future__ import annotations

import json
import random
import sys

from adasched.planner.ui import OneLineArgParser

from .graph import MAX_CYCLES, MAX_OPS

__all__ = ["random_graph", "UNITS"]

UNITS = {"TC": 1, "SFU": 1, "ALU": 2, "TMA": 1}


def random_graph(n_ops: int, seed: int, *, warp: bool = False, scale: int = 1) -> dict:
    """A graph dict (``Graph.model_validate`` reads it) with ``n_ops`` ops; see the module docstring."""
    if n_ops < 2:
        raise ValueError(f"n_ops must be >= 2 (got {n_ops})")
    if scale < 1:
        raise ValueError(f"scale must be >= 1 (got {scale})")
    rng = random.Random(seed)
    ops: list[dict] = []
    loads: set[int] = set()
    for i in range(n_ops):
        if warp and i % 8 == 0 and i + 1 < n_ops:
            loads.add(i)
            ops.append({"name": f"ld{i}", "reserve": {"TMA": [1] * scale}, "variable_latency": True,
                        "smem": rng.choice([4, 8, 16]), "category": "tma"})
            continue
        unit = rng.choice(["TC", "TC", "SFU", "ALU", "ALU"])
        row = [rng.randint(0 if c else 1, UNITS[unit]) for c in range(rng.randint(1, 3))]
        op = {"name": f"v{i}", "reserve": {unit: [c for c in row for _ in range(scale)]}, "category": unit.lower()}
        if warp:
            op["regs"] = rng.choice([0, 0, 0, 0, 0, 8, 16])
            op["blocking"] = unit == "SFU" and rng.random() < 0.5
        ops.append(op)
    names = [o["name"] for o in ops]
    edges = []
    for i in range(n_ops - 1):
        for j in rng.sample(range(i + 1, min(n_ops, i + 6)), min(rng.randint(1, 2), n_ops - 1 - i)):
            delay = rng.randint(2, 4) if i in loads else rng.randint(0, 4)
            edges.append({"from": names[i], "to": names[j], "delay": delay * scale, "distance": 0})
    for _ in range(max(1, n_ops // 6)):
        i = rng.randrange(n_ops)
        j = rng.randint(max(0, i - 4), i)
        edges.append({"from": names[i], "to": names[j], "delay": rng.randint(0, 4) * scale,
                      "distance": rng.randint(1, 2)})
    return {"name": f"rand{n_ops}-s{seed}" + ("-warp" if warp else "") + (f"-x{scale}" if scale > 1 else ""),
            "units": dict(UNITS), "ops": ops, "edges": edges}


def main(argv: list[str] | None = None) -> int:
    ap = OneLineArgParser(prog="python -m adasched.planner.twill.randgraph", description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=60, help=f"operations in the loop body (2..{MAX_OPS}; default: 60)")
    ap.add_argument("--seed", type=int, default=0, help="random seed: same seed, same graph (default: 0)")
    ap.add_argument("--warp", action="store_true", help="loads, registers, blocking ops (the joint problem)")
    ap.add_argument("--scale", type=int, default=1, help="multiply every delay and reservation cycle "
                    f"(1..{MAX_CYCLES // 4}; default: 1)")
    a = ap.parse_args(argv)
    # most: what `plan twill` takes (MAX_OPS ops; delays, up to 4 x scale cycles, of at most MAX_CYCLES)
    for option, value, least, most in (("--ops", a.ops, 2, MAX_OPS), ("--scale", a.scale, 1, MAX_CYCLES // 4)):
        if not least <= value <= most:
            bound = f">= {least}" if value < least else f"<= {most} (the most plan twill takes)"
            print(f"error: {option}: must be {bound}, got {value}", file=sys.stderr)
            return 2
    g = random_graph(a.ops, a.seed, warp=a.warp, scale=a.scale)  # its only ValueErrors are refused above
    if a.warp:  # large warp graphs hold more registers / shared memory than one SM (plan twill refuses them)
        from adasched.profiler.io import InputError

        from .graph import Graph, check_graph, load_machine

        try:
            check_graph(Graph.model_validate(g), load_machine("h100"))
        except InputError as err:
            print(f"error: --ops: {a.ops} ops with --warp (seed {a.seed}) do not fit an h100 SM: {err.what} "
                  f"(fewer --ops, e.g. 120)", file=sys.stderr)
            return 2
    json.dump(g, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
