"""gemm_bench on the CPU (interpreter): the kernel-bench contract, the plan-derived config, and the
plan-vs-sweep comparison code path (times meaningless here; the GPU numbers come from the device check)."""
from __future__ import annotations

import math

import pytest

from adasched.launch import gemm_check as gemm_bench
from adasched.kernels.bench import BenchCase, run_benchmarks


def test_cases_contract_and_run():
    cs = gemm_bench.cases(True, "cpu")
    assert cs and all(isinstance(c, BenchCase) and c.baseline == "torch" for c in cs)
    out = run_benchmarks(["gemm"], quick=True, device="cpu")
    rows = [r for r in out["results"] if r["group"] == "gemm"]
    assert {r["provider"] for r in rows} == {"torch", "twill-plan"}
    assert all(not r["error"] and r["median_ms"] > 0 for r in rows)


def test_plan_config_from_twill_plan_and_precomputed_table():
    cfg, info = gemm_bench.plan_config((128, 128, 64), "h100")
    assert info["status"] == "optimal" and info["source"] == "solved"
    assert (cfg.num_stages, cfg.num_warps, cfg.warp_specialize) == (info["knobs"]["num_stages"],
                                                                    info["knobs"]["num_warps"], False)
    cfg_b, _ = gemm_bench.plan_config((128, 256, 64), "b200")
    assert cfg_b.warp_specialize is True and cfg_b.block_n == 256
    assert cfg_b.tma is True and not cfg.tma  # the knobs' maxnreg fits a TMA main loop only (kernels.gemm)
    # the table used on a GPU image without the planner matches a fresh solve
    for (machine, tile), rec in gemm_bench.PRECOMPUTED.items():
        _, info = gemm_bench.plan_config(tile, machine)
        assert info["knobs"] == {k: rec[k] for k in info["knobs"]} and info["ii"] == rec["ii"], (machine, tile)
    assert len(gemm_bench.sweep_configs((128, 128, 64), "h100")) == 8
    b200 = gemm_bench.sweep_configs((128, 128, 64), "b200")
    assert len(b200) == 16 and all(c.tma == c.warp_specialize for c in b200)  # ws points time the plan's main loop
    from dataclasses import replace
    assert replace(cfg_b, maxnreg=None) in gemm_bench.sweep_configs((128, 256, 64), "b200")  # same loads, knobs


def test_plan_vs_sweep_code_path_on_cpu():
    rows = gemm_bench.plan_vs_sweep("cpu", quick=True, shapes=((64, 48, 80),), tiles=((64, 32, 32),),
                                    stages=(2, 3), warps=(4,))
    (r,) = rows
    assert r["plan_error"] == "" and r["plan_tflops"] > 0 and r["best_tflops"] > 0
    assert r["max_rel_err"] < 1e-5  # every configuration computed the right product
    assert not math.isnan(r["plan_over_best"])
    # the sweep is the grid (2 stages x 1 warp count): the plan's config counts only when it is in it (its 6 stages
    # on the CPU's fp32 are not: n_sweep was 3 and its compile time was added to the sweep's)
    assert r["n_sweep"] == 2 and len(r["configs"]) == 3 and "s6" in r["plan_config"], (r["n_sweep"], r["plan_config"])
    assert r["time_to_config_sweep_s"] > 0 and r["time_to_config_plan_s"] > 0
    checks = gemm_bench.checks("cpu")
    assert checks and all(ok for _, ok, _ in checks), checks


def test_confirmation_retimes_plan_and_best_head_to_head(monkeypatch):
    """The sweep's best is the largest of N noisy numbers; the row's tolerance is judged on a fresh timing of
    just the plan and that best config."""
    from adasched.kernels import bench

    calls = []

    def fake_interleaved(fns, device, quick, rounds=None):
        calls.append((sorted(fns), rounds))
        return {"plan": (1.02, 1.0, 1.04), "best": (1.0, 0.98, 1.01)}

    monkeypatch.setattr(bench, "time_interleaved", fake_interleaved)
    fns = {"plan": lambda: None, "best": lambda: None, "other": lambda: None}
    got = gemm_bench._confirm(fns, "plan", "best", "cuda", False)
    assert calls == [(["best", "plan"], gemm_bench.CONFIRM_ROUNDS)] and math.isclose(got, 1.0 / 1.02)
    assert gemm_bench._confirm(fns, "plan", "plan", "cuda", False) is None  # the plan is the best
    assert gemm_bench._confirm(fns, "plan", None, "cuda", False) is None
    assert gemm_bench._within(True, 0.95, got) and not gemm_bench._within(True, 0.99, 0.95)
    assert gemm_bench._within(True, 0.975, None) and not gemm_bench._within(False, 1.0, 1.0)


