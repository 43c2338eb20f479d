"""GEMM benchmark and Twill's plan-vs-sweep check (``adasched bench kernels --only gemm``).

``cases``: per shape, torch.matmul (baseline) vs the Triton GEMM launched with the Twill plan-derived knobs.
``plan_vs_sweep``: for each (shape, tile) the plan's configuration (solve the GEMM main-loop graph of
``planner.twill.knobs.gemm_graph`` for the tile on this GPU's machine model, take its num_stages / num_warps /
warp_specialize / maxnreg; compile once) against a full sweep num_stages x num_warps (x warp_specialize where
the machine supports it; compile N times). Reports TFLOP/s of both, the ratio, and the time to configuration
(plan: solve + one compile + one timing; sweep: N compiles + N timings). ``checks`` turns it into pass/fail
(plan within 3 % of the best swept configuration) for the device check. Run directly:

    python -m adasched.launch.gemm_check [--quick] [--json FILE]
"""
from __future__ import annotations

import math
import time

from adasched.kernels.bench import BenchCase

__all__ = ["cases", "checks", "plan_vs_sweep", "plan_config", "sweep_configs", "machine_for_device",
           "GPU_SHAPES", "GPU_TILES", "SWEEP_STAGES", "SWEEP_WARPS", "TOLERANCE"]

GPU_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192), (4096, 14336, 4096))  # (M, N, K)
GPU_TILES = ((128, 128, 64), (128, 256, 64))
CPU_SHAPES = ((64, 48, 80),)
CPU_TILES = ((64, 32, 32),)
SWEEP_STAGES = (2, 3, 4, 5)
SWEEP_WARPS = (4, 8)
TOLERANCE = 0.03

