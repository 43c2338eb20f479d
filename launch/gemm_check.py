"""GEMM benchmark and Twill's plan-vs-sweep check (``adasched bench kernels --only gemm``).

``cases``: per shape, torch.matmul (baseline) vs the Triton GEMM launched with the Twill plan-derived knobs.
``plan_vs_sweep``: for each (shape, tile) the plan's configuration (solve the GEMM main-loop graph of
``planner.twill.knobs.gemm_graph`` for the tile on this GPU's machine model, take its num_stages / num_warps /
warp_specialize / maxnreg; compile once) against a full sweep num_stages x num_warps (x warp_specialize where
the machine supports it; compile N times). Reports TFLOP/s of both, the ratio, and the time to configuration
(plan: solve + one compile + one timing; sweep: N compiles + N timings). ``checks`` turns it into pass/fail
(plan within 3 % of the best swept configuration) for the device check. ``lora_plan_vs_sweep`` is the same
comparison for the fused LoRA linear (``kernels.lora``: forward Y = X W^T + LoRA and backward dX = dY W + LoRA,
both GEMMs launched with one config, warp_specialize included where the machine has it), timed over a whole
forward + backward step. Run directly:

    python -m adasched.launch.gemm_check [--quick] [--lora] [--json FILE]
"""
from __future__ import annotations

import math
import time
from typing import Optional

from adasched.kernels.bench import BenchCase

__all__ = ["cases", "checks", "plan_vs_sweep", "plan_config", "sweep_configs", "machine_for_device",
           "lora_plan_vs_sweep", "lora_flops", "GPU_SHAPES", "GPU_TILES", "LORA_GPU_SHAPES", "SWEEP_STAGES",
           "SWEEP_WARPS", "TOLERANCE"]

GPU_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192), (4096, 14336, 4096))  # (M, N, K)
GPU_TILES = ((128, 128, 64), (128, 256, 64))
CPU_SHAPES = ((64, 48, 80),)
CPU_TILES = ((64, 32, 32),)
#: LoRA fused linear shapes (T tokens, K in, N out, rank r): a 4096-wide projection and an MLP up-projection.
LORA_GPU_SHAPES = ((8192, 4096, 4096, 16), (8192, 4096, 14336, 16))
LORA_CPU_SHAPES = ((24, 32, 32, 4),)
LORA_CPU_TILES = ((64, 32, 16),)
LORA_DROPOUT = 0.1
SWEEP_STAGES = (2, 3, 4, 5)
SWEEP_WARPS = (4, 8)
TOLERANCE = 0.03