def test_precomputed_fallback_without_planner(monkeypatch):
    import sys

    from adasched.planner.twill.graph import load_machine

    for m, ok in gemm_bench.WARP_SPECIALIZE_SUPPORTED.items():
        assert load_machine(m).warp_specialize is ok
    monkeypatch.setitem(sys.modules, "adasched.planner.twill.plan", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "adasched.planner.twill.graph", None)
    cfg, info = gemm_bench.plan_config((128, 256, 64), "h100")
    assert info["source"] == "precomputed" and (cfg.num_stages, cfg.num_warps, cfg.maxnreg) == (4, 8, None)
    assert "ImportError" in info["why"] or "ModuleNotFoundError" in info["why"]
    assert len(gemm_bench.sweep_configs((128, 128, 64), "b200")) == 16


def test_precomputed_fallback_when_the_solve_fails(monkeypatch):
    """Carried solver wheels that import but fail to solve on the GPU image: the recorded knobs, and why; a tile
    with no record raises the solver's error."""
    import adasched.planner.twill.plan as twill_plan

    def broken(*args, **kwargs):
        raise RuntimeError("protobuf mismatch")
    monkeypatch.setattr(twill_plan, "plan_twill", broken)
    cfg, info = gemm_bench.plan_config((128, 128, 64), "h100")
    assert info["source"] == "precomputed" and info["why"] == "RuntimeError: protobuf mismatch"
    assert (cfg.num_stages, cfg.num_warps) == (4, 8)
    with pytest.raises(RuntimeError, match="protobuf mismatch"):
        gemm_bench.plan_config((64, 64, 32), "h100")


