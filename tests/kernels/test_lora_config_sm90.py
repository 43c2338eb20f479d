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
    import json
    from adasched.kernels import lora as L
    from adasched.kernels.aot import SIGNATURES, compile_report
    from adasched.kernels.gemm import GemmConfig

    def comp(consts, opts):
        r = compile_report(L._lora_gemm_kernel, SIGNATURES["lora_gemm"], consts, opts, arch=90)
        return {"stages": r["stages"], "warps": r["num_warps"], "wgmma": r["mma"] == "wgmma", "maxnreg": r["maxnreg"]}

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