#: Plan-derived knobs per (machine, tile), solved with this repository on the CPU (a test checks that they match
#: a fresh solve). Used only when the planner cannot be imported (the GPU image may lack ortools or pydantic);
#: the time to configuration then counts the recorded solve time (seconds, 2-core CPU, warm solver).
WARP_SPECIALIZE_SUPPORTED = {"h100": False, "b200": True}  # mirrors machines/*.json (checked by a test)
PRECOMPUTED = {
    ("h100", (128, 128, 64)): {"num_stages": 4, "num_warps": 8, "warp_specialize": False, "maxnreg": None, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("h100", (128, 256, 64)): {"num_stages": 4, "num_warps": 8, "warp_specialize": False, "maxnreg": None, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("b200", (128, 128, 64)): {"num_stages": 4, "num_warps": 4, "warp_specialize": True, "maxnreg": 240, "ii": 2,
                               "status": "optimal", "solve_seconds": 0.02},
    ("b200", (128, 256, 64)): {"num_stages": 4, "num_warps": 8, "warp_specialize": True, "maxnreg": 168, "ii": 2,
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
    """The plain GEMM's operand dtype: float16 on a GPU (the recorded H100/H200 sweeps are float16), float32 under
    the interpreter. The fused LoRA linear's is bfloat16 (:func:`_lora_inputs`)."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32


def plan_config(tile: tuple[int, int, int], machine: str, dtype_bytes: int = 2, time_limit: float = 10.0,
                allow_precomputed: bool = True):
    """(GemmConfig, info) for a tile shape: solve the GEMM main-loop graph and map its knobs to the config.

    ``info``: {ii, status, solve_seconds, source: 'solved' | 'precomputed'}. Without an importable planner, or
    when its solve fails (and ``allow_precomputed``), the knobs come from :data:`PRECOMPUTED` and ``info['why']``
    says why."""
    from adasched.kernels.gemm import GemmConfig

    bm, bn, bk = tile

    def precomputed(why: BaseException):
        if not allow_precomputed or (machine, tuple(tile)) not in PRECOMPUTED or dtype_bytes != 2:
            raise why
        rec = PRECOMPUTED[(machine, tuple(tile))]
        cfg = GemmConfig.from_knobs(rec, block_m=bm, block_n=bn, block_k=bk)
        return cfg, {"ii": rec["ii"], "status": rec["status"], "solve_seconds": rec["solve_seconds"],
                     "source": "precomputed", "why": f"{type(why).__name__}: {why}"[:200],
                     "knobs": {k: rec[k] for k in ("num_stages", "num_warps", "warp_specialize", "maxnreg")}}

    try:
        from adasched.planner.solver import SolveParams
        from adasched.planner.twill.graph import load_machine
        from adasched.planner.twill.knobs import gemm_graph
        from adasched.planner.twill.plan import plan_twill
    except Exception as err:  # ImportError, or SystemError from a pydantic / pydantic-core version mismatch
        return precomputed(err)
    try:
        m = load_machine(machine)
        plan = plan_twill(gemm_graph(m, bm, bn, bk, dtype_bytes), m, SolveParams(time_limit=time_limit),
                          simulate=False)
    except Exception as err:  # carried wheels that import but fail to solve (a GPU image's other protobuf, ...)
        return precomputed(err)
    knobs = plan.knobs.model_dump(exclude={"note"})  # (the launch knobs; a note says what they cannot give)
    cfg = GemmConfig.from_knobs(knobs, block_m=bm, block_n=bn, block_k=bk)
    return cfg, {"ii": plan.ii, "status": plan.solver.status, "solve_seconds": plan.solver.solve_seconds,
                 "source": "solved", "knobs": knobs, **({"note": plan.knobs.note} if plan.knobs.note else {})}


def sweep_configs(tile: tuple[int, int, int], machine: str, stages=SWEEP_STAGES, warps=SWEEP_WARPS) -> list:
    """Every num_stages x num_warps (x warp_specialize on machines whose Triton supports it)."""
    from adasched.kernels.gemm import GemmConfig

    try:
        from adasched.planner.twill.graph import load_machine

        supported = load_machine(machine).warp_specialize
    except Exception:  # GPU image without the planner's dependencies (a pydantic-core mismatch raises SystemError,
        # carried wheels that import but fail inside another error: as plan_config, which catches any); an unknown
        # machine is still load_machine's own error
        if machine not in WARP_SPECIALIZE_SUPPORTED:
            raise
        supported = WARP_SPECIALIZE_SUPPORTED[machine]
    bm, bn, bk = tile
    ws = (False, True) if supported else (False,)
    # (a warp-specialized config loads through TMA, as the plan's does - GemmConfig.from_knobs - so plan and sweep
    # time the same main loop; the plain ones keep pointer loads, as every recorded Hopper sweep)
    return [GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_stages=s, num_warps=w, warp_specialize=x, tma=x)
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
                cfg, _ = plan_config(tile, machine, dtype_bytes=a.element_size())  # (as plan_vs_sweep solves it)
                return {"torch": lambda: torch.matmul(a, b), "twill-plan": lambda: gemm(a, b, cfg)}

            out.append(BenchCase(name="gemm", shape=f"M={M} N={N} K={K} tile={tile[0]}x{tile[1]}x{tile[2]}",
                                 providers=build, baseline="torch", note=f"machine model {machine}",
                                 params={"M": M, "N": N, "K": K, "tile": list(tile), "machine": machine},
                                 priority=2))
    return out


def _first_call(fn, device: str) -> float:
    """Seconds of the first call (compile + run)."""
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_all(fns: dict, device: str, quick: bool) -> tuple[dict, float]:
    """Interleaved timing of the compiled configs (``kernels.bench.time_interleaved``: every config once per
    round, rotating order, so clock drift hits all alike): ({label: median ms or exception}, seconds of timing
    per config)."""
    from adasched.kernels.bench import time_interleaved

    t0 = time.perf_counter()
    got = time_interleaved(fns, device, quick)
    per = (time.perf_counter() - t0) / max(1, len(fns))
    return {k: (v if isinstance(v, BaseException) else v[0]) for k, v in got.items()}, per


def _time_into(records: dict, fns: dict, device: str, quick: bool, flops: float) -> None:
    """Times ``fns`` ({label: fn}) interleaved and writes ms, TFLOP/s and timing seconds (or the error) into
    ``records[label]``."""
    times, per = _time_all(fns, device, quick)
    for label, t in times.items():
        if isinstance(t, BaseException):
            records[label].update(error=f"{type(t).__name__}: {t}"[:200], bench_s=0.0, ms=math.nan, tflops=0.0)
        else:
            records[label].update(bench_s=per, ms=t, tflops=flops / (t * 1e-3) / 1e12)
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


#: rounds of the head-to-head re-timing of the plan's config against the sweep's best (see :func:`_confirm`)
CONFIRM_ROUNDS = 9


def _confirm(fns: dict, plan_label: str, best_label: Optional[str], device: str, quick: bool) -> Optional[float]:
    """plan / best throughput from a fresh interleaved timing of just those two configs (``CONFIRM_ROUNDS``
    rounds), or None when the plan is the best or either is missing. The sweep's own ratio is biased low: its
    best is the largest of N noisy medians (the winner's curse; on the H200 the 128x128 configs within 4 % of
    each other swapped places between two runs), so the tolerance is judged on this unselected comparison and
    both ratios are reported."""
    if best_label is None or best_label == plan_label or plan_label not in fns or best_label not in fns:
        return None
    from adasched.kernels.bench import time_interleaved

    got = time_interleaved({plan_label: fns[plan_label], best_label: fns[best_label]}, device, quick,
                           rounds=CONFIRM_ROUNDS)
    tp, tb = got.get(plan_label), got.get(best_label)
    if isinstance(tp, BaseException) or isinstance(tb, BaseException) or not tp or not tb or tp[0] <= 0:
        return None
    return tb[0] / tp[0]


def _within(complete: bool, ratio: float, confirm: Optional[float]) -> bool:
    """The tolerance test of a row: on the head-to-head ratio when there is one, else on the sweep's."""
    judged = confirm if confirm is not None else ratio
    return bool(complete and judged >= 1 - TOLERANCE)


def _past(deadline) -> bool:
    return deadline is not None and time.perf_counter() > deadline


DEADLINE_SKIP = "skipped: device-check deadline reached"
#: the rows of the last ``checks`` run's sweeps ({"gemm": [...], "lora": [...]}), for the device check's JSON
LAST_SWEEPS: dict = {"gemm": [], "lora": []}


def plan_vs_sweep(device: str = "cuda", quick: bool = False, shapes=None, tiles=None, stages=SWEEP_STAGES,
                  warps=SWEEP_WARPS, log=None, deadline=None) -> list[dict]:
    """One row per (shape, tile): plan and best-sweep TFLOP/s, ratio, times to configuration (seconds).
    Configs not started by ``deadline`` (a ``time.perf_counter()`` value) are recorded as skipped and make the
    row ``complete: False`` (never within tolerance)."""
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
            # a recorded plan costs its recorded solve time plus whatever the failed attempt took here
            solve_s = time.perf_counter() - t0 + (0.0 if info["source"] == "solved" else info["solve_seconds"])
            measured: dict[str, dict] = {}
            fns = {}
            sweep_cfgs = list(sweep_configs(tile, machine, stages, warps))
            for cfg in [cfg_plan] + [c for c in sweep_cfgs if c != cfg_plan]:
                if _past(deadline):
                    measured[cfg.label()] = {"cfg": cfg, "error": DEADLINE_SKIP, "first_s": 0.0, "bench_s": 0.0,
                                             "ms": math.nan, "tflops": 0.0}
                    continue
                if log:
                    log(f"[gemm] {M}x{N}x{K} {cfg.label()}")
                try:  # compile + first run; then check the result
                    first = _first_call(lambda cfg=cfg: gemm(a, b, cfg), device)
                    err = (gemm(a, b, cfg).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                    measured[cfg.label()] = {"cfg": cfg, "first_s": first, "rel_err": err, "error": ""}
                    fns[cfg.label()] = lambda cfg=cfg: gemm(a, b, cfg)
                except Exception as exc:  # a config the compiler rejects is recorded, not fatal
                    measured[cfg.label()] = {"cfg": cfg, "error": f"{type(exc).__name__}: {exc}"[:200],
                                             "first_s": 0.0, "bench_s": 0.0, "ms": math.nan, "tflops": 0.0}
            _time_into(measured, fns, device, quick, flops)
            # the plan's config is one of the sweep's only when it is in the grid (a plan of 6 stages outside 2..5 was
            # counted: n_sweep 9 for a grid of 8, and plan_over_best 1.0 by construction when it was fastest)
            sweep = [v for v in measured.values() if v["cfg"] in sweep_cfgs]
            ok_sweep = [v for v in sweep if not v["error"]]
            best = max(ok_sweep, key=lambda v: v["tflops"]) if ok_sweep else None
            p = measured[cfg_plan.label()]
            ratio = p["tflops"] / best["tflops"] if best and best["tflops"] > 0 else math.nan
            complete = not any(v["error"] == DEADLINE_SKIP for v in measured.values())
            confirm = None if _past(deadline) else _confirm(fns, cfg_plan.label(),
                                                             best["cfg"].label() if best else None, device, quick)
            rows.append({
                "shape": f"{M}x{N}x{K}", "tile": "x".join(map(str, tile)), "machine": machine, "complete": complete,
                "dtype": str(_dtype(device)).removeprefix("torch."),
                "plan_config": cfg_plan.label(), "plan_tflops": p["tflops"], "plan_error": p["error"],
                "plan_ii": info["ii"], "plan_status": info["status"], "plan_source": info["source"],
                "plan_why": info.get("why", ""),
                "best_config": best["cfg"].label() if best else None, "best_tflops": best["tflops"] if best else None,
                "plan_over_best": ratio, "plan_over_best_confirmed": confirm,
                "within_tolerance": _within(complete, ratio, confirm) if best else False,
                "n_sweep": len(sweep), "sweep_failed": [v["cfg"].label() for v in sweep if v["error"]],
                "time_to_config_plan_s": solve_s + p["first_s"] + p["bench_s"],
                "time_to_config_sweep_s": sum(v["first_s"] + v["bench_s"] for v in sweep),
                "solve_s": solve_s, "plan_compile_s": p["first_s"],
                "max_rel_err": max((v.get("rel_err", 0.0) for v in measured.values() if not v["error"]), default=math.nan),
                "configs": [{"config": k, **{f: v.get(f) for f in ("ms", "tflops", "first_s", "error")}}
                            for k, v in measured.items()],
            })
        del a, b, ref
    return rows


def lora_flops(T: int, K: int, N: int, r: int) -> float:
    """Useful FLOPs of one fused LoRA forward + backward (dX, dA, dB): Y = X W^T and dX = dY W (2 T N K each),
    plus the six rank-r products S = Xd A^T, S B^T, dS = dY B, dB = dY^T S, dA = dS^T Xd, dS A (2 T r K or
    2 T r N each): 4 T N K + 6 T r (K + N)."""
    return 4.0 * T * N * K + 6.0 * T * r * (K + N)


def _lora_inputs(T: int, K: int, N: int, r: int, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(T + 3 * K + 7 * N + 11 * r)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    mk = lambda *shape, s: (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dt)  # noqa: E731
    x = mk(T, K, s=1.0).requires_grad_(True)
    w = mk(N, K, s=K ** -0.5)
    a = mk(r, K, s=K ** -0.5).requires_grad_(True)
    b = mk(N, r, s=r ** -0.5).requires_grad_(True)
    dy = mk(T, N, s=1.0)
    return x, w, a, b, dy


def _lora_step(x, w, a, b, dy, cfg, seed: int = 1234, reference: bool = False):
    """One fused LoRA forward + backward with ``cfg``: (Y, dX, dA, dB)."""
    import torch

    from adasched.kernels.lora import lora_linear, lora_linear_reference

    fn = lora_linear_reference if reference else lora_linear
    y = fn(x, w, a, b, 2.0, LORA_DROPOUT, seed=seed, **({} if reference else {"gemm_config": cfg}))
    return (y.detach(), *torch.autograd.grad(y, (x, a, b), dy))


def lora_plan_vs_sweep(device: str = "cuda", quick: bool = False, shapes=None, tiles=None, stages=SWEEP_STAGES,
                       warps=SWEEP_WARPS, log=None, deadline=None) -> list[dict]:
    """The fused LoRA linear (forward + backward, dropout 0.1) with the Twill plan-derived GEMM config of each
    tile vs every num_stages x num_warps config of that tile. One row per (shape, tile): plan and best ms and
    TFLOP/s (useful FLOPs, :func:`lora_flops`), plan/best, times to configuration (plan: solve + first call +
    timing; sweep: first calls + timings of every config), the largest relative error of Y, dX, dA, dB against
    the fp32 torch reference over all configs, and ``configs``: every measured config ({config, ms, tflops,
    first_s, bench_s, rel_err, error, in_sweep}). ``deadline`` as in :func:`plan_vs_sweep`."""
    shapes = shapes or (LORA_CPU_SHAPES if device == "cpu" else LORA_GPU_SHAPES[:1] if quick else LORA_GPU_SHAPES)
    tiles = tiles or (LORA_CPU_TILES if device == "cpu" else GPU_TILES)
    machine = machine_for_device(device)
    rows = []
    for (T, K, N, r) in shapes:
        x, w, a, b, dy = _lora_inputs(T, K, N, r, device)
        f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, a, b)]
        ref = _lora_step(*f32, dy.float(), None, reference=True)
        flops = lora_flops(T, K, N, r)
        for tile in tiles:
            t0 = time.perf_counter()
            cfg_plan, info = plan_config(tile, machine, dtype_bytes=x.element_size())
            # a recorded plan costs its recorded solve time plus whatever the failed attempt took here
            solve_s = time.perf_counter() - t0 + (0.0 if info["source"] == "solved" else info["solve_seconds"])
            sweep_cfgs = list(sweep_configs(tile, machine, stages, warps))
            measured: list[dict] = []
            fns = {}
            for cfg in [cfg_plan] + [c for c in sweep_cfgs if c != cfg_plan]:
                rec = {"config": cfg.label(), "cfg": cfg, "in_sweep": cfg in sweep_cfgs, "plan": cfg == cfg_plan}
                measured.append(rec)
                if _past(deadline):
                    rec.update(first_s=0.0, bench_s=0.0, ms=math.nan, tflops=0.0, rel_err=math.nan,
                               error=DEADLINE_SKIP)
                    continue
                if log:
                    log(f"[lora] T={T} K={K} N={N} r={r} {cfg.label()}")
                try:  # compile + first run; then check Y, dX, dA, dB
                    rec["first_s"] = _first_call(lambda cfg=cfg: _lora_step(x, w, a, b, dy, cfg), device)
                    got = _lora_step(x, w, a, b, dy, cfg)
                    rec["rel_err"] = max((g.float() - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
                                         for g, e in zip(got, ref))
                    rec["error"] = ""
                    fns[cfg.label()] = lambda cfg=cfg: _lora_step(x, w, a, b, dy, cfg)
                except Exception as exc:  # a config the compiler rejects is recorded, not fatal
                    rec.update(first_s=0.0, bench_s=0.0, ms=math.nan, tflops=0.0, rel_err=math.nan,
                               error=f"{type(exc).__name__}: {exc}"[:200])
            _time_into({rec["config"]: rec for rec in measured}, fns, device, quick, flops)
            sweep = [v for v in measured if v["in_sweep"]]
            ok_sweep = [v for v in sweep if not v["error"]]
            best = max(ok_sweep, key=lambda v: v["tflops"]) if ok_sweep else None
            p = measured[0]
            ratio = p["tflops"] / best["tflops"] if best and best["tflops"] > 0 else math.nan
            complete = not any(v["error"] == DEADLINE_SKIP for v in measured)
            confirm = None if _past(deadline) else _confirm(fns, p["config"], best["config"] if best else None,
                                                             device, quick)
            rows.append({
                "shape": f"T={T} K={K} N={N} r={r}", "tile": "x".join(map(str, tile)), "machine": machine,
                "complete": complete,
                "dtype": str(x.dtype).replace("torch.", ""),
                "plan_config": p["config"], "plan_ms": p["ms"], "plan_tflops": p["tflops"], "plan_error": p["error"],
                "plan_ii": info["ii"], "plan_status": info["status"], "plan_source": info["source"],
                "plan_why": info.get("why", ""),
                "best_config": best["config"] if best else None, "best_ms": best["ms"] if best else None,
                "best_tflops": best["tflops"] if best else None,
                "plan_over_best": ratio, "plan_over_best_confirmed": confirm,
                "within_tolerance": _within(complete, ratio, confirm) if best else False,
                "n_sweep": len(sweep), "sweep_failed": [v["config"] for v in sweep if v["error"]],
                "time_to_config_plan_s": solve_s + p["first_s"] + p["bench_s"],
                "time_to_config_sweep_s": sum(v["first_s"] + v["bench_s"] for v in sweep),
                "solve_s": solve_s, "plan_compile_s": p["first_s"],
                "max_rel_err": max((v["rel_err"] for v in measured if not v["error"]), default=math.nan),
                "configs": [{k: v for k, v in m.items() if k != "cfg"} for m in measured],
            })
        del x, w, a, b, dy, f32, ref
    return rows


def _confirmed(r: dict) -> str:
    c = r.get("plan_over_best_confirmed")
    return "" if c is None else f", head to head {c:.3f}"


def _lora_check_row(r: dict) -> tuple[str, bool, str]:
    detail = (f"{'' if r['complete'] else 'INCOMPLETE (deadline) '}{r['shape']} tile {r['tile']} {r['dtype']} fwd+bwd: plan {r['plan_config']} {r['plan_ms']:.3f} ms "
              f"({r['plan_tflops']:.1f} TFLOP/s) vs best {r['best_config']} {r['best_ms'] or math.nan:.3f} ms "
              f"({r['best_tflops'] or 0:.1f}) = {r['plan_over_best']:.3f}{_confirmed(r)}; time to config "
              f"{r['time_to_config_plan_s']:.1f} s vs {r['time_to_config_sweep_s']:.1f} s ({r['n_sweep']} configs); "
              f"max rel err {r['max_rel_err']:.2e}")
    return (f"twill plan within {TOLERANCE:.0%} of sweep, LoRA {r['shape']} {r['tile']}", r["within_tolerance"],
            detail)


def checks(device: str, deadline=None) -> list[tuple[str, bool, str]]:
    """Correctness of the plan-configured GEMM, and (CUDA) the plan within 3 % of the sweep's best. With a
    ``deadline`` the GEMM sweep gets half of the time left and the LoRA sweep the rest."""
    import torch

    from adasched.kernels.gemm import gemm, gemm_reference

    out = []
    machine = machine_for_device(device)
    tile = CPU_TILES[0] if device == "cpu" else GPU_TILES[0]
    M, N, K = (67, 45, 83) if device == "cpu" else (1031, 2055, 1537)
    a, b = _inputs(M, N, K, device)
    cfg, _ = plan_config(tile, machine, dtype_bytes=a.element_size())
    got, want = gemm(a, b, cfg).float(), gemm_reference(a, b).float()
    tol = 1e-4 if a.dtype == torch.float32 else 2e-2
    bad = int((~torch.isclose(got, want, atol=tol, rtol=tol)).sum())
    out.append((f"gemm {M}x{N}x{K} {cfg.label()} vs torch", bad == 0, f"{bad} of {got.numel()} elements differ"))
    if device == "cuda":
        half = None if deadline is None else time.perf_counter() + 0.5 * max(0.0, deadline - time.perf_counter())
        LAST_SWEEPS["gemm"] = plan_vs_sweep(device, deadline=half)
        for r in LAST_SWEEPS["gemm"]:
            detail = (f"{'' if r['complete'] else 'INCOMPLETE (deadline) '}{r['shape']} tile {r['tile']}: plan {r['plan_config']} {r['plan_tflops']:.1f} TFLOP/s vs best "
                      f"{r['best_config']} {r['best_tflops'] or 0:.1f} ({r['plan_over_best']:.3f}{_confirmed(r)}); "
                      f"time to config "
                      f"{r['time_to_config_plan_s']:.1f} s vs {r['time_to_config_sweep_s']:.1f} s "
                      f"({r['n_sweep']} configs)")
            out.append((f"twill plan within {TOLERANCE:.0%} of sweep {r['shape']} {r['tile']}", r["within_tolerance"],
                        detail))
    # the fused LoRA linear with the plan's config: Y, dX, dA, dB against the fp32 torch reference
    (T, K, N, r), ltile = ((LORA_CPU_SHAPES[0], LORA_CPU_TILES[0]) if device == "cpu"
                           else ((1031, 1024, 1536, 16), GPU_TILES[0]))
    x, w, a, b, dy = _lora_inputs(T, K, N, r, device)
    lcfg = plan_config(ltile, machine, dtype_bytes=x.element_size())[0]
    got = _lora_step(x, w, a, b, dy, lcfg)
    ref = _lora_step(*[t.detach().float().requires_grad_(t.requires_grad) for t in (x, w, a, b)], dy.float(), None,
                     reference=True)
    ltol = 1e-4 if x.dtype == torch.float32 else 3e-2
    bad = sum(int((~torch.isclose(g.float(), e, atol=ltol * max(e.abs().max().item(), 1.0), rtol=ltol)).sum())
              for g, e in zip(got, ref))
    total = sum(e.numel() for e in ref)
    out.append((f"lora fwd+bwd T={T} K={K} N={N} r={r} {lcfg.label()} vs torch", bad == 0,
                f"{bad} of {total} elements of Y, dX, dA, dB differ"))
    if device == "cuda":
        LAST_SWEEPS["lora"] = lora_plan_vs_sweep(device, deadline=deadline)
        out.extend(_lora_check_row(r) for r in LAST_SWEEPS["lora"])
    return out


def main(argv: list[str] | None = None) -> int:
    import sys

    from adasched.kernels.bench import format_table, resolve_device
    from adasched.planner.ui import OneLineArgParser
    from adasched.profiler.io import InputError, atomic_write_json, check_output_path

    ap = OneLineArgParser(prog="python -m adasched.launch.gemm_check",
                          description="Twill plan-derived GEMM config vs a full num_stages x num_warps sweep")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and tiles (smoke test)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (default: auto)")
    ap.add_argument("--lora", action="store_true", help="the fused LoRA linear (fwd+bwd) instead of the GEMM")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    try:  # before any compile or timing: a bad path must not cost the whole sweep
        check_output_path(args.json_out, "--json")
        dev = resolve_device(args.device)
    except (InputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dev == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    fn = lora_plan_vs_sweep if args.lora else plan_vs_sweep
    rows = fn(dev, quick=args.quick, log=lambda s: print(s, flush=True))
    cols = ["shape", "tile", "plan_config", "plan_tflops", "best_config", "best_tflops", "plan_over_best",
            "plan_over_best_confirmed", "within_tolerance", "time_to_config_plan_s", "time_to_config_sweep_s",
            "n_sweep"]
    fmt = [[(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) for c in cols] for r in rows]
    print(format_table(fmt, cols, title=f"twill plan vs sweep{' (LoRA fwd+bwd)' if args.lora else ''} ({dev}, machine {rows[0]['machine'] if rows else '?'})"))
    if args.json_out:
        atomic_write_json(args.json_out, rows)
    return 0 if all(r["within_tolerance"] for r in rows) or dev == "cpu" else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
