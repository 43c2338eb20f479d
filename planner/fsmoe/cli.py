"""`adasched plan moe` and `adasched bench moe`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["register"]

STAGES_HELP = "Stage constants: 'profile' (alpha-beta fits of --profile) or 'published' (FSMoE's fitted constants)."


def _configs_with_stats(config: str, gpus: int, router_stats: Optional[Path]):
    from pydantic import ValidationError

    from adasched.profiler.io import InputError, describe_validation_error, read_json

    from .presets import load_configs

    cfgs = load_configs(config, gpus)
    if router_stats is not None:
        data = read_json(router_stats)
        ks = data.get("mean_k_per_layer") if isinstance(data, dict) else None
        if not isinstance(ks, list) or not ks or not all(isinstance(k, (int, float)) and not isinstance(k, bool)
                                                         for k in ks):
            raise InputError(router_stats, "mean_k_per_layer: expected a non-empty list of numbers")
        from ..plan import MAX_LAYERS
        from .costmodel import MoEConfig

        if len(ks) > MAX_LAYERS:  # a config's num_layers bound (100,000 entries planned for minutes)
            raise InputError(router_stats, f"mean_k_per_layer: {len(ks):,} layers, at most {MAX_LAYERS}")
        try:
            stats = [MoEConfig.model_validate(c.model_copy(update={"mean_k_per_layer": [float(k) for k in ks],
                                                                   "num_layers": len(ks)}).model_dump())
                     for c in cfgs]
        except ValidationError as err:
            raise InputError(router_stats, describe_validation_error(err)) from None
        for c in cfgs:  # notes only once the statistics are valid (an error is the one line it prints)
            if c.num_layers != len(ks):
                sys.stderr.write(f"note: {router_stats} has statistics for {len(ks)} MoE layers: planning {len(ks)} "
                                 f"layers of {c.name} (its config has {c.num_layers})\n")
        cfgs = stats
    return cfgs


def register(groups) -> None:
    @groups.plan.command("moe")
    def plan_moe_cmd(
        config: str = typer.Option(..., "--config", help="mixtral-8x7b | gshard-grid | fine-grained | FILE (JSON/YAML)"),
        gpus: int = typer.Option(..., "--gpus", help="GPUs (power of two, at most what the profile describes): the "
                                                     "data-parallel world; dense gradients are all-reduced over all"),
        ep_size: Optional[int] = typer.Option(None, "--ep-size", help="Flat expert-parallel groups of this many "
                                              "contiguous GPUs inside --gpus (each expert on gpus/ep-size GPUs, their "
                                              "gradients all-reduced over those copies), as train_moe --ep-size; "
                                              "default: EP over every GPU (or over the nodes when experts < GPUs)."),
        two_step: bool = typer.Option(False, "--two-step-a2a", help="Whole experts per GPU (as --ep-size), each "
                                      "exchange an intra-node then an inter-node all-to-all: train_moe "
                                      "--hierarchical's layout (default EP size: every GPU)."),
        gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", help="With --two-step-a2a: the node "
                                                    "size the exchange splits an EP group by (train_moe "
                                                    "--gpus-per-node; default: the profile's); the gradient "
                                                    "all-reduces keep the profile's node size."),
        out: Path = typer.Option(..., "--out", help="Plan JSON to write (atomically)."),
        profile: str = typer.Option("h100-sxm", "--profile", help="Built-in profile name or ClusterProfile JSON."),
        stages: str = typer.Option("profile", "--stages", help=STAGES_HELP),
        router_stats: Optional[Path] = typer.Option(None, "--router-stats",
                                                    help="JSON {mean_k_per_layer: [...]} from the router's statistics "
                                                         "(train_moe --router-stats-out): assignments per token "
                                                         "after capacity drops per layer, planned as they are "
                                                         "(the capacity factor is not applied to them again)."),
        time_limit: float = typer.Option(2.0, "--time-limit", help="Seconds per gradient-slice MILP (a fallback: the greedy fill is normally proved optimal without one)."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan's per-config rows and solver record as "
                                     "JSON on stdout instead of the table (the plan file is written either way)."),
    ) -> None:
        """FSMoE: choose the chunk count r (forward and backward) per MoE layer and the gradient all-reduce slices."""
        from adasched.profiler.io import InputError, check_distinct_outputs, check_output_path, check_seconds
        from adasched.profiler.profile import load_profile

        from ..plan import save_plan

        from ..solver import SolveParams
        from ..ui import emit_json, print_table
        from .planning import plan_moe

        check_output_path(out, "--out")  # before the planning
        check_distinct_outputs(("--out", out), inputs=(("--config", config), ("--profile", profile),
                                                       ("--router-stats", router_stats)))
        if stages not in ("profile", "published"):
            raise InputError("--stages", f"must be 'profile' or 'published', got {stages!r}")
        check_seconds("--time-limit", time_limit)
        if ep_size is not None and (ep_size < 1 or gpus < 1 or gpus % ep_size):
            raise InputError("--ep-size", f"{ep_size} does not divide --gpus {gpus}")
        if gpus_per_node is not None and not two_step:
            raise InputError("--gpus-per-node", "only with --two-step-a2a (the other layouts take the profile's)")
        if gpus_per_node is not None and gpus_per_node < 1:
            raise InputError("--gpus-per-node", f"{gpus_per_node} must be >= 1")
        prof = load_profile(profile)
        cfgs = _configs_with_stats(config, gpus, router_stats)
        from ..ui import progress

        with progress("planning MoE layers", None, enabled=not as_json) as advance:  # (--json: as plan sp's)
            plan = plan_moe(cfgs, gpus, prof, stages=stages,  # type: ignore[arg-type]
                            params=SolveParams(time_limit=time_limit), ep_size=ep_size, two_step=two_step,
                            gpus_per_node=gpus_per_node, progress=advance)
        save_plan(plan, out)
        if as_json:
            emit_json({"out": str(out), "configs": [_row_dict(c) for c in plan.configs], "solver": plan.solver.model_dump()})
        else:
            print_table([_row(c) for c in plan.configs], _COLS, title=f"MoE plan ({stages} stages, {gpus} GPUs"
                        f"{f', EP groups of {ep_size}' if ep_size is not None else ''}"
                        f"{', two-step all-to-all' if two_step else ''}) -> {out}")

    @groups.bench.command("moe")
    def bench_moe_cmd(
        gpus: int = typer.Option(64, "--gpus", help="GPUs (8 nodes x 8 by default)."),
        profile: str = typer.Option("h100-sxm", "--profile", help="Built-in profile name or ClusterProfile JSON: "
                                    "the fits behind the 'profile' stage constants."),
        as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON on stdout instead of "
                                     "the tables."),
        measure: bool = typer.Option(False, "--measure", help="Also run the EP layer over gloo on this CPU for small "
                                                               "configs and report predicted vs measured."),
        schedules: bool = typer.Option(False, "--schedules", help="Compare the six capacity schedules at equal budget "
                                                                   "on a small synthetic LM task (CPU training)."),
        quick: bool = typer.Option(False, "--quick", help="Fewer steps for --measure/--schedules (only with one "
                                   "of them)."),
    ) -> None:
        """Simulated FSMoE schedule vs no pipelining and a fixed r=2 (Tutel-like) on the three preset families,
        with the published FSMoE constants and with the profile's fits."""
        from adasched.profiler.io import InputError

        if quick and not (measure or schedules):
            raise InputError("--quick", "has no effect without --measure or --schedules (the simulated comparison "
                             "has no quick mode)")
        from adasched.profiler.profile import load_profile

        from ..solver import SolveParams
        from ..ui import emit_json, print_table
        from .bench import run_bench, run_subprocess_bench
        from .presets import PRESETS

        prof = load_profile(profile)
        result = run_bench(prof, gpus, list(PRESETS), SolveParams(time_limit=2.0))
        if measure:
            result["measure"] = run_subprocess_bench("measure", quick)
        if schedules:
            result["schedules"] = run_subprocess_bench("schedules", quick)
        if as_json:
            emit_json(result)
            return
        for src, block in result["sources"].items():
            print_table([(r["config"], "yes" if r["a2a_bound"] else "no", r["r_fwd"], r["r_bwd"], r["wgrad_bwd"],
                          r["fwd_bwd_ms"], r["speedup_vs_no_pipeline"], r["wgrad_fused_speedup_vs_no_pipeline"],
                          r["speedup_vs_fixed_r2"], r["ideal_speedup_bound"], r["iteration_speedup_vs_no_pipeline"])
                         for r in block["rows"]],
                        ["config", "a2a-bound", "r_fwd", "r_bwd", "wgrad", "layer fwd+bwd ms", "vs no-pipe",
                         "(dW fused)", "vs r=2", "ideal bound", "iteration vs no-pipe"], title=f"stages: {src}")
        keys = list(result["summary_by_source"]["published"])
        print_table([(k, *(result["summary_by_source"][src][k] for src in result["sources"]),
                      result["summary_all_sources"][k]) for k in keys], ["summary", *result["sources"], "both"],
                    title="summary (the JSON's headline `summary` is the published column: the target's setting)")
        for key in ("measure", "schedules"):
            if key in result:
                block = result[key]
                print_table([tuple(r.values()) for r in block["rows"]], list(block["rows"][0].keys()) if block["rows"] else ["-"],
                            title=key)


