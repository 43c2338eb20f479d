"""`adasched plan twill`: optimal software pipelining + warp specialisation of a loop-body graph."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]


def register(groups) -> None:
    @groups.plan.command("twill")
    def plan_twill_cmd(
        graph: str = typer.Option("fa3-hopper", "--graph", help="Built-in graph (toy-attention, fa3-hopper, "
                                  "hopper-gemm, fa4-blackwell) or a graph JSON file."),
        machine: Optional[str] = typer.Option(None, "--machine", help="Built-in machine (h100, b200) or a machine "
                                              "JSON file; default: the graph's 'machine' field, else h100."),
        out: Optional[Path] = typer.Option(None, "--out", help="Write the plan JSON here."),
        time_limit: float = typer.Option(10.0, "--time-limit", help="Seconds for the whole search over I."),
        seed: int = typer.Option(0, "--seed", help="CP-SAT random seed (>= 0)."),
        threads: int = typer.Option(1, "--threads", help="CP-SAT workers (1 = deterministic)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the schedule (PNG)."),
        as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary."),
        load_slack: bool = typer.Option(False, "--load-slack", help="After fewest warp groups and channels, prefer "
                                        "slack after variable-latency loads (deeper load buffers) over a short span."),
    ) -> None:
        """Find the smallest initiation interval I (from MII = max(ResMII, RecMII, the exclusive-cells bound) upward,
        CP-SAT), the stage and issue cycle of every op, a warp-group assignment, buffer depths and Triton knobs."""
        from adasched.planner.plan import save_plan
        from adasched.planner.solver import SolveParams
        from adasched.planner.ui import emit_json, print_table
        from adasched.profiler.io import InputError, check_distinct_outputs, check_output_path

        from .plan import plan_twill

        check_output_path(out, "--out")
        check_output_path(plot, "--plot")
        # the inputs by the files they name: a built-in name given as --graph/--machine (the default fa3-hopper
        # too) resolves to the package's own file, which `--out <that file>` replaced by a plan
        check_distinct_outputs(("--out", out), ("--plot", plot),
                               inputs=(("--graph", _input_file(graph, "graph")), ("--machine", _input_file(machine,
                                                                                                            "machine"))))
        # each option checked alone (the others at their valid defaults), so the error names the option that is
        # wrong whatever SolveParams' message says (it used to be read off the message's first word)
        for option, field, value in (("--time-limit", "time_limit", time_limit), ("--seed", "seed", seed),
                                     ("--threads", "threads", threads)):
            try:
                SolveParams(**{field: value})
            except ValueError as err:
                raise InputError(option, str(err)) from None
        params = SolveParams(time_limit=time_limit, seed=seed, threads=threads)
        plan = plan_twill(graph, machine, params, load_slack=load_slack)
        if out:
            save_plan(plan, out)
        if plot:
            plan.plot(plot)
        if as_json:
            emit_json({
                "ii": plan.ii, "mii": plan.mii, "res_mii": plan.res_mii, "rec_mii": plan.rec_mii,
                "excl_mii": plan.excl_mii,
                "plain_ii": plan.plain_ii, "plain_ii_proven": plan.plain_ii_proven, "method": plan.method, "load_slack": plan.load_slack,
                "status": plan.solver.status, "gap": plan.solver.gap,
                "ii_proven_minimal": plan.ii_proven_minimal, "solve_seconds": plan.solver.solve_seconds,
                "stages": plan.stages,
                "warp_groups": [g.model_dump() for g in plan.warp_groups],
                "ops": [o.model_dump() for o in plan.ops], "channels": plan.channels, "buffers": plan.buffers,
                "peeled": plan.peeled, "knobs": plan.knobs.model_dump(),
                "sim_cycles_per_iteration": plan.sim_cycles_per_iteration, "sim_deadlock": plan.sim_deadlock,
                "note": plan.solver.note, "out": str(out) if out else None,
            })
        else:
            print_table(plan.summary_rows(), ["field", "value"], title=f"twill plan: {plan.graph_name}")
            rows = [(o.name, o.issue_cycle, o.stage, o.residue, o.warp_group, " ".join(o.units)) for o in
                    sorted(plan.ops, key=lambda o: o.issue_cycle)]
            print_table(rows, ["op", "issue", "stage", "residue", "warp group", "units"], title="schedule")
            wrote = [str(p) for p in (out, plot) if p]
            if wrote:
                typer.echo(f"wrote {' and '.join(wrote)}")


def _input_file(spec, what: str):
    """The file a --graph/--machine value names (a built-in name resolved to its file), or the value itself when it
    names none (its own error comes later)."""
    from adasched.profiler.io import InputError

    from .graph import GRAPHS_DIR, MACHINES_DIR, _resolve, builtin_graphs, builtin_machines

    if spec is None:
        return None
    folder, names = (GRAPHS_DIR, builtin_graphs()) if what == "graph" else (MACHINES_DIR, builtin_machines())
    try:
        return _resolve(spec, folder, what, names)
    except InputError:
        return spec

