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
        from adasched.planner.ui import emit_json, print_table
        from adasched.profiler.io import check_distinct_outputs, check_output_path, outputs_together

        from .plan import plan_twill

        check_output_path(out, "--out")
        check_output_path(plot, "--plot")
        # the inputs by the files they name: a built-in name given as --graph/--machine (the default fa3-hopper
        # too) resolves to the package's own file, which `--out <that file>` replaced by a plan
        check_distinct_outputs(("--out", out), ("--plot", plot),
                               inputs=(("--graph", _input_file(graph, "graph")), ("--machine", _input_file(machine,
                                                                                                            "machine"))))
        params = _solve_params(time_limit, seed, threads)
        plan = plan_twill(graph, machine, params, load_slack=load_slack)
        with outputs_together():  # both or neither (a Ctrl-C while the plot was drawn left the plan written)
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


    @groups.bench.command("twill")
    def bench_twill_cmd(
        graph: str = typer.Option("all", "--graph", help="Comma-separated built-in graphs or graph JSON files "
                                  "(machine: each graph's hint, else h100); 'all': every built-in graph."),
        repeats: int = typer.Option(3, "--repeats", help="Solves per graph (1..100); the table gives the median "
                                    "and the range of the solve seconds."),
        time_limit: float = typer.Option(10.0, "--time-limit", help="Seconds for each whole search over I."),
        seed: int = typer.Option(0, "--seed", help="CP-SAT random seed (>= 0)."),
        threads: int = typer.Option(1, "--threads", help="CP-SAT workers (1 = deterministic)."),
        as_json: bool = typer.Option(False, "--json", help="Print the rows and targets as JSON."),
    ) -> None:
        """Solve the built-in loop graphs (or given ones) a few times: I, MII, status, solve seconds, warp groups,
        Triton knobs, simulated cycles per iteration, speedup over no pipelining; and the CPU-side targets (toy loop
        I = 2; FA3-style graph optimal within 10 s with its producer / ping-pong consumer structure)."""
        from adasched.planner.ui import emit_json, fmt, print_table, progress
        from adasched.profiler.io import InputError

        from .bench import bench_twill
        from .graph import builtin_graphs, make_problem

        names = builtin_graphs() if graph.strip() == "all" else [g.strip() for g in graph.split(",")]
        if not names or any(not g for g in names):
            raise InputError("--graph", f"{graph!r}: give graph names or files separated by commas, or 'all'")
        if len(set(names)) != len(names):
            raise InputError("--graph", f"{graph!r} names a graph twice")
        if not 1 <= repeats <= 100:
            raise InputError("--repeats", f"{repeats}: must be 1..100")
        params = _solve_params(time_limit, seed, threads)
        for name in names:  # every graph loads and checks before the first solve
            make_problem(name)
        with progress("bench twill", len(names) * repeats, enabled=not as_json) as advance:
            res = bench_twill(names, params, repeats, advance)
        if as_json:
            emit_json(res)
            return
        rows = [(r["graph"], r["machine"], r["ii"], f"{r['mii']} ({r['res_mii']}, {r['rec_mii']}, {r['excl_mii']})",
                 r["status"] + ("" if r["same_ii_every_run"] else " (I varied)"),
                 f"{r['solve_seconds_median']:.2f} ({r['solve_seconds_min']:.2f}-{r['solve_seconds_max']:.2f})",
                 r["stages"], r["warp_groups"],
                 " ".join(f"{k}={v}" for k, v in r["knobs"].items()), fmt(r["sim_cycles_per_iteration"]),
                 f"{r['speedup_vs_serial']:.2f}x", f"{r['speedup_vs_no_pipelining']:.2f}x") for r in res["rows"]]
        print_table(rows, ["graph", "machine", "I", "MII (res, rec, excl)", "status", "solve s median (min-max)",
                           "stages", "warp groups", "Triton knobs", "sim cycles/iter", "vs serial",
                           "vs no pipelining (its groups)"],
                    title=f"bench twill: {repeats} solve(s) per graph, {threads} thread(s), seed {seed}, "
                          f"on {res['host']}")
        if res["targets"]:
            print_table([(t["target"], t["value"], "met" if t["met"] else "MISSED") for t in res["targets"]],
                        ["target", "measured", ""], title="targets (CPU side)")


def _solve_params(time_limit: float, seed: int, threads: int):
    """SolveParams of the three options, each checked alone (the others at their valid defaults) so the error names
    the option that is wrong whatever SolveParams' message says (it used to be read off the message's first word)."""
    from adasched.planner.solver import SolveParams
    from adasched.profiler.io import InputError

    for option, field, value in (("--time-limit", "time_limit", time_limit), ("--seed", "seed", seed),
                                 ("--threads", "threads", threads)):
        try:
            SolveParams(**{field: value})
        except ValueError as err:
            raise InputError(option, str(err)) from None
    return SolveParams(time_limit=time_limit, seed=seed, threads=threads)


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

