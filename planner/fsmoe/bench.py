"""`adasched bench moe`: the chosen schedule vs no pipelining and fixed r=2, simulated with the same model."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from adasched.profiler.io import InputError
from adasched.profiler.profile import ClusterProfile

from ..solver import SolveParams
from .planning import plan_moe
from .presets import load_configs

__all__ = ["run_bench", "run_subprocess_bench"]


def run_bench(profile: ClusterProfile, gpus: int, presets: list[str], params: SolveParams) -> dict:
    sources = {}
    all_np, all_r2, violations = [], [], 0
    bound_np, bound_r2 = [], []
    ideals, fracs = [], []
    for src in ("published", "profile"):
        rows = []
        for preset in presets:
            cfgs = load_configs(preset, gpus)
            plan = plan_moe(cfgs, gpus, profile, stages=src, params=params)  # type: ignore[arg-type]
            for c in plan.configs:
                l0 = c.layers[0]
                sp_np = c.baselines_fwd_bwd_ms["no-pipeline"] / c.fwd_bwd_ms
                sp_r2 = c.baselines_fwd_bwd_ms["fixed-r2"] / c.fwd_bwd_ms
                # bottleneck = the resource with the most un-chunked work (forward); "inter-node bound" when it is
                # the inter-node link. ideal = serial time / busiest resource: no schedule can beat it.
                busy = _resource_busy(c, gpus, profile, src)
                bottleneck = max(busy, key=busy.get)
                bound = bottleneck == "inter"
                ideal = c.baselines_fwd_bwd_ms["no-pipeline"] / max(sum(busy.values()) and max(busy.values()), 1e-12)
                rows.append(dict(
                    config=c.name, preset=preset, ep_size=c.ep_size, inter_node_bound=bound, bottleneck=bottleneck,
                    a2a_ms=c.a2a_ms, ideal_speedup_bound=ideal,
                    r_fwd=l0.r_fwd, r_bwd=l0.r_bwd, fwd_ms=l0.fwd_ms, bwd_ms=l0.bwd_ms, fwd_bwd_ms=c.fwd_bwd_ms,
                    no_pipeline_ms=c.baselines_fwd_bwd_ms["no-pipeline"], fixed_r2_ms=c.baselines_fwd_bwd_ms["fixed-r2"],
                    speedup_vs_no_pipeline=sp_np, speedup_vs_fixed_r2=sp_r2,
                    iteration_ms=c.iteration_ms,
                    iteration_speedup_vs_no_pipeline=c.iteration_baselines_ms["no-pipeline"] / c.iteration_ms,
                    grad_exposed_ms=c.grad_exposed_ms, grad_exposed_at_end_ms=c.grad_exposed_at_end_ms,
                ))
                all_np.append(sp_np)
                ideals.append(ideal)
                fracs.append((sp_np - 1) / (ideal - 1) if ideal > 1 + 1e-9 else 1.0)
                all_r2.append(sp_r2)
                violations += int(sp_np < 1 - 1e-9 or sp_r2 < 1 - 1e-9)
                if bound:
                    bound_np.append(sp_np)
                    bound_r2.append(sp_r2)
        sources[src] = {"rows": rows}
    summary = {
        "configs": len(all_np),
        "speedup_vs_no_pipeline_mean": statistics.fmean(all_np),
        "speedup_vs_fixed_r2_mean": statistics.fmean(all_r2),
        "speedup_vs_no_pipeline_min": min(all_np),
        "speedup_vs_fixed_r2_min": min(all_r2),
        "inter_node_bound_configs": len(bound_np),
        "inter_node_bound_speedup_vs_no_pipeline_mean": statistics.fmean(bound_np) if bound_np else None,
        "inter_node_bound_speedup_vs_fixed_r2_mean": statistics.fmean(bound_r2) if bound_r2 else None,
        "ideal_overlap_bound_mean": statistics.fmean(ideals),
        "fraction_of_ideal_mean": statistics.fmean(fracs),
        "slower_than_a_baseline": violations,
        "gpus": gpus,
        "profile": profile.name,
    }
    return {"summary": summary, "sources": sources}


def _resource_busy(c, gpus: int, profile: ClusterProfile, src: str) -> dict[str, float]:
    """Total busy time (fwd + bwd, ms) of each resource for one layer at r = 1 (chunking only adds alphas)."""
    from .costmodel import MoEConfig, stage_costs, topology

    cfg = MoEConfig.model_validate(c.config)
    fwd = stage_costs(cfg, topology(cfg, gpus, profile.gpus_per_node), source=src, profile=profile)  # type: ignore[arg-type]
    out = {"inter": 0.0, "intra": 0.0, "compute": 0.0}
    for sc in (fwd, fwd.backward()):
        out["inter"] += 2 * sc.chunk_ms(0, 1) if sc.work[0] > 0 else 0.0
        out["intra"] += sc.chunk_ms(1, 1) + sc.chunk_ms(3, 1)
        out["compute"] += sc.chunk_ms(2, 1)
    return out


def run_subprocess_bench(what: str, quick: bool) -> dict:
    """Runs a runtime-side benchmark in a separate process (the planner never imports the runtime)."""
    module = {"measure": "adasched.launch.moe_measure", "schedules": "adasched.launch.train_moe"}[what]
    args = [sys.executable, "-m", module, "--json"]
    if what == "schedules":
        args.append("--compare-schedules")
    if quick:
        args.append("--quick")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"--{what}", f"{module} failed (exit {proc.returncode}): {tail[0]}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise InputError(f"--{what}", f"{module} printed no JSON result") from None