# layer 0's schedule (its backward chosen with the slices: it may be slower than a baseline's layer where the
# iteration is shorter), then the iteration against the baselines' and against every layer's fastest backward
# (the experts' copies all-reduce their gradients too: that exposure, when EP is smaller than the world, was in the
# plan file only - 46,513 of 48,879 ms of an EP-8 iteration on 64 GPUs beside a column of 2,106)
_COLS = ["config", "EP", "r_fwd", "r_bwd", "wgrad", "fwd ms", "bwd ms", "no-pipe x", "r=2 x", "AR exposed ms",
         "expert AR exposed ms", "slices", "iteration ms", "iter r=2 x", "iter fastest-bwd x"]


def _ratio(base: float, plan: float) -> float:
    return base / plan if plan > 0 else float("nan")


def _row(c):
    l0 = c.layers[0]
    return (c.name, c.ep_size, l0.r_fwd, l0.r_bwd, l0.wgrad_bwd, l0.fwd_ms, l0.bwd_ms,
            _ratio(c.baselines_fwd_bwd_ms["no-pipeline"], c.fwd_bwd_ms), _ratio(c.baselines_fwd_bwd_ms["fixed-r2"], c.fwd_bwd_ms),
            c.grad_exposed_ms,
            c.expert_grad_allreduce_ms if c.expert_grad_exposed_ms is None else c.expert_grad_exposed_ms,
            c.slice_solver_status, c.iteration_ms,
            _ratio(c.iteration_baselines_ms["fixed-r2"], c.iteration_ms),
            _ratio(c.iteration_fastest_bwd_ms if c.iteration_fastest_bwd_ms is not None else c.iteration_ms,
                   c.iteration_ms))


def _row_dict(c):
    return dict(zip(_COLS, _row(c)))
