"""Compile the LoRA kernels for an H100 (sm_90) without a GPU, with Triton's bundled ptxas.

The interpreter tests check the arithmetic; this checks that the real GPU backend accepts the kernels (our
pinned triton) and that the GEMMs get what makes them fast on Hopper: software-pipelined asynchronous loads
(3-stage shared-memory buffers) and warpgroup MMA. Runs in a subprocess, because TRITON_INTERPRET=1 is set for
this test session and Triton reads it when the kernels are decorated.
"""
from __future__ import annotations

import textwrap

import pytest
from sm90_helpers import run_sm90_script

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json
    from adasched.kernels import lora as L
    from adasched.kernels.aot import SIGNATURES, compile_report

    def comp(fn, kind, consts, opts, nodiv=()):
        r = compile_report(fn, SIGNATURES[kind], consts, opts, arch=90, no_divisibility=nodiv)
        return {"stages": r["stages"], "wgmma": r["mma"] == "wgmma", "async": r["async_loads"],
                "spill_bytes": r["spill_bytes"], "wgmma_serialized": r["wgmma_serialized"], "regs": r["regs"],
                "tma": r["tma_loads"], "membar_gpu": r.get("membar_gpu"), "red_global": r.get("red_global"),
                "atom_global": r.get("atom_global"), "ldg_16bit": r.get("ldg_16bit")}

    out = {}
    for name, dot in (("down_dropout", True), ("down_mask_only", False)):
        r = compile_report(L._lora_down_kernel, SIGNATURES["lora_down"],
                           dict(SPLIT_K=4, BLOCK_M=128, BLOCK_K=64, BLOCK_R=16, HAS_DROPOUT=True, HAS_DOT=dot,
                                UPCAST=False, PLANE=L.DROP_PLANE, SUB_M=L.DOWN_LAUNCH["sub_m"],
                                SEED_FROM_PTR=False, ALL_ROWS=False),
                           dict(num_warps=L.DOWN_LAUNCH["warps"], num_stages=L._DOWN_STAGES), arch=90,
                           no_divisibility=("seed",))
        out[name] = {"regs": r["regs"], "spill_bytes": r["spill_bytes"], "warnings": r["warnings"],
                     "mma": r["mma"], "membar_gpu": r.get("membar_gpu"), "red_global": r.get("red_global"),
                     "atom_global": r.get("atom_global")}
    base = dict(BLOCK_M=128, BLOCK_O=256, BLOCK_RED=64, BLOCK_R=16, GROUP_M=8, UPCAST=False, WARP_SPECIALIZE=False,
                EPI_WARPS=8, EPI_SPLIT=-1)
    out["gemm_fwd"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, HAS_BIAS=True, HAS_MASK=False,
                           APPLY_SCALE=True, stride_wr=1, stride_pr=1, P_R_UNIT=True, R_ALIGN=8),
                           dict(num_warps=8, num_stages=3))
    out["gemm_fwd_gather"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, HAS_BIAS=True, HAS_MASK=False,
                                  APPLY_SCALE=True, stride_wr=1, stride_pr=1), dict(num_warps=8, num_stages=3))
    out["gemm_dx"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, HAS_BIAS=False, HAS_MASK=True,
                          APPLY_SCALE=False, stride_wo=1, stride_po=1), dict(num_warps=8, num_stages=3))
    # the dX GEMM with the dropout mask needs a second output tile for the masked LoRA term: a 128x128 tile on
    # 8 warps holds both without spilling; 128x256 on 8 warps and 128x128 on 4 run the epilogue per column
    # half (lora.epi_split) - with a full-width second tile they spilled 1-2 KiB; both forms are compiled here
    out["gemm_dx_128"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, BLOCK_O=128, HAS_BIAS=False,
                              HAS_MASK=True, APPLY_SCALE=False, stride_wo=1, stride_po=1),
                              dict(num_warps=8, num_stages=3))
    for name, bo, warps, split in (("gemm_dx_unsplit", 256, 8, 0), ("gemm_dx_128_w4", 128, 4, -1)):
        out[name] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, BLOCK_O=bo, HAS_BIAS=False, HAS_MASK=True,
                         APPLY_SCALE=False, stride_wo=1, stride_po=1, EPI_WARPS=warps, EPI_SPLIT=split),
                         dict(num_warps=warps, num_stages=3))
    # base_gemm="triton_tma": the same two GEMMs with X and W through TMA descriptors
    out["gemm_fwd_tma"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, HAS_BIAS=True, HAS_MASK=False,
                               APPLY_SCALE=True, stride_wr=1, stride_pr=1, USE_TMA=True, W_OUT_MAJOR=True),
                               dict(num_warps=8, num_stages=3))
    out["gemm_dx_tma"] = comp(L._lora_gemm_kernel, "lora_gemm", dict(base, HAS_BIAS=False, HAS_MASK=True,
                              APPLY_SCALE=False, stride_wo=1, stride_po=1, USE_TMA=True, W_OUT_MAJOR=False),
                              dict(num_warps=8, num_stages=3))
    out["dy"] = comp(L._lora_dy_kernel, "lora_dy", dict(SPLIT_N=2, BLOCK_M=128, BLOCK_N=64, BLOCK_R=64,
                     HAS_DBIAS=True, UPCAST=False, B_ROWS=True, R_ALIGN=8), dict(num_warps=4, num_stages=3))
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_pipelined_wgmma_gemms(tmp_path):
    res = run_sm90_script(SCRIPT, tmp_path)
    for name in ("gemm_fwd", "gemm_dx", "gemm_dx_128"):
        got = {k: res[name][k] for k in ("stages", "wgmma", "async")}
        assert got == {"stages": 3, "wgmma": True, "async": True}, (name, res[name])
        # the LoRA term joins the accumulator after the K loop, so ptxas keeps the warpgroup MMAs asynchronous
        # (placed before the loop it reported C7515 "wgmma serialized" for every config)
        assert res[name]["wgmma_serialized"] is False, (name, res[name])
    assert res["gemm_fwd"]["spill_bytes"] == 0 and res["gemm_dx_128"]["spill_bytes"] == 0, res
    # the split epilogue: no spill where the full-width one spilled (the unsplit 128x256 form is the control)
    assert res["gemm_dx"]["spill_bytes"] == 0 and res["gemm_dx_128_w4"]["spill_bytes"] == 0, res
    assert res["gemm_dx_unsplit"]["spill_bytes"] > 0, res["gemm_dx_unsplit"]
    # TMA loads (bulk tensor copies; the pointer form has none), still pipelined async wgmma without spills, and
    # fewer registers than the pointer form (sm_90, Triton 3.7.1: 195 vs 228 forward, 246 vs 252 dX at 128x256 w8)
    # Under Triton 3.6.0 (the GPU image's) the dX form sits at the 255-register limit either way and the TMA one
    # spills 4 bytes (BENCHMARKS.md, sm_90 registers table): allowed there, not under 3.7+
    import triton

    old_triton = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
    for name, pointer in (("gemm_fwd_tma", "gemm_fwd"), ("gemm_dx_tma", "gemm_dx")):
        got, ptr = res[name], res[pointer]
        assert got["tma"] and not ptr["tma"], (name, got, ptr)
        assert got["wgmma"] and got["stages"] == 3 and not got["wgmma_serialized"], (name, got)
        if old_triton and name == "gemm_dx_tma":
            assert got["spill_bytes"] <= 8 and got["regs"] <= ptr["regs"], (name, got, ptr)
        else:
            assert got["spill_bytes"] == 0 and got["regs"] < ptr["regs"], (name, got, ptr)
    assert res["dy"]["wgmma"] and res["dy"]["async"] and res["dy"]["stages"] >= 2, res["dy"]
    # the dropout/S kernel as launched (32 rows, 4 warps): no spills, no ptxas warnings, <= 168 registers, so
    # three programs share an SM (128 rows on 4 warps took 255 registers + spills and serialized its wgmma: C7515)
    for name in ("down_dropout", "down_mask_only"):
        got = res[name]
        assert got["regs"] <= 168 and got["spill_bytes"] == 0 and not got["warnings"], (name, got)
    assert res["down_dropout"]["mma"] in ("mma", "wgmma"), res["down_dropout"]
    # the accumulating atomics (dY: dS, dB; dropout/S: split-K S) are relaxed fire-and-forget reductions: with
    # Triton's default acq_rel each add compiled to MEMBAR.ALL.GPU + ATOMG (24 of each in the dY loop on sm_90)
    if res["dy"]["membar_gpu"] is not None:  # nvdisasm ships with Triton; None only without it
        # the forward's LoRA term reads B's rows as 16-byte vectors; the gathered form took 16 one-element loads
        # per thread more (left in both: the bias row, one element per thread, coalesced)
        assert res["gemm_fwd"]["ldg_16bit"] <= 1 and res["gemm_fwd_gather"]["ldg_16bit"] >= 16, res
        assert res["dy"]["ldg_16bit"] == 0, res["dy"]  # B's rows in the dY loop: vectors too
        for name in ("dy", "down_dropout"):
            got = res[name]
            assert got["membar_gpu"] == 0 and got["atom_global"] == 0 and got["red_global"] > 0, (name, got)


