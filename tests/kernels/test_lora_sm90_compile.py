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
    import json, re
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from adasched.kernels import lora as L

    def comp(fn, types, consts, opts, nodiv=()):
        # mirror the JIT's specialisation: 16-divisible pointers and sizes (K, N, strides are multiples of 16)
        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and n not in nodiv}
        k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
        g = k.asm["ttgir"]
        return {"stages": max([int(m) for m in re.findall(r"memdesc<(\\d+)x\\d+x\\d+x", g)] or [1]),
                "wgmma": "warp_group_dot" in g, "async": "async_copy" in g or "async_tma" in g,
                **ptxas_report(k.asm["ptx"])}

    def ptxas_report(ptx):
        # Triton's bundled ptxas, verbose: registers, spills and the wgmma-serialisation warning (C7515)
        import os, subprocess, tempfile
        exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            open(src, "w").write(ptx)
            err = subprocess.run([exe, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.o")],
                                 capture_output=True, text=True).stderr
        spills = [int(v) for v in re.findall(r"(\\d+) bytes spill stores", err)]
        return {"spill_bytes": max(spills or [-1]), "wgmma_serialized": "C7515" in err}

    bf = "*bf16"
    out = {}
    down = dict(X=bf, A=bf, S="*fp32", XD=bf, MASK="*u8", TABLE="*i64", FTABLE="*fp32", seed="i32", K="i32",
                stride_xm="i32", stride_ar="i32", stride_sm="i32", stride_dm="i32", stride_mm="i32")
    out["down_dropout"] = comp(L._lora_down_kernel, down, dict(SPLIT_K=4, BLOCK_M=128, BLOCK_K=64, BLOCK_R=16,
                               HAS_DROPOUT=True, UPCAST=False), dict(num_warps=4, num_stages=3), nodiv=("seed",))
    gemm = dict(X=bf, W=bf, L="*fp32", P=bf, MASK="*u8", BIAS=bf, OUT=bf, TABLE="*i64", FTABLE="*fp32",
                n_tiles="i32", OUT_DIM="i32", RED_DIM="i32", m_bucket="i32", stride_xm="i32", stride_wr="i32",
                stride_wo="i32", stride_lm="i32", stride_pr="i32", stride_po="i32", stride_mm="i32", stride_om="i32")
    base = dict(BLOCK_M=128, BLOCK_O=256, BLOCK_RED=64, BLOCK_R=16, GROUP_M=8, UPCAST=False, WARP_SPECIALIZE=False)
    out["gemm_fwd"] = comp(L._lora_gemm_kernel, gemm, dict(base, HAS_BIAS=True, HAS_MASK=False, APPLY_SCALE=True,
                           stride_wr=1, stride_pr=1), dict(num_warps=8, num_stages=3))
    out["gemm_dx"] = comp(L._lora_gemm_kernel, gemm, dict(base, HAS_BIAS=False, HAS_MASK=True, APPLY_SCALE=False,
                          stride_wo=1, stride_po=1), dict(num_warps=8, num_stages=3))
    dy = dict(DY=bf, S="*fp32", B=bf, DS="*fp32", DB="*fp32", DBIAS="*fp32", TABLE="*i64", FTABLE="*fp32",
              N="i32", stride_dym="i32", stride_sm="i32", stride_bn="i32", stride_dsm="i32", stride_dbn="i32")
    out["dy"] = comp(L._lora_dy_kernel, dy, dict(SPLIT_N=2, BLOCK_M=128, BLOCK_N=64, BLOCK_R=64, HAS_DBIAS=True,
                     UPCAST=False), dict(num_warps=4, num_stages=3))
    # the dX GEMM with the dropout mask needs a second output tile for the masked LoRA term: a 128x128 tile on
    # 8 warps holds both without spilling (the autotuner's other tiles may spill there)
    out["gemm_dx_128"] = comp(L._lora_gemm_kernel, gemm, dict(base, BLOCK_O=128, HAS_BIAS=False, HAS_MASK=True,
                              APPLY_SCALE=False, stride_wo=1, stride_po=1), dict(num_warps=8, num_stages=3))
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
    for name in ("down_dropout", "dy"):
        assert res[name]["wgmma"] and res[name]["async"] and res[name]["stages"] >= 2, (name, res[name])


WS_SCRIPT = textwrap.dedent('''
    import json
    import triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from adasched.kernels import lora as L

    bf = "*bf16"
    types = dict(X=bf, W=bf, L="*fp32", P=bf, MASK="*u8", BIAS=bf, OUT=bf, TABLE="*i64", FTABLE="*fp32",
                 n_tiles="i32", OUT_DIM="i32", RED_DIM="i32", m_bucket="i32", stride_xm="i32", stride_wr="i32",
                 stride_wo="i32", stride_lm="i32", stride_pr="i32", stride_po="i32", stride_mm="i32",
                 stride_om="i32")
    fn = L._lora_gemm_kernel
    out = {}
    for cc in (100, 90):
        for mask in (False, True):
            consts = dict(BLOCK_M=128, BLOCK_O=128, BLOCK_RED=64, BLOCK_R=16, GROUP_M=8, UPCAST=False,
                          HAS_BIAS=False, HAS_MASK=mask, APPLY_SCALE=not mask, WARP_SPECIALIZE=True,
                          **({"stride_wo": 1, "stride_po": 1} if mask else {"stride_wr": 1, "stride_pr": 1}))
            sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts}
            k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", cc, 32),
                               options=dict(num_warps=4, num_stages=3))
            out[f"sm{cc}{'_mask' if mask else ''}"] = {"partitions": "ttg.warp_specialize" in k.asm["ttgir"],
                                                      "tcgen05": "tcgen05" in k.asm["ptx"]}
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_lora_gemm_warp_specialized_compiles_for_sm100(tmp_path):
    """Twill's Blackwell plans set warp_specialize: the LoRA GEMM's K loop then splits into producer/consumer
    partitions on sm_100 (tcgen05 MMAs), forward and masked dX alike; Hopper compiles the same source unsplit."""
    res = run_sm90_script(WS_SCRIPT, tmp_path)
    assert res["sm100"] == res["sm100_mask"] == {"partitions": True, "tcgen05": True}, res
    assert res["sm90"]["partitions"] is False and res["sm90_mask"]["partitions"] is False, res
