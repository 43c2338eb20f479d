"""`adasched plan lora` and `adasched bench lora` (thin: parsing and printing; the work is in plan.py)."""
from __future__ import annotations

import sys

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "MAX_TIME_LIMIT_S"]

#: longest --time-limit per (global batch, group) packing problem (seconds)
MAX_TIME_LIMIT_S = 3600.0

_JOBS_HELP = "A jobs file (JSON or YAML) or a preset name: mix, het, tiny."  # = jobs.PRESETS (a test checks)
#: without --time-limit build_plan's default (model.DEFAULT_TIME_LIMIT_S) applies; the help restates its value as the
#: CLI's start-up imports no planner (a test checks they agree); with --no-milp it is refused (only the MILPs use it)
_TIME_LIMIT_HELP = ("Solver budget in seconds per (global batch, group) problem: MILP 1 gets at most half, MILP 2 "
                    "the rest (default 0.4; not with --no-milp).")
_PROFILE_HELP = "Cluster profile: a built-in name (h100-sxm, a100-64-flexsp-paper) or a profile JSON file."


def _plan(jobs: str, profile: str, time_limit: Optional[float], seed: Optional[int], no_milp: bool,
          show_progress: bool = True):
    from adasched.profiler.io import InputError, check_seconds
    from adasched.profiler.profile import load_profile

    from ..ui import progress
    from .jobs import build_workload, load_jobs
    from .plan import build_plan

    if seed is not None and seed < 0:  # as plan sp / plan twill: a solver seed is >= 0
        raise InputError("--seed", f"must be >= 0, got {seed}")
    if seed is not None and no_milp:  # was accepted, ignored and recorded in the plan
        raise InputError("--seed", "has no effect with --no-milp (first-fit decreasing draws no random numbers)")
    seed = seed or 0
    if time_limit is not None:
        check_seconds("--time-limit", time_limit, most=MAX_TIME_LIMIT_S)  # NaN; inf: the plan recorded no limit
        if no_milp:  # first-fit decreasing takes no time limit: it was accepted and ignored
            raise InputError("--time-limit", "has no effect with --no-milp (it is the MILPs' budget)")
    cfg, base, label = load_jobs(jobs)
    w = build_workload(cfg, base, where=label if not label.startswith("preset:") else f"preset {jobs}", label=label)
    for note in w.notes:
        sys.stderr.write(f"note: {note}\n")
    prof = load_profile(profile)
    with progress("packing (global batch, group) problems", total=None, enabled=show_progress) as advance:
        return build_plan(w, prof, seed=seed, use_milp=not no_milp, progress=advance,
                          **({} if time_limit is None else {"time_limit": time_limit}))


def _comparison_rows(plan) -> list[tuple]:
    """The plan and its baselines. Ratios are the plan's own (from makespans stored to 1e-4 ms and 8 significant digits): a makespan under
    0.00005 ms is stored as 0 (a profile of tiny per-token costs), and dividing by it was a ZeroDivisionError
    after the plan was written."""
    s = plan.summary

    def per_s(ms: float) -> float:
        return s.tokens / ms * 1000.0 if ms > 0 else float("inf")

    return [
        ("lorafusion (this plan)", s.makespan_ms, s.throughput_tokens_per_s, s.padding_waste, s.microbatches, 1.0),
        ("mlora-style", s.mlora_makespan_ms, per_s(s.mlora_makespan_ms), s.mlora_padding_waste, s.mlora_microbatches,
         s.speedup_vs_mlora),
        ("mlora-style, length-sorted", s.mlora_sorted_makespan_ms, per_s(s.mlora_sorted_makespan_ms),
         s.mlora_sorted_padding_waste,
         s.mlora_microbatches if s.mlora_sorted_microbatches is None else s.mlora_sorted_microbatches,
         s.speedup_vs_mlora_sorted),
        ("sequential packing", s.sequential_makespan_ms, per_s(s.sequential_makespan_ms),
         s.sequential_padding_waste, s.sequential_microbatches, s.speedup_vs_sequential),
    ]