WS_SCRIPT = textwrap.dedent('''
    import json
    from adasched.kernels import lora as L
    from adasched.kernels.aot import SIGNATURES, compile_report

    out = {}
    for cc in (100, 90):
        for mask in (False, True):
            consts = dict(BLOCK_M=128, BLOCK_O=128, BLOCK_RED=64, BLOCK_R=16, GROUP_M=8, UPCAST=False,
                          HAS_BIAS=False, HAS_MASK=mask, APPLY_SCALE=not mask, WARP_SPECIALIZE=True,
                          EPI_WARPS=4, EPI_SPLIT=-1,
                          **({"stride_wo": 1, "stride_po": 1} if mask else {"stride_wr": 1, "stride_pr": 1}))
            r = compile_report(L._lora_gemm_kernel, SIGNATURES["lora_gemm"], consts,
                               dict(num_warps=4, num_stages=3), arch=cc)
            out[f"sm{cc}{'_mask' if mask else ''}"] = {"partitions": r["ws_partitions"],
                                                      "tcgen05": r["mma"] == "tcgen05"}
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_lora_gemm_warp_specialized_compiles_for_sm100(tmp_path):
    """Twill's Blackwell plans set warp_specialize: the LoRA GEMM's K loop then splits into producer/consumer
    partitions on sm_100 (tcgen05 MMAs), forward and masked dX alike; Hopper compiles the same source unsplit."""
    res = run_sm90_script(WS_SCRIPT, tmp_path)
    assert res["sm100"] == res["sm100_mask"] == {"partitions": True, "tcgen05": True}, res
    assert res["sm90"]["partitions"] is False and res["sm90_mask"]["partitions"] is False, res


SEED_PTR_SCRIPT = textwrap.dedent('''
    import json
    from adasched.kernels import lora as L
    from adasched.kernels.aot import SIGNATURES, compile_report

    out = {}
    for dot in (True, False):
        r = compile_report(L._lora_down_kernel, dict(SIGNATURES["lora_down"], seed="*i64"),
                           dict(SPLIT_K=4, BLOCK_M=128, BLOCK_K=64, BLOCK_R=16, HAS_DROPOUT=True, HAS_DOT=dot,
                                UPCAST=False, PLANE=L.DROP_PLANE, SUB_M=L.DOWN_LAUNCH["sub_m"],
                                SEED_FROM_PTR=True, ALL_ROWS=False),
                           dict(num_warps=L.DOWN_LAUNCH["warps"], num_stages=L._DOWN_STAGES), arch=90)
        out["with_s" if dot else "mask_only"] = {"regs": r["regs"], "spill_bytes": r["spill_bytes"]}
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_lora_down_with_a_device_seed_compiles_for_sm90(tmp_path):
    """The seed as a device tensor (what a CUDA-graph capture passes: ``lora_bench``'s graphed case): the H200
    run of 2026-11-30 failed to compile it ("initial value for `seed` is of type pointer<int64>, but the then
    block redefines it as int64") - the interpreter never type-checks, so only a real backend compile shows it."""
    res = run_sm90_script(SEED_PTR_SCRIPT, tmp_path)
    for name in ("with_s", "mask_only"):
        assert res[name]["regs"] > 0 and res[name]["spill_bytes"] == 0, (name, res)
