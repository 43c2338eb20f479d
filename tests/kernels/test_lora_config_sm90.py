"""The LoRA GEMM launched with explicit GemmConfigs (Twill's plan config and sweep points) compiles for an H100
(sm_90) without a GPU, with Triton's bundled ptxas, and the compiled kernel has the config's knobs: shared-memory
pipeline depth = num_stages, num_warps, ``.maxnreg`` in the PTX, warpgroup MMA. The compile options are the
ones the launcher passes (``lora._config_launch``). Subprocess, since this test session sets TRITON_INTERPRET=1."""
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
    from adasched.kernels.gemm import GemmConfig

    def comp(consts, opts):
        fn = L._lora_gemm_kernel
        sig = {n: ("constexpr" if n in consts else TYPES[n]) for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts}
        k = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts)
        g = k.asm["ttgir"]
        return {"stages": max([int(m) for m in re.findall(r"memdesc<(\\d+)x\\d+x\\d+x", g)] or [1]),
                "warps": int(re.findall(r'"ttg.num-warps" = (\\d+)', g)[0]), "wgmma": "warp_group_dot" in g,
                "maxnreg": int((re.findall(r"\\.maxnreg (\\d+)", k.asm["ptx"]) or [0])[0])}

    bf = "*bf16"
    TYPES = dict(X=bf, W=bf, L="*fp32", P=bf, MASK="*u8", BIAS=bf, OUT=bf, TABLE="*i64", FTABLE="*fp32",
                 n_tiles="i32", OUT_DIM="i32", RED_DIM="i32", m_bucket="i32", stride_xm="i32", stride_wr="i32",
                 stride_wo="i32", stride_lm="i32", stride_pr="i32", stride_po="i32", stride_mm="i32",
                 stride_om="i32")
    out = []
    for cfg in [GemmConfig(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=4, maxnreg=240),
                GemmConfig(block_m=128, block_n=256, block_k=64, num_stages=4, num_warps=8),
                GemmConfig(block_m=128, block_n=128, block_k=64, num_stages=2, num_warps=8)]:
        consts, opts = L._config_launch(cfg, interpret=False)
        consts.update(BLOCK_M=cfg.block_m, BLOCK_R=16, UPCAST=False)
        fwd = comp(dict(consts, HAS_BIAS=True, HAS_MASK=False, APPLY_SCALE=True, stride_wr=1, stride_pr=1), opts)
        dx = comp(dict(consts, HAS_BIAS=False, HAS_MASK=True, APPLY_SCALE=False, stride_wo=1, stride_po=1), opts)
        out.append({"cfg": cfg.as_dict(), "fwd": fwd, "dx": dx})
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_lora_gemm_compiles_with_the_configs_knobs_for_sm90(tmp_path):
    res = run_sm90_script(SCRIPT, tmp_path)
    assert len(res) == 3
    for r in res:
        cfg = r["cfg"]
        want = {"stages": cfg["num_stages"], "warps": cfg["num_warps"], "wgmma": True, "maxnreg": cfg["maxnreg"] or 0}
        assert r["fwd"] == want and r["dx"] == want, r