def test_lora_plan_vs_sweep_rows_on_cpu():
    stages, warps = (2, 3), (4, 8)
    rows = gemm_bench.lora_plan_vs_sweep("cpu", quick=True, shapes=((24, 32, 32, 4),), tiles=((64, 32, 16),),
                                         stages=stages, warps=warps)
    (r,) = rows
    plan_cfg, _ = gemm_bench.plan_config((64, 32, 16), "h100", dtype_bytes=4)
    # every config present: the plan's first, then each num_stages x num_warps point exactly once
    labels = [c["config"] for c in r["configs"]]
    sweep = [f"64x32x16 s{s} w{w}" for s in stages for w in warps]
    assert labels[0] == r["plan_config"] == plan_cfg.label() and r["configs"][0]["plan"]
    assert sorted(c["config"] for c in r["configs"] if c["in_sweep"]) == sorted(sweep) and r["n_sweep"] == 4
    assert len(labels) == len(set(labels)) == 4 + (plan_cfg.label() not in sweep)
    assert all(c["error"] == "" and c["ms"] > 0 and c["rel_err"] < 1e-5 for c in r["configs"])
    # ratios and throughputs recomputed from the per-config rows
    flops = gemm_bench.lora_flops(24, 32, 32, 4)
    assert flops == 4 * 24 * 32 * 32 + 6 * 24 * 4 * (32 + 32)
    for c in r["configs"]:
        assert math.isclose(c["tflops"], flops / (c["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
    best = max((c for c in r["configs"] if c["in_sweep"]), key=lambda c: c["tflops"])
    assert r["best_config"] == best["config"] and math.isclose(r["best_tflops"], best["tflops"])
    assert math.isclose(r["plan_over_best"], r["configs"][0]["tflops"] / best["tflops"], rel_tol=1e-9)
    confirmed = r["plan_over_best_confirmed"]
    if r["best_config"] == r["plan_config"]:
        assert confirmed is None
    else:  # re-timed head to head: a positive ratio, and the tolerance judged on it
        assert confirmed > 0
    judged = r["plan_over_best"] if confirmed is None else confirmed
    assert r["within_tolerance"] == (judged >= 1 - gemm_bench.TOLERANCE)
    assert math.isclose(r["time_to_config_sweep_s"],
                        sum(c["first_s"] + c["bench_s"] for c in r["configs"] if c["in_sweep"]), rel_tol=1e-9)
    assert r["time_to_config_plan_s"] >= r["configs"][0]["first_s"] + r["configs"][0]["bench_s"]
    assert r["max_rel_err"] < 1e-5 and r["sweep_failed"] == []


#: rows of the recorded sweeps where the derived config misses the 3 % tolerance, with the ratio it has there
#: (keyed by the sweep's file): 2026-11-28b - the fused LoRA GEMM on the 128x256 tile spilled in its masked dX
#: epilogue on every config (2 KiB, kernel_report) and 3 stages beat the 4 the mapping derives from the schedule
#: (with the split dX epilogue since, the 2026-11-30 sweep has that tile within 3 %, 1.028 ms instead of 3.5);
#: 2026-11-30 - the LoRA GEMM on the 128x128 tile: 4 warps (s3 w4) beat the plan's 8 (s4 w8) by 14 % on the sweep's
#: medians, 11.5 % / 4 % head to head; the plain GEMM on that tile wants 8 warps (all 6 rows within 3 %)
KNOWN_MISSES = {("2026-11-28b", "lora", "T=8192 K=4096 N=4096 r=16", "128x256x64"): 0.969,
                ("2026-11-28b", "lora", "T=8192 K=4096 N=14336 r=16", "128x256x64"): 0.960,
                ("2026-11-30", "lora", "T=8192 K=4096 N=4096 r=16", "128x128x64"): 0.856,
                ("2026-11-30", "lora", "T=8192 K=4096 N=14336 r=16", "128x128x64"): 0.861}


def test_plan_knobs_against_the_recorded_h200_sweeps():
    """Replay of real measurements: three sweeps on an H200 (every num_stages x num_warps config of both tiles,
    timed interleaved): 2026-11-28 (plain GEMM only - that run's LoRA GEMM is gone, it serialized its wgmma:
    C7515), 2026-11-28b and 2026-11-30 (plain GEMM and fused LoRA fwd+bwd). The config the current Twill knob
    mapping derives for each tile must be within 3 % of the best swept config on every row but the KNOWN_MISSES,
    and no worse there than recorded. Partly the data the mapping was fitted to (the 11-28 sweeps); it does not
    replace re-running the GPU check."""
    import json
    from pathlib import Path

    pytest.importorskip("ortools")
    from adasched.launch.gemm_check import TOLERANCE, plan_config

    data_dir = Path(__file__).parent / "data"
    runs = [("2026-11-28", ("gemm",)), ("2026-11-28b", ("gemm", "lora")), ("2026-11-30", ("gemm", "lora"))]
    checked, misses = 0, {}
    for run, kinds in runs:
        data = json.loads((data_dir / f"h200_sweep_{run}.json").read_text())
        for kind in kinds:
            key, better = ("tflops", max) if kind == "gemm" else ("ms", min)
            for row in data[kind]:
                tile = tuple(int(v) for v in row["tile"].split("x"))
                cfg, info = plan_config(tile, "h100", allow_precomputed=False)
                assert info["source"] == "solved"
                label = cfg.label()
                table = row[key]
                assert label in table, f"{kind} {row['shape']} {row['tile']}: plan {label} not swept ({list(table)})"
                best = better(table.values())
                ratio = table[label] / best if kind == "gemm" else best / table[label]
                known = KNOWN_MISSES.get((run, kind, row["shape"], row["tile"]))
                if known is not None:
                    misses[(run, kind, row["shape"], row["tile"])] = ratio
                    assert ratio >= known - 1e-3, f"{run} {kind} {row['shape']} {row['tile']}: {ratio:.3f} < {known}"
                else:
                    assert ratio >= 1 - TOLERANCE, (f"{run} {kind} {row['shape']} {row['tile']}: plan {label} at "
                                                    f"{ratio:.3f}")
                checked += 1
    assert checked == 26 and set(misses) == set(KNOWN_MISSES)


#: plan vs best on the recorded H100 sweep: the 128x128 tile's 8 warps lose 3.9 % to 4 warps there (on the
#: H200 sweeps above 8 warps win or sit within 2.1 %); recorded as it is, not fitted to.
H100_KNOWN_MISSES = {"128x128x64": 0.960}


def test_plan_knobs_against_the_recorded_h100_peer_sweep():
    """Replay of the H100 sweep shipped with the project's data (a plain Triton tiled matmul at 8192^3, tiles
    {128x128, 128x256, 256x128, 64x128} x 64, stages 2-5 x warps 4/8; not our kernel and not re-fitted to):
    the plan's config must be within 3 % of the tile's best on every tile but H100_KNOWN_MISSES (and no worse
    there than recorded). 64x128 gets 6 stages from the plan, a config the sweep did not run: reported as
    unswept, not counted."""
    import json
    from pathlib import Path

    pytest.importorskip("ortools")
    from adasched.launch.gemm_check import TOLERANCE, plan_config

    data = json.loads((Path(__file__).parent / "data" / "h100_peers_gemm_sweep_2026-11-28.json").read_text())
    tiles: dict[tuple, dict] = {}
    for r in data["rows"]:
        if "tflops" in r:
            tiles.setdefault((r["BM"], r["BN"], r["BK"]), {})[(r["stages"], r["warps"])] = r["tflops"]
    assert len(tiles) == 4
    checked, unswept, misses = 0, [], {}
    for tile, table in tiles.items():
        cfg, info = plan_config(tile, "h100", allow_precomputed=False)
        assert info["source"] == "solved" and not cfg.warp_specialize
        name = "x".join(map(str, tile))
        got = table.get((cfg.num_stages, cfg.num_warps))
        if got is None:
            unswept.append((name, cfg.num_stages, cfg.num_warps))
            continue
        ratio = got / max(table.values())
        if name in H100_KNOWN_MISSES:
            misses[name] = ratio
            assert ratio >= H100_KNOWN_MISSES[name] - 1e-3, f"{name}: plan s{cfg.num_stages} w{cfg.num_warps} {ratio:.3f}"
        else:
            assert ratio >= 1 - TOLERANCE, f"{name}: plan s{cfg.num_stages} w{cfg.num_warps} at {ratio:.3f}"
        checked += 1
    assert checked == 3 and set(misses) == set(H100_KNOWN_MISSES), (checked, misses)
    assert unswept == [("64x128x64", 6, 4)], unswept