def register(groups) -> None:
    @groups.plan.command("lora")
    def plan_lora(
        jobs: str = typer.Option(..., "--jobs", help=_JOBS_HELP),
        profile: str = typer.Option("h100-sxm", "--profile", help=_PROFILE_HELP),
        out: Path = typer.Option(..., "--out", help="Where to write the plan JSON (atomic; nothing on error)."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help=_TIME_LIMIT_HELP),
        seed: Optional[int] = typer.Option(None, "--seed", help="MILP solver seed (>= 0; default 0; not with --no-milp)."),
        no_milp: bool = typer.Option(False, "--no-milp", help="First-fit decreasing only (no MILP)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the simulated 1F1B pipeline (PNG)."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan summary as JSON."),
    ) -> None:
        """Pack several LoRA jobs sharing one frozen base model into microbatches for a 1F1B pipeline
        (adapter grouping, FFD + MILP packing, merge pass, dependency rule) and compare with mLoRA-style
        and sequential baselines simulated on the same samples."""
        from adasched.profiler.io import check_distinct_outputs, check_output_path, outputs_together

        from ..plan import save_plan
        from ..ui import emit_json, print_table

        check_output_path(out, "--out")
        check_output_path(plot, "--plot")
        from .jobs import length_files, load_jobs

        outputs = (("--out", out), ("--plot", plot))
        check_distinct_outputs(*outputs, inputs=(("--jobs", jobs), ("--profile", profile)))
        # the length files the jobs file names are inputs too (--out lens.txt replaced the lengths with the plan)
        cfg, base, _ = load_jobs(jobs)
        check_distinct_outputs(*outputs, inputs=[("--jobs length file", p) for p in length_files(cfg, base)])
        plan = _plan(jobs, profile, time_limit, seed, no_milp, show_progress=not as_json)
        with outputs_together():  # both or neither (a Ctrl-C while the plot was drawn left the plan written)
            save_plan(plan, out)
            if plot:
                plan.plot(plot)
        if as_json:
            emit_json({"out": str(out), "summary": plan.summary.model_dump(mode="json"),
                       "solver": plan.solver.model_dump(mode="json")})
            return
        print_table(plan.summary_rows(), ["field", "value"], title=f"LoRA plan for {plan.source}")
        print_table(_comparison_rows(plan), ["schedule", "makespan ms", "tokens/s", "padding waste", "microbatches",
                                             "time vs plan"], title="simulated 1F1B pipeline (same samples, same costs)")
        typer.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))

    @groups.bench.command("lora")
    def bench_lora(
        jobs: str = typer.Option(..., "--jobs", help=_JOBS_HELP),
        profile: str = typer.Option("h100-sxm", "--profile", help=_PROFILE_HELP),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help=_TIME_LIMIT_HELP),
        seed: Optional[int] = typer.Option(None, "--seed", help="MILP solver seed (>= 0; default 0; not with --no-milp)."),
        no_milp: bool = typer.Option(False, "--no-milp", help="First-fit decreasing only (ablation)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    ) -> None:
        """Plan a workload and report simulated throughput against mLoRA-style and sequential baselines,
        padding waste, solve time p95 and the verifier's missing/duplicated sample counts."""
        from ..ui import emit_json, print_table

        plan = _plan(jobs, profile, time_limit, seed, no_milp, show_progress=not as_json)
        s = plan.summary
        if as_json:
            emit_json({"jobs": plan.source, "profile": plan.profile.name if plan.profile else profile,
                       "summary": s.model_dump(mode="json"), "solver": plan.solver.model_dump(mode="json")})
            return
        print_table(_comparison_rows(plan), ["schedule", "makespan ms", "tokens/s", "padding waste", "microbatches",
                                             "time vs plan"], title=f"bench lora: {plan.source} on {profile}")
        print_table([(k, v) for k, v in s.model_dump().items()], ["metric", "value"], title="summary")
