"""`adasched plan sp` and `adasched bench sp` (thin: parsing and printing; the work is in api.py/planner.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "check_options", "MAX_TIME_LIMIT_S", "MAX_SIGMA"]

_PROFILE_HELP = "Cluster profile: a built-in name (a100-64-flexsp-paper, h100-sxm) or a profile JSON file."
_MODEL_HELP = "Model preset: gpt-7b, gpt-13b, gpt-30b."
_SEQLENS_HELP = ("Sequence-length file, one positive integer per line ('#' comments allowed); 'builtin' for the "
                 "packaged 20k-line Wikipedia sample; or 'lognormal:MEDIAN,SIGMA' for 100k lengths drawn from a "
                 "lognormal with that median (tokens) and log-space sigma (seed 0).")


def _lengths(seqlens: str, max_context):
    """Lengths from a file, the packaged sample or a parametric lognormal (clipped to max_context)."""
    import numpy as np

    from adasched.profiler.io import InputError

    from .api import load_lengths
    from .batching import MAX_CONTEXT

    if (seqlens == "builtin" or seqlens.startswith("lognormal:")) and os.path.isfile(seqlens):
        # (a file named so was silently ignored for the packaged sample; --profile refuses the same clash)
        raise InputError("--seqlens", f"{seqlens!r} is both a built-in source and a file here: pass ./{seqlens} for "
                                      f"the file (or run elsewhere for the built-in)")
    if seqlens == "builtin":
        from importlib import resources

        return load_lengths(str(resources.files("adasched.planner.flexsp").joinpath("data/wikipedia-sample.txt")),
                            max_context)
    if seqlens.startswith("lognormal:"):
        try:
            median, sigma = (float(x) for x in seqlens.split(":", 1)[1].split(","))
        except ValueError:
            raise InputError("--seqlens",
                             f"{seqlens!r}: expected lognormal:MEDIAN,SIGMA, e.g. lognormal:1024,1.6") from None
        if not (1 <= median <= MAX_CONTEXT and 0 < sigma <= MAX_SIGMA):  # NaN fails too
            raise InputError("--seqlens", f"{seqlens!r}: need 1 <= MEDIAN <= {MAX_CONTEXT} (tokens) and "
                                          f"0 < SIGMA <= {MAX_SIGMA:g}")
        rng = np.random.default_rng(0)
        # clipped as floats first: a wide sigma draws lengths beyond int64 (a cast warning, then garbage)
        draws = np.minimum(rng.lognormal(np.log(median), sigma, 100_000), float(max_context or MAX_CONTEXT))
        return np.maximum(1, np.rint(draws)).astype(np.int64)
    return load_lengths(seqlens, max_context)


#: longest --time-limit (seconds per global batch), as for `plan lora`: inf was accepted with --no-milp (and the
#: plan recorded no limit)
MAX_TIME_LIMIT_S = 3600.0
#: widest lognormal:MEDIAN,SIGMA (log-space): sigma 10 already spans e**-45..e**45 over 100k draws
MAX_SIGMA = 10.0


def check_options(global_batch: int, steps: int, time_limit: float | None, max_context, *,
                  deterministic: bool = False, no_milp: bool = False) -> float:
    """The numeric options of `plan sp` / `bench sp`, before any file is read: one InputError naming the option.
    Returns the time limit (default 1 s)."""
    from adasched.profiler.io import InputError, check_seconds

    from .batching import check_batch_options, check_max_context

    if time_limit is not None:
        check_seconds("--time-limit", time_limit, most=MAX_TIME_LIMIT_S)
        if deterministic and no_milp:  # accepted and ignored: the same plan at 0.01 s and 50 s
            raise InputError("--time-limit", "has no effect with --deterministic --no-milp (the searches are bounded "
                                             "by work there, and it caps only MILPs)")
    check_batch_options(global_batch, steps)
    if max_context is not None:
        check_max_context(max_context)
    return DEFAULT_TIME_LIMIT_S if time_limit is None else time_limit


#: --time-limit's default (PlannerConfig.time_limit)
DEFAULT_TIME_LIMIT_S = 1.0


#: without --buckets PlannerConfig.buckets applies; the help restates its value as the CLI's start-up imports no
#: planner (a test checks they agree); with --no-milp the option is refused (no MILP uses it)
_BUCKETS_HELP = "Length buckets per micro-batch in the MILP (default 16; not with --no-milp)."

#: ``--deterministic``: group structures tried per micro-batch (MILPs: PlannerConfig.milp_nodes, 50; on the
#: Wikipedia gpt-7b / 64-GPU steps: 1.082x vs the best single degree against the clock mode's 1.080-1.085x,
#: BENCHMARKS.md `sp`)
DETERMINISTIC_EVALS = 100


def _setup(profile: str, model: str, seqlens: str, gpus: Optional[int], max_context: Optional[int],
           time_limit: float, seed: int, buckets: Optional[int], no_milp: bool, deterministic: bool = False):
    from adasched.profiler.io import InputError
    from adasched.profiler.profile import load_profile

    from .costmodel import model_preset, sp_cost_model
    from .planner import PlannerConfig

    if buckets is not None and buckets < 1:
        raise InputError("--buckets", f"must be >= 1, got {buckets}")
    if buckets is not None and no_milp:  # was accepted and ignored
        raise InputError("--buckets", "has no effect with --no-milp (it sizes the MILP's length buckets)")
    if seed < 0:
        raise InputError("--seed", f"must be >= 0, got {seed}")
    mdl = model_preset(model)
    prof = load_profile(profile)
    n = prof.world_size if gpus is None else gpus
    if n < 1:
        raise InputError("--gpus", f"must be >= 1, got {n}")
    if n > prof.world_size:
        from adasched.profiler.profile import more_nodes_hint

        nodes = f"{prof.num_nodes} node{'s' if prof.num_nodes != 1 else ''}"
        raise InputError("--gpus", f"{n} GPUs but {prof.where} describes {prof.world_size} "
                                   f"({nodes} x {prof.gpus_per_node}); " + more_nodes_hint(prof, n))
    cm = sp_cost_model(prof, mdl, gpus)  # (None: the profile's world, its own error when not a power of two)
    if max_context is not None and max_context < 1:
        raise InputError("--max-context", f"must be >= 1 token, got {max_context}")
    lens = _lengths(seqlens, max_context)
    cfg = PlannerConfig(time_limit=time_limit, seed=seed, use_milp=not no_milp,
                        max_evals=DETERMINISTIC_EVALS if deterministic else None,
                        **({} if buckets is None else {"buckets": buckets}))
    return prof, mdl, cm, lens, cfg


def _run(prof, mdl, cm, lens, cfg, global_batch, steps, seed, max_context, show_progress=True,
         seqlens: str = "--seqlens"):
    from ..ui import progress
    from .api import plan_sp

    def note_short_file():  # after plan_sp's checks: an error stays the only line
        if 0 < len(lens) < global_batch:  # draw_batches wraps around the file: sequences repeat inside a batch
            sys.stderr.write(f"note: the length file has {len(lens)} sequences, fewer than --global-batch "
                             f"{global_batch}: each global batch repeats sequences\n")
        # only the drawn sequences must fit (a plan trains its batches); longer ones left in the file are named
        too_long = lens > cm.token_capacity(cm.world)
        if too_long.any():
            sys.stderr.write(f"note: {seqlens}: {int(too_long.sum())} sequence(s) of up to {int(lens.max())} tokens "
                             f"cannot fit even on all {cm.world} GPUs; none is in the {steps} planned global "
                             f"batch(es), more --steps may draw one (--max-context clips them)\n")

    with progress(f"planning {steps} global batches", total=steps, enabled=show_progress) as advance:
        plan, results = plan_sp(prof, mdl, lens, gpus=cm.world, global_batch=global_batch, steps=steps, seed=seed,
                                config=cfg, max_context=max_context, on_step=lambda r: advance(),
                                on_checked=note_short_file, where=seqlens)
    cut = [r.step for r in results if r.clock_bound]
    if cut:
        sys.stderr.write(f"note: --deterministic: a MILP of step(s) {', '.join(map(str, cut))} hit the "
                         f"--time-limit cap ({cfg.time_limit:g} s) before its node limit; those steps may differ "
                         f"between runs (raise --time-limit)\n")
    return plan, results


def _step_rows(rows):
    return [(r["step"], r["sequences"], r["tokens"], r["micro_batches"], f"{r['flexsp_ms']:.0f}",
             f"{r['static_ms']:.0f}", f"{r['best_homogeneous_ms']:.0f}", f"{r['speedup_vs_static']:.2f}x",
             f"{r['speedup_vs_best_homogeneous']:.3f}x", f"{r['lower_bound_ms']:.0f}", f"{r['solve_seconds']:.2f}",
             r["milp_status"], "-" if r["mip_gap"] is None else f"{r['mip_gap']:.1%}"
             + (" (cold start)" if r.get("milp_cold") else "")) for r in rows]


_STEP_COLS = ["step", "seqs", "tokens", "M", "FlexSP ms", "static ms", "1-degree ms", "vs static", "vs 1-degree",
              "bound ms", "solve s", "MILP (bucketed)", "MILP gap"]


_DET_HELP = ("Bound the searches by work, not the clock (at most 100 group structures per micro-batch, 50 "
             "branch-and-bound nodes per MILP): the same inputs give the same plan on any machine load; "
             "--time-limit is then a cap per MILP (a note names steps it cut).")


def register(groups) -> None:
    @groups.plan.command("sp")
    def plan_sp_cmd(
        profile: str = typer.Option("a100-64-flexsp-paper", "--profile", help=_PROFILE_HELP),
        model: str = typer.Option("gpt-7b", "--model", help=_MODEL_HELP),
        seqlens: str = typer.Option(..., "--seqlens", help=_SEQLENS_HELP),
        gpus: Optional[int] = typer.Option(None, "--gpus",
                                           help="GPUs to plan for (power of two; default: the profile's)."),
        global_batch: int = typer.Option(512, "--global-batch",
                                         help="Sequences per global batch (training step); at most 1,000,000, and "
                                              "refused when planning it needs more than half this host's memory."),
        max_context: Optional[int] = typer.Option(None, "--max-context",
                                                  help="Longer sequences are clipped (truncated) to this many "
                                                       "tokens (1..2**40); default: no clipping."),
        steps: int = typer.Option(1, "--steps", help="Global batches to plan (drawn from a seeded permutation); at "
                                  "most 100,000, and at most 10,000,000 sequences in all."),
        seed: int = typer.Option(0, "--seed", help="Seed for drawing batches and for the solver."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Search seconds per global batch "
                                                   "(default 1; finite, <= 3600): the group-structure search (3/4) "
                                                   "then the MILPs (the rest); with --deterministic a cap per MILP "
                                                   "only (not with --no-milp)."),
        buckets: Optional[int] = typer.Option(None, "--buckets", help=_BUCKETS_HELP),
        no_milp: bool = typer.Option(False, "--no-milp",
                                     help="Heuristics only (single degrees, greedy, local search)."),
        deterministic: bool = typer.Option(False, "--deterministic", help=_DET_HELP),
        out: Path = typer.Option(..., "--out", help="Plan JSON to write (atomic; nothing on error)."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the first step's groups per rank (PNG)."),
        as_json: bool = typer.Option(False, "--json", help="Print the per-step figures as JSON."),
    ) -> None:
        """Plan FlexSP sequence parallelism: per global batch and micro-batch, concurrent Ulysses groups of
        power-of-two degrees (buddy-placed) and the sequences each runs; compared with static SP = N, the best
        single degree per micro-batch and a greedy heuristic on the same cost model."""
        from adasched.profiler.io import check_distinct_outputs, check_output_path, outputs_together

        from ..plan import save_plan
        from ..ui import emit_json, print_table
        from .api import summarize

        time_limit = check_options(global_batch, steps, time_limit, max_context, deterministic=deterministic,
                                   no_milp=no_milp)
        check_output_path(out, "--out")
        check_output_path(plot, "--plot")
        check_distinct_outputs(("--out", out), ("--plot", plot),
                               inputs=(("--profile", profile), ("--model", model), ("--seqlens", seqlens)))
        prof, mdl, cm, lens, cfg = _setup(profile, model, seqlens, gpus, max_context, time_limit, seed, buckets,
                                          no_milp, deterministic)
        plan, results = _run(prof, mdl, cm, lens, cfg, global_batch, steps, seed, max_context, seqlens=seqlens,
                             show_progress=not as_json)
        with outputs_together():  # both or neither (a Ctrl-C while the plot was drawn left the plan written)
            save_plan(plan, out)
            if plot:
                plan.plot(plot)
        rep = summarize(results, cm)
        if as_json:
            emit_json({"out": str(out), **rep})
            return
        print_table(_step_rows(rep["rows"]), _STEP_COLS,
                    title=f"FlexSP plan: {mdl.name} on {cm.world} GPUs ({prof.name})")
        typer.echo(f"wrote {out}" + (f" and {plot}" if plot else ""))

    @groups.bench.command("sp")
    def bench_sp_cmd(
        profile: str = typer.Option("a100-64-flexsp-paper", "--profile", help=_PROFILE_HELP),
        model: str = typer.Option("gpt-7b", "--model", help=_MODEL_HELP),
        seqlens: str = typer.Option("builtin", "--seqlens", help=_SEQLENS_HELP),
        gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs (power of two; default: the profile's)."),
        global_batch: int = typer.Option(512, "--global-batch", help="Sequences per global batch (training "
                                         "step); at most 1,000,000."),
        max_context: Optional[int] = typer.Option(384 * 1024, "--max-context",
                                                  help="Clip longer sequences to this many tokens."),
        steps: int = typer.Option(10, "--steps", help="Global batches to plan and compare (drawn from a seeded "
                                  "permutation); at most 100,000."),
        seed: int = typer.Option(0, "--seed", help="Seed for drawing batches and for the solver (>= 0)."),
        time_limit: Optional[float] = typer.Option(None, "--time-limit", help="Search seconds per global batch "
                                                   "(default 1; finite, <= 3600): the group-structure search (3/4) "
                                                   "then the MILPs (the rest); with --deterministic a cap per MILP "
                                                   "only (not with --no-milp)."),
        buckets: Optional[int] = typer.Option(None, "--buckets", help=_BUCKETS_HELP),
        no_milp: bool = typer.Option(False, "--no-milp", help="Heuristics only (single degrees, greedy, local "
                                     "search): no MILP."),
        deterministic: bool = typer.Option(False, "--deterministic", help=_DET_HELP),
        scaling: bool = typer.Option(False, "--scaling", help="Also a table over sequences per batch (128..4096) "
                                     "and GPUs (8..256, profile.with_nodes) with solve times."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable per-step rows and summary."),
    ) -> None:
        """Benchmark the FlexSP planner against its baselines on the same batches and cost model."""
        from ..ui import emit_json, print_table
        from .api import summarize

        time_limit = check_options(global_batch, steps, time_limit, max_context, deterministic=deterministic,
                                   no_milp=no_milp)
        prof, mdl, cm, lens, cfg = _setup(profile, model, seqlens, gpus, max_context, time_limit, seed, buckets,
                                          no_milp, deterministic)
        plan, results = _run(prof, mdl, cm, lens, cfg, global_batch, steps, seed, max_context, seqlens=seqlens,
                             show_progress=not as_json)
        rep = summarize(results, cm)
        rep["config"] = dict(profile=prof.name, model=mdl.name, gpus=cm.world, global_batch=global_batch,
                             max_context=max_context, steps=steps, seed=seed,
                             time_limit=None if deterministic and no_milp else time_limit,  # (it has no effect)
                             buckets=None if no_milp else cfg.buckets, milp=not no_milp, seqlens=seqlens,
                             deterministic=deterministic)
        if scaling:
            rep["scaling"] = _scaling(prof, mdl, lens, cfg, seed, show_progress=not as_json)
        if as_json:
            emit_json(rep)
            return
        print_table(_step_rows(rep["rows"]), _STEP_COLS, title=f"bench sp: {mdl.name} on {cm.world} GPUs ({prof.name})")
        print_table(list(rep["summary"].items()), ["figure", "value"], title="summary")
        if scaling:
            print_table([tuple(r.values()) for r in rep["scaling"]], list(rep["scaling"][0].keys()),
                        title="scaling (one global batch each)")


    @groups.bench.command("sp-oracle")
    def bench_sp_oracle_cmd(
        steps: int = typer.Option(40, "--steps", help="Random steps to plan and enumerate (1..1000)."),
        seqs: int = typer.Option(6, "--seqs", help="Sequences per step (2..8: the enumeration is exponential; "
                                 "8 takes ~5 s a step)."),
        memory: float = typer.Option(1.0, "--memory", help="GPU memory for activations as a multiple of the tiny "
                                     "cost model's 1,500 tokens (0.5..16); lengths are drawn up to 0.95 of it."),
        seed: int = typer.Option(0, "--seed", help="Seed for the lengths (>= 0)."),
        as_json: bool = typer.Option(False, "--json", help="Machine-readable per-step rows and summary."),
    ) -> None:
        """The FlexSP planner (heuristics, deterministic) with and without the exchange between micro-batches,
        against the brute-force optimum of tiny random steps on 4 GPUs (every split, structure and assignment)."""
        import math

        from adasched.profiler.io import InputError

        from ..ui import emit_json, print_table, progress
        from .oracle import MAX_ORACLE_SEQS, oracle_bench

        if not 1 <= steps <= 1000:
            raise InputError("--steps", f"must be 1..1000 (got {steps})")
        if not 2 <= seqs <= MAX_ORACLE_SEQS:
            raise InputError("--seqs", f"must be 2..{MAX_ORACLE_SEQS}: the brute force enumerates every split "
                                       f"(got {seqs})")
        if not (math.isfinite(memory) and 0.5 <= memory <= 16):
            raise InputError("--memory", f"must be 0.5..16 (times 1,500 tokens; got {memory})")
        if seed < 0:
            raise InputError("--seed", f"must be >= 0 (got {seed})")
        with progress("bench sp-oracle", steps, enabled=not as_json) as advance:
            rep = oracle_bench(steps, seqs, 1500.0 * memory, seed, advance=advance)
        if as_json:
            emit_json(rep)
            return
        rows = [(r["step"], " ".join(map(str, r["lengths"])), f"{r['optimum_ms']:.4f}",
                 *(f"{r[v]['time_ms']:.4f} ({100 * r[v]['gap']:+.2f} %)" for v in ("without exchange", "with exchange")))
                for r in rep["rows"]]
        print_table(rows, ["step", "lengths", "optimum ms", "without exchange", "with exchange"],
                    title=f"bench sp-oracle: {steps} steps of {seqs} sequences, 4 GPUs, "
                          f"{1500.0 * memory:g} tokens a GPU, seed {seed}")
        print_table([(v, f"{s['above_optimum']} of {s['steps']}", f"{100 * s['max_gap']:.2f} %",
                      f"{100 * s['mean_gap']:.3f} %") for v, s in rep["summary"].items()],
                    ["planner", "steps above the optimum", "largest gap", "mean gap (all steps)"], title="summary")


def _scaling(prof, mdl, lens, cfg, seed, show_progress: bool = True) -> list[dict]:
    """Solve time and quality over sequences per batch x GPUs (one global batch per cell)."""
    import math

    import numpy as np

    from .batching import draw_batches
    from .costmodel import sp_cost_model
    from .planner import plan_step
    from ..ui import progress

    cells = [(b, g) for g in (8, 16, 32, 64, 128, 256) for b in (128, 512, 1024, 2048, 4096)]
    out = []
    with progress("scaling cells", total=len(cells), enabled=show_progress) as advance:
        for b, g in cells:
            batch = draw_batches(lens, b, 1, seed)[0]
            try:
                # inside the cell: a profile that cannot describe g GPUs (measured on one node, no inter-node
                # all_to_all fit) fails its cells, not the whole run (it was exit 2 and nothing printed)
                p = prof if g <= prof.world_size and g % prof.gpus_per_node == 0 else prof.with_nodes(
                    max(1, math.ceil(g / prof.gpus_per_node)))
                cm = sp_cost_model(p, mdl, g)
                # lengths clipped to what one sequence can use on all g GPUs (small clusters hold less)
                batch = np.minimum(batch, int(cm.token_capacity(g)))
                r = plan_step(batch, cm, cfg)
                row = dict(gpus=g, sequences=b, tokens=int(batch.sum()), micro_batches=r.chosen_m,
                           solve_seconds=round(r.solve_seconds, 3),
                           speedup_vs_static=round(r.baselines_ms["static"] / r.time_ms, 3),
                           speedup_vs_best_homogeneous=round(r.baselines_ms["best_homogeneous"] / r.time_ms, 3),
                           milp=r.milp_status, mip_gap=None if r.mip_gap is None else round(r.mip_gap, 4))
            except ValueError as err:
                row = dict(gpus=g, sequences=b, tokens=int(batch.sum()), micro_batches=None, solve_seconds=None,
                           speedup_vs_static=None, speedup_vs_best_homogeneous=None,
                           # (the reason, not where: a profile file's path filled the 60 characters)
                           milp=f"error: {getattr(err, 'what', err)}"[:60],
                           mip_gap=None)
            out.append(row)
            advance()
    return out
