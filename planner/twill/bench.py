"""`adasched bench twill`: the built-in loop graphs solved a few times each - I, MII, status, solve seconds (median,
min-max), stages, warp groups, Triton knobs, simulated cycles per iteration and two speedups: over the serial loop
(one iteration after the other in one instruction stream: the same baseline for every plan of a graph) and over the
plan's own kernel without pipelining (its warp groups and handoffs kept: what pipelining alone buys it) - and the Twill issue's targets that a CPU can check: the toy loop at I = 2 with one tensor
core; the FA3-style Hopper graph solved within 10 s with a TMA producer group, two consumer groups that ping-pong
and each QK^T peeled a stage ahead of its PV.

Solve seconds are the whole search over I (``plan.solver.solve_seconds``: plain modulo scheduling from MII up, then
the joint SWP + warp-specialisation problem), not the simulation or the plan's checks. The GPU target (plan-derived
Triton knobs within 3 % of a full sweep) is ``launch/gemm_check.py``'s, on a GPU.
"""
from __future__ import annotations

import platform
import statistics
from typing import Callable

__all__ = ["FA3_SECONDS_TARGET", "bench_twill", "fa3_structure_problems"]

#: the Twill issue's speed target for the FA3-style Hopper graph on a 2-core CPU (seconds of solve)
FA3_SECONDS_TARGET = 10.0


def fa3_structure_problems(plan) -> list[str]:
    """What the FA3-style schedule lacks of the structure the paper finds (empty: all of it): one producer group
    holding the TMA loads LK and LV; two consumer groups, S_i P_i O_i in the same one; each softmax P_i overlapping
    the other consumer's GEMMs (S_j, O_j) on the tensor core modulo I (ping-pong); each S_i a stage ahead of its
    O_i and listed as peeled (the first QK^T in the prologue)."""
    out = []
    producers = [g for g in plan.warp_groups if g.role == "producer"]
    consumers = [g for g in plan.warp_groups if g.role == "consumer"]
    if len(producers) != 1 or set(producers[0].ops) != {"LK", "LV"}:
        out.append(f"producer groups {[g.ops for g in producers]} (want one holding LK and LV)")
    if len(consumers) != 2:
        out.append(f"{len(consumers)} consumer groups (want 2)")
    slot = {o.name: o for o in plan.ops}
    if not {f"{k}{i}" for k in "SPO" for i in (0, 1)} <= set(slot):
        return out + ["ops S0 P0 O0 S1 P1 O1 not all in the plan"]
    for i in (0, 1):
        if len({slot[f"{k}{i}"].warp_group for k in "SPO"}) != 1:
            out.append(f"S{i} P{i} O{i} in different warp groups")
    if slot["S0"].warp_group == slot["S1"].warp_group:
        out.append("both consumers' ops in one warp group")

    def cycles(name: str) -> set[int]:
        return {(slot[name].issue_cycle + c) % plan.ii for c in range(slot[name].length)}

    for i, j in ((0, 1), (1, 0)):
        if not cycles(f"P{i}") & (cycles(f"S{j}") | cycles(f"O{j}")):
            out.append(f"softmax P{i} never overlaps consumer {j}'s GEMMs (no ping-pong)")
    for i in (0, 1):
        if not slot[f"S{i}"].stage < slot[f"O{i}"].stage or f"S{i}" not in plan.peeled:
            out.append(f"S{i} not peeled a stage ahead of O{i}")
    return out


def bench_twill(graphs: list[str], params, repeats: int, advance: Callable[[int], None] = lambda n=1: None) -> dict:
    """Solve each graph (built-in name or file; machine: the graph's hint, else h100) ``repeats`` times with
    ``params``; one row per graph and the targets' rows. Every plan is validated (``make_plan`` verifies it)."""
    from .graph import make_problem
    from .plan import plan_twill, serial_cycles

    rows, plans = [], {}
    for name in graphs:
        prob = make_problem(name)  # (the machine plan_twill takes: the graph's hint, else h100)
        # the candidate-independent baseline: one iteration after the other, one instruction stream (no warp
        # groups, no handoffs). The plan's own "no-pipelining" keeps its warp groups (what pipelining alone buys
        # that plan), so two plans of equal I read different ratios against it: a worse grouping, with more
        # handoffs, read a larger speedup.
        serial = serial_cycles(prob.graph, prob.units)
        runs = []
        for _ in range(repeats):
            runs.append(plan_twill(name, None, params))
            advance(1)
        p = runs[0]
        secs = [r.solver.solve_seconds for r in runs]
        plans[name] = runs
        rows.append({
            "graph": p.graph_name, "machine": p.machine_name, "ii": p.ii, "mii": p.mii, "res_mii": p.res_mii,
            "rec_mii": p.rec_mii, "excl_mii": p.excl_mii, "status": p.solver.status, "gap": p.solver.gap,
            "same_ii_every_run": len({r.ii for r in runs}) == 1,
            # (status, I and stages are the first run's; with --repeats the others may differ under a time limit)
            "statuses_of_runs": sorted({r.solver.status for r in runs}),
            "solve_seconds_median": statistics.median(secs), "solve_seconds_min": min(secs),
            "solve_seconds_max": max(secs), "stages": p.stages,
            "warp_groups": "; ".join(f"{g.role}: {' '.join(g.ops)}" for g in p.warp_groups),
            "knobs": p.knobs.model_dump(exclude={"note"}),
            "sim_cycles_per_iteration": p.sim_cycles_per_iteration,
            # (the speedups' baselines, so the row can be checked, in cycles per iteration)
            "serial_cycles": serial, "speedup_vs_serial": serial / p.ii,
            "no_pipelining_cycles": round(p.baselines_ms["no-pipelining"] / (p.cycle_ns * 1e-6)),
            "speedup_vs_no_pipelining": p.baselines_ms["no-pipelining"] / p.predicted_ms,
        })
    targets = []
    if "toy-attention" in plans:
        toy = plans["toy-attention"]
        tc = toy[0].graph.get("units", {}).get("TC", toy[0].machine.get("units", {}).get("TC"))
        targets.append({"target": "toy-attention: I = 2 with one tensor core",
                        "value": f"I = {sorted({p.ii for p in toy})}, TC = {tc}",
                        "met": all(p.ii == 2 for p in toy) and tc == 1})
    if "fa3-hopper" in plans:
        fa3 = plans["fa3-hopper"]
        worst = max(p.solver.solve_seconds for p in fa3)
        targets.append({"target": f"fa3-hopper: solved to proven optimum within {FA3_SECONDS_TARGET:g} s",
                        "value": f"slowest of {len(fa3)}: {worst:.2f} s, status {sorted({p.solver.status for p in fa3})}",
                        "met": worst <= FA3_SECONDS_TARGET and all(p.solver.status == "optimal" for p in fa3)})
        problems = sorted({m for p in fa3 for m in fa3_structure_problems(p)})
        targets.append({"target": "fa3-hopper: TMA producer group, two ping-pong consumer groups, each QK^T peeled",
                        "value": "; ".join(problems) or "all runs", "met": not problems})
    return {"host": f"{platform.machine()} ({platform.processor() or 'cpu'})", "repeats": repeats,
            "threads": params.threads, "time_limit": params.time_limit, "seed": params.seed,
            "rows": rows, "targets": targets}