#: Plan-derived knobs per (machine, tile), solved with this repository on the CPU (a test checks that they match
#: a fresh solve). Used only when the planner cannot be imported (the GPU image may lack ortools or pydantic);
#: the time to configuration then counts the recorded solve time (seconds, 2-core CPU, warm solver).
WARP_SPECIALIZE_SUPPORTED = {"h100": False, "b200": True}  # mirrors machines/*.json (checked by a test)
PRECOMPUTED = {
    ("h100", (128, 128, 64)): {"num_stages": 3, "num_warps": 4, "warp_specialize": False, "maxnreg": 240, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("h100", (128, 256, 64)): {"num_stages": 3, "num_warps": 8, "warp_specialize": False, "maxnreg": 240, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("b200", (128, 128, 64)): {"num_stages": 3, "num_warps": 4, "warp_specialize": True, "maxnreg": 240, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("b200", (128, 256, 64)): {"num_stages": 3, "num_warps": 8, "warp_specialize": True, "maxnreg": 240, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
}


def machine_for_device(device: str) -> str:
    """Twill machine model for the GPU (compute capability 9.x -> h100, 10.x -> b200; CPU: h100)."""
    if device != "cuda":
        return "h100"
    import torch

    major, _ = torch.cuda.get_device_capability()
    return "b200" if major >= 10 else "h100"


def _dtype(device: str):
    import torch

    return torch.float16 if device == "cuda" else torch.float32


def plan_config(tile: tuple[int, int, int], machine: str, dtype_bytes: int = 2, time_limit: float = 10.0,
                allow_precomputed: bool = True):
    """(GemmConfig, info) for a tile shape: solve the GEMM main-loop graph and map its knobs to the config.

    ``info``: {ii, status, solve_seconds, source: 'solved' | 'precomputed'}. Without an importable planner
    (and ``allow_precomputed``) the knobs come from :data:`PRECOMPUTED`."""
    from adasched.kernels.gemm import GemmConfig

    bm, bn, bk = tile
    try:
        from adasched.planner.solver import SolveParams
        from adasched.planner.twill.graph import load_machine
        from adasched.planner.twill.knobs import gemm_graph
        from adasched.planner.twill.plan import plan_twill
    except ImportError:
        if not allow_precomputed or (machine, tuple(tile)) not in PRECOMPUTED or dtype_bytes != 2:
            raise
        rec = PRECOMPUTED[(machine, tuple(tile))]
        cfg = GemmConfig.from_knobs(rec, block_m=bm, block_n=bn, block_k=bk)
        return cfg, {"ii": rec["ii"], "status": rec["status"], "solve_seconds": rec["solve_seconds"],
                     "source": "precomputed", "knobs": {k: rec[k] for k in ("num_stages", "num_warps",
                                                                              "warp_specialize", "maxnreg")}}
    m = load_machine(machine)
    plan = plan_twill(gemm_graph(m, bm, bn, bk, dtype_bytes), m, SolveParams(time_limit=time_limit),
                      simulate=False)
    knobs = plan.knobs.model_dump()
    cfg = GemmConfig.from_knobs(knobs, block_m=bm, block_n=bn, block_k=bk)
    return cfg, {"ii": plan.ii, "status": plan.solver.status, "solve_seconds": plan.solver.solve_seconds,
                 "source": "solved", "knobs": knobs}


def sweep_configs(tile: tuple[int, int, int], machine: str, stages=SWEEP_STAGES, warps=SWEEP_WARPS) -> list:
    """Every num_stages x num_warps (x warp_specialize on machines whose Triton supports it)."""
    from adasched.kernels.gemm import GemmConfig

    try:
        from adasched.planner.twill.graph import load_machine

        supported = load_machine(machine).warp_specialize
    except ImportError:  # GPU image without the planner's dependencies
        supported = WARP_SPECIALIZE_SUPPORTED[machine]
    bm, bn, bk = tile
    ws = (False, True) if supported else (False,)
    return [GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=s, num_warps=w, warp_specialize=x)
            for s in stages for w in warps for x in ws]


def _inputs(M: int, N: int, K: int, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(M + 3 * N + 7 * K)
    dt = _dtype(device)
    a = (torch.randn(M, K, generator=g) * K ** -0.5).to(device=device, dtype=dt)
    b = torch.randn(K, N, generator=g).to(device=device, dtype=dt)
    return a, b


def cases(quick: bool, device: str) -> list[BenchCase]:
    shapes = (CPU_SHAPES if device == "cpu" else GPU_SHAPES[:1] if quick else GPU_SHAPES)
    tiles = CPU_TILES if device == "cpu" else GPU_TILES
    machine = machine_for_device(device)
    out = []
    for (M, N, K) in shapes:
        for tile in tiles[:1] if quick else tiles:
            def build(M=M, N=N, K=K, tile=tile):
                import torch

                from adasched.kernels.gemm import gemm

                a, b = _inputs(M, N, K, device)
                cfg, _ = plan_config(tile, machine)
                return {"torch": lambda: torch.matmul(a, b), "twill-plan": lambda: gemm(a, b, cfg)}

            out.append(BenchCase(name="gemm", shape=f"M={M} N={N} K={K} tile={tile[0]}x{tile[1]}x{tile[2]}",
                                 providers=build, baseline="torch", note=f"machine model {machine}",
                                 params={"M": M, "N": N, "K": K, "tile": list(tile), "machine": machine}))
    return out


def _first_call_and_time(fn, device: str, quick: bool) -> tuple[float, float, float]:
    """(seconds of the first call: compile + run, median ms of later calls, seconds spent timing)."""
    from adasched.kernels.bench import time_fn

    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    med, _, _ = time_fn(fn, device, quick)
    return first, med, time.perf_counter() - t1


def plan_vs_sweep(device: str = "cuda", quick: bool = False, shapes=None, tiles=None, stages=SWEEP_STAGES,
                  warps=SWEEP_WARPS, log=None) -> list[dict]:
    """One row per (shape, tile): plan and best-sweep TFLOP/s, ratio, times to configuration (seconds)."""
    import torch

    from adasched.kernels.gemm import gemm, gemm_reference

    shapes = shapes or (CPU_SHAPES if device == "cpu" else GPU_SHAPES[:1] if quick else GPU_SHAPES)
    tiles = tiles or (CPU_TILES if device == "cpu" else GPU_TILES)
    machine = machine_for_device(device)
    rows = []
    for (M, N, K) in shapes:
        a, b = _inputs(M, N, K, device)
        ref = gemm_reference(a, b).float()
        flops = 2.0 * M * N * K
        for tile in tiles:
            t0 = time.perf_counter()
            cfg_plan, info = plan_config(tile, machine, dtype_bytes=a.element_size())
            solve_s = time.perf_counter() - t0 if info["source"] == "solved" else info["solve_seconds"]
            measured: dict[str, dict] = {}
            for cfg in [cfg_plan] + [c for c in sweep_configs(tile, machine, stages, warps) if c != cfg_plan]:
                if log:
                    log(f"[gemm] {M}x{N}x{K} {cfg.label()}")
                try:
                    first, ms, bench_s = _first_call_and_time(lambda cfg=cfg: gemm(a, b, cfg), device, quick)
                    err = (gemm(a, b, cfg).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                    measured[cfg.label()] = {"cfg": cfg, "first_s": first, "bench_s": bench_s, "ms": ms,
                                             "tflops": flops / (ms * 1e-3) / 1e12, "rel_err": err, "error": ""}
                except Exception as exc:  # a config the compiler rejects is recorded, not fatal
                    measured[cfg.label()] = {"cfg": cfg, "error": f"{type(exc).__name__}: {exc}"[:200],
                                             "first_s": 0.0, "bench_s": 0.0, "ms": math.nan, "tflops": 0.0}
                if device == "cuda":
                    torch.cuda.empty_cache()
            # the sweep leaves maxnreg to the compiler; the plan's config is one of them when it sets none
            sweep = [v for v in measured.values() if v["cfg"].maxnreg is None]
            ok_sweep = [v for v in sweep if not v["error"]]
            best = max(ok_sweep, key=lambda v: v["tflops"]) if ok_sweep else None
            p = measured[cfg_plan.label()]
            ratio = p["tflops"] / best["tflops"] if best and best["tflops"] > 0 else math.nan
            rows.append({
                "shape": f"{M}x{N}x{K}", "tile": "x".join(map(str, tile)), "machine": machine,
                "plan_config": cfg_plan.label(), "plan_tflops": p["tflops"], "plan_error": p["error"],
                "plan_ii": info["ii"], "plan_status": info["status"], "plan_source": info["source"],
                "best_config": best["cfg"].label() if best else None, "best_tflops": best["tflops"] if best else None,
                "plan_over_best": ratio, "within_tolerance": bool(ratio >= 1 - TOLERANCE) if best else False,
                "n_sweep": len(sweep), "sweep_failed": [v["cfg"].label() for v in sweep if v["error"]],
                "time_to_config_plan_s": solve_s + p["first_s"] + p["bench_s"],
                "time_to_config_sweep_s": sum(v["first_s"] + v["bench_s"] for v in sweep),
                "solve_s": solve_s, "plan_compile_s": p["first_s"],
                "max_rel_err": max((v.get("rel_err", 0.0) for v in measured.values() if not v["error"]), default=math.nan),
            })
        del a, b, ref
    return rows


def checks(device: str) -> list[tuple[str, bool, str]]:
    """Correctness of the plan-configured GEMM, and (CUDA) the plan within 3 % of the sweep's best."""
    import torch

    from adasched.kernels.gemm import gemm, gemm_reference

    out = []
    machine = machine_for_device(device)
    tile = CPU_TILES[0] if device == "cpu" else GPU_TILES[0]
    cfg, _ = plan_config(tile, machine)
    M, N, K = (67, 45, 83) if device == "cpu" else (1031, 2055, 1537)
    a, b = _inputs(M, N, K, device)
    got, want = gemm(a, b, cfg).float(), gemm_reference(a, b).float()
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    bad = int((~torch.isclose(got, want, atol=tol, rtol=tol)).sum())
    out.append((f"gemm {M}x{N}x{K} {cfg.label()} vs torch", bad == 0, f"{bad} of {got.numel()} elements differ"))
    if device == "cuda":
        for r in plan_vs_sweep(device):
            detail = (f"{r['shape']} tile {r['tile']}: plan {r['plan_config']} {r['plan_tflops']:.1f} TFLOP/s vs best "
                      f"{r['best_config']} {r['best_tflops'] or 0:.1f} ({r['plan_over_best']:.3f}); time to config "
                      f"{r['time_to_config_plan_s']:.1f} s vs {r['time_to_config_sweep_s']:.1f} s "
                      f"({r['n_sweep']} configs)")
            out.append((f"twill plan within {TOLERANCE:.0%} of sweep {r['shape']} {r['tile']}", r["within_tolerance"],
                        detail))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from adasched.kernels.bench import format_table, resolve_device

    ap = argparse.ArgumentParser(description="Twill plan-derived GEMM config vs a full num_stages x num_warps sweep")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    if dev == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = plan_vs_sweep(dev, quick=args.quick, log=lambda s: print(s, flush=True))
    cols = ["shape", "tile", "plan_config", "plan_tflops", "best_config", "best_tflops", "plan_over_best",
            "time_to_config_plan_s", "time_to_config_sweep_s", "n_sweep"]
    fmt = [[(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) for c in cols] for r in rows]
    print(format_table(fmt, cols, title=f"twill plan vs sweep ({dev}, machine {rows[0]['machine'] if rows else '?'})"))
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if all(r["within_tolerance"] for r in rows) or dev == "cpu" else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
