"""`adasched bench moe`: the chosen schedule vs no pipelining and fixed r=2, simulated with the same model."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile

from ..plan import relative_gap
from ..solver import SolveParams
from .plan import layer_counts
from .planning import plan_moe, proved_iteration
from .presets import load_configs

__all__ = ["run_bench", "run_subprocess_bench"]


def _block_summary(rows: list[dict]) -> dict:
    """Means/minimums over a list of bench rows; the inter-node-bound subset separately (the issue's target)."""
    np_ = [r["speedup_vs_no_pipeline"] for r in rows]
    r2 = [r["speedup_vs_fixed_r2"] for r in rows]
    bound = [r for r in rows if r["inter_node_bound"]]
    fracs = [(r["speedup_vs_no_pipeline"] - 1) / (r["ideal_speedup_bound"] - 1) if r["ideal_speedup_bound"] > 1 + 1e-9
             else 1.0 for r in rows]

    def mean(key, rs):
        return statistics.fmean(r[key] for r in rs) if rs else None

    def low(key, rs):
        return min(r[key] for r in rs) if rs else None

    return {
        "configs": len(rows),
        "speedup_vs_no_pipeline_mean": statistics.fmean(np_),
        "speedup_vs_fixed_r2_mean": statistics.fmean(r2),
        "speedup_vs_no_pipeline_min": min(np_),
        "speedup_vs_fixed_r2_min": min(r2),
        "a2a_bound_configs": sum(int(r["a2a_bound"]) for r in rows),
        "inter_node_bound_configs": len(bound),
        "inter_node_bound_speedup_vs_no_pipeline_mean": mean("speedup_vs_no_pipeline", bound),
        "inter_node_bound_speedup_vs_fixed_r2_mean": mean("speedup_vs_fixed_r2", bound),
        "inter_node_bound_speedup_vs_no_pipeline_min": low("speedup_vs_no_pipeline", bound),
        "inter_node_bound_speedup_vs_fixed_r2_min": low("speedup_vs_fixed_r2", bound),
        "inter_node_bound_wgrad_fused_vs_no_pipeline_mean": mean("wgrad_fused_speedup_vs_no_pipeline", bound),
        "inter_node_bound_ideal_overlap_bound_mean": mean("ideal_speedup_bound", bound),
        "ideal_overlap_bound_mean": mean("ideal_speedup_bound", rows),
        "fraction_of_ideal_mean": statistics.fmean(fracs),
        "slower_than_a_baseline": sum(int(r["speedup_vs_no_pipeline"] < 1 - 1e-9 or r["speedup_vs_fixed_r2"] < 1 - 1e-9)
                                      for r in rows),
        "iteration_speedup_vs_no_pipeline_mean": statistics.fmean(r["iteration_speedup_vs_no_pipeline"] for r in rows),
        "iteration_speedup_vs_fixed_r2_mean": statistics.fmean(r["iteration_speedup_vs_fixed_r2"] for r in rows),
        "iteration_speedup_vs_fastest_bwd_mean": statistics.fmean(r["iteration_speedup_vs_fastest_bwd"] for r in rows),
        "iteration_shorter_than_fastest_bwd": sum(int(r["iteration_speedup_vs_fastest_bwd"] > 1 + 1e-9) for r in rows),
        "iteration_slower_than_a_baseline": sum(int(r["iteration_speedup_vs_no_pipeline"] < 1 - 1e-9
                                                    or r["iteration_speedup_vs_fixed_r2"] < 1 - 1e-9) for r in rows),
        "iteration_gap_to_bound_mean": statistics.fmean(r["iteration_gap_to_bound"] for r in rows),
        "iteration_gap_to_bound_max": max(r["iteration_gap_to_bound"] for r in rows),
    }


def run_bench(profile: ClusterProfile, gpus: int, presets: list[str], params: SolveParams) -> dict:
    """Rows per stage-constant source. ``summary``: the issue's target setting - FSMoE's published stage
    constants (the H100 profile supplies the dense blocks of the iteration column); ``summary_by_source``: each
    source; ``summary_all_sources``: both pooled. With the profile's stage constants (FlexSP's A100 inter-node
    all-to-all as a stand-in) the inter-node-bound layers are capped by their ideal-overlap bound (1.01-1.04x).

    Layer columns (r_bwd, wgrad_bwd, bwd_ms, fwd_bwd_ms and the layer speedups): layer 0 with its fastest
    backward, the per-layer schedule against the baselines' ones; the plan chooses the backward schedules with the
    gradient slices on the iteration and may run slower ones (``plan_r_bwd_layers``: layers per r_bwd in the plan;
    ``iteration_speedup_vs_fastest_bwd``: the plan's iteration against every layer at its fastest backward;
    ``iteration_gap_to_bound``: (iteration - its lower bound over every choice of candidates) / iteration, 0 where
    the choice is proved).

    ``wgrad_fused_speedup_vs_no_pipeline``: the same plan with the backward weight gradients fused (autograd's
    order) - the choice of r (and the shared experts' overlap with the dispatch) without deferring the weight
    gradients, i.e. how much of the gain the deferral adds."""
    sources = {}
    all_rows: list[dict] = []
    for src in ("published", "profile"):
        rows = []
        for preset in presets:
            cfgs = load_configs(preset, gpus)
            plan = plan_moe(cfgs, gpus, profile, stages=src, params=params)  # type: ignore[arg-type]
            for c in plan.configs:
                l0 = c.layers[0]
                # the layer columns: layer 0 with its fastest backward (the per-layer schedule against the
                # baselines' layer schedules); the plan may run a slower backward in some layers where the gradient
                # all-reduces then hide more and the iteration is shorter: the iteration columns are the plan's
                lb = _fastest_bwd(c)
                assert l0.bwd_fastest_ms is None or abs(lb.time_ms - l0.bwd_fastest_ms) <= 1e-9 * lb.time_ms
                fwd_bwd = l0.fwd_ms + lb.time_ms
                no_pipe = c.baselines_fwd_bwd_ms["no-pipeline"]
                # bottleneck = the resource with the most un-chunked work (fwd + bwd); "a2a-bound" when it is the
                # all-to-all's stream, "inter-node bound" when that exchange also crosses nodes (on one node it is
                # an NVLink exchange, whatever constants price it). ideal = serial time / busiest resource: no
                # schedule can beat it.
                busy, topo = _resource_busy(c, gpus, profile, src)
                bottleneck = max(busy, key=busy.get)
                ideal = no_pipe / max(max(busy.values()), 1e-12)
                fused_bwd = l0.bwd_fused_wgrad_ms if l0.bwd_fused_wgrad_ms is not None else lb.time_ms
                fastest_it = c.iteration_fastest_bwd_ms if c.iteration_fastest_bwd_ms is not None else c.iteration_ms
                plan_r = {str(r): n for r, n in layer_counts([lp.r_bwd for lp in c.layers]).items()}
                rows.append(dict(
                    config=c.name, preset=preset, ep_size=c.ep_size, a2a_bound=bottleneck == "inter",
                    inter_node_bound=bottleneck == "inter" and not topo.a2a_in_one_node,
                    bottleneck=bottleneck, a2a_ms=c.a2a_ms, ideal_speedup_bound=ideal,
                    r_fwd=l0.r_fwd, r_bwd=lb.r, wgrad_bwd=lb.wgrad, fwd_ms=l0.fwd_ms, bwd_ms=lb.time_ms,
                    fwd_bwd_ms=fwd_bwd, no_pipeline_ms=no_pipe, fixed_r2_ms=c.baselines_fwd_bwd_ms["fixed-r2"],
                    speedup_vs_no_pipeline=no_pipe / fwd_bwd,
                    speedup_vs_fixed_r2=c.baselines_fwd_bwd_ms["fixed-r2"] / fwd_bwd,
                    wgrad_fused_speedup_vs_no_pipeline=no_pipe / (l0.fwd_ms + fused_bwd),
                    iteration_ms=c.iteration_ms,
                    iteration_speedup_vs_no_pipeline=c.iteration_baselines_ms["no-pipeline"] / c.iteration_ms,
                    iteration_speedup_vs_fixed_r2=c.iteration_baselines_ms["fixed-r2"] / c.iteration_ms,
                    iteration_fastest_bwd_ms=fastest_it, iteration_speedup_vs_fastest_bwd=fastest_it / c.iteration_ms,
                    plan_r_bwd_layers=plan_r, bwd_choice=c.bwd_choice,
                    # how far the iteration can be from the best choice of backward candidates (0 where proved)
                    iteration_lower_bound_ms=c.iteration_lower_bound_ms,
                    iteration_gap_to_bound=0.0 if proved_iteration(c) else relative_gap(c.iteration_ms,
                                                                                        c.iteration_lower_bound_ms),
                    grad_exposed_ms=c.grad_exposed_ms, grad_exposed_at_end_ms=c.grad_exposed_at_end_ms,
                ))
        sources[src] = {"rows": rows}
        all_rows += rows
    meta = {"gpus": gpus, "profile": profile.name, "nodes": max(1, gpus // profile.gpus_per_node)}
    by_source = {src: _block_summary(block["rows"]) for src, block in sources.items()}
    summary = by_source["published"] | meta | {"stage_constants": "published (FSMoE fitted alpha/beta)"}
    return {"summary": summary, "summary_by_source": by_source,
            "summary_all_sources": _block_summary(all_rows) | meta, "sources": sources}


def _fastest_bwd(c):
    """Layer 0's fastest backward schedule (what ``bwd_fastest_ms`` records): its own where the plan runs it, else
    re-chosen from its recorded stage costs."""
    from types import SimpleNamespace

    from .model import WGRAD_MODES, choose_r

    l0 = c.layers[0]
    if l0.bwd_fastest_ms is None or l0.bwd_ms <= l0.bwd_fastest_ms:
        return SimpleNamespace(r=l0.r_bwd, wgrad=l0.wgrad_bwd, time_ms=l0.bwd_ms)

    from .planning import issue_orders

    return choose_r(c.layer0_stage_costs.costs().backward(), wgrad_modes=WGRAD_MODES,
                    issue_orders=issue_orders(c.hierarchical or c.two_step_a2a))[0]


def _resource_busy(c, gpus: int, profile: ClusterProfile, src: str):
    """Total busy time (fwd + bwd, ms) of each resource for one layer at r = 1 (chunking only adds alphas), and the
    layout's Topology."""
    from .costmodel import MoEConfig, stage_costs, topology

    cfg = MoEConfig.model_validate(c.config)
    topo = topology(cfg, gpus, profile.gpus_per_node)
    fwd = stage_costs(cfg, topo, source=src, profile=profile)  # type: ignore[arg-type]
    f, b = fwd.resource_busy_ms(1), fwd.backward().resource_busy_ms(1)
    return {k: f[k] + b[k] for k in f}, topo


SUBPROCESS_TIMEOUT_S = 1800.0


def run_subprocess_bench(what: str, quick: bool) -> dict:
    """Runs a runtime-side benchmark in a separate process (the planner never imports the runtime)."""
    module = {"measure": "adasched.launch.moe_measure", "schedules": "adasched.launch.train_moe"}[what]
    args = [sys.executable, "-m", module, "--json"]
    if what == "schedules":
        args.append("--compare-schedules")
    if quick:
        args.append("--quick")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    from adasched.launch.proc import run_tree  # (stdlib only: stops the ranks the child started, too)

    try:
        proc = run_tree(args, capture_output=True, env=env, timeout_s=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # (not a ValueError: a traceback, and subprocess.run left the ranks running)
        raise InputError(f"--{what}", f"{module} did not finish within {SUBPROCESS_TIMEOUT_S:g} s (stopped)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"--{what}", f"{module} failed (exit {proc.returncode}): {tail[0]}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise InputError(f"--{what}", f"{module} printed no JSON result") from None
