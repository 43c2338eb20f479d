"""Hazards the Triton interpreter hides and a GPU would hit: TF32 products on fp32 operands, int32 offsets of huge
operands, operand dtypes the GPU refuses to multiply, the autotuner's key. Each test fails on the code before its
fix; the compile test lowers the kernels for sm_90 without a GPU (Triton's own compiler and ptxas)."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from sm90_helpers import run_sm90_script

pytest.importorskip("triton")

from adasched.kernels import gemm as G  # noqa: E402
from adasched.kernels import lora as L  # noqa: E402
from adasched.kernels import moe as M  # noqa: E402

F32_SCRIPT = textwrap.dedent('''
    import json
    from adasched.kernels import gemm as G, lora as L, moe as M
    from adasched.kernels.aot import SIGNATURES, compile_report

    def f32(kind):
        return {k: ("*fp32" if v == "*bf16" else v) for k, v in SIGNATURES[kind].items()}

    out = {}
    def rep(name, fn, kind, consts, opts, nodiv=()):
        r = compile_report(fn, f32(kind), consts, opts, arch=90, no_divisibility=nodiv)
        out[name] = {"prec": r["dot_precisions"], "mma": r["mma"]}

    # the dX GEMM with the dropout mask: the K loop (_mma) and the masked epilogue's LoRA product (dot_new)
    rep("lora_gemm_dx", L._lora_gemm_kernel, "lora_gemm", dict(BLOCK_M=64, BLOCK_O=64, BLOCK_RED=32, BLOCK_R=16,
        GROUP_M=8, UPCAST=False, HAS_BIAS=False, HAS_MASK=True, APPLY_SCALE=False, stride_wo=1, stride_po=1,
        EPI_WARPS=4), dict(num_warps=4, num_stages=2))
    rep("lora_dy", L._lora_dy_kernel, "lora_dy", dict(SPLIT_N=2, BLOCK_M=64, BLOCK_N=32, BLOCK_R=16,
        HAS_DBIAS=False, UPCAST=False), dict(num_warps=4, num_stages=2), ("db_copies",))
    rep("gemm", G._gemm_kernel, "gemm", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, WARP_SPECIALIZE=False,
        UPCAST=False, stride_ak=1, stride_bn=1, stride_cn=1), dict(num_warps=4, num_stages=2))
    rep("moe_mm", M._grouped_mm_kernel, "moe_mm", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, CAST_F32=False, sxk=1,
        swn=1, syn=1), dict(num_warps=4, num_stages=2))
    print(json.dumps(out))
''')


def test_fp32_operands_multiply_in_ieee_fp32_not_tf32(tmp_path):
    """Triton's default precision for fp32 tl.dot on NVIDIA GPUs is TF32 (10-bit mantissa, ~1e-3 relative), which
    torch's fp32 matmul does not use by default and the interpreter does not emulate: fp32 LoRA / GEMM / MoE
    results would have been ~1e-3 off on a GPU while every CPU test passed at 1e-5. Compiled for sm_90, fp32
    dots now carry no TF32 precision and lower to FMA (before: inputPrecision = tf32, warpgroup MMA)."""
    got = run_sm90_script(F32_SCRIPT, tmp_path)
    assert set(got) == {"lora_gemm_dx", "lora_dy", "gemm", "moe_mm"}
    for name, r in got.items():
        assert "tf32" not in r["prec"], (name, r)
        assert r["mma"] == "fma", (name, r)


def test_gemm_indexes_in_int64_where_offsets_reach_2_31():
    """``_gemm_kernel`` computed ``offs_m * stride_am`` in int32 (Triton passes sizes and strides below 2**31 as
    int32; the interpreter wraps int32 as the GPU does). An operand of >= 2**31 elements (T=131072 x K=16384)
    wrapped to a negative offset: an out-of-bounds read on a GPU. The launcher now switches such launches to int64
    indices (``_offs_64``, shapes checked on meta tensors: nothing allocated); the int64 variant computes the
    same product."""
    big = torch.empty((131072, 16384), device="meta", dtype=torch.bfloat16)
    small = torch.empty((16384, 64), device="meta", dtype=torch.bfloat16)
    assert G._offs_64(big, small) and G._offs_64(small, big.t()) and not G._offs_64(small, small.t())
    assert not G._offs_64(torch.empty((8192, 8192), device="meta"))
    # the ragged tile's masked addresses count: 2**31 - 1 elements plus a tile's overshoot
    assert G._offs_64(torch.empty((2 ** 31 - 1024, 1), device="meta"))

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(37, 40, generator=g), torch.randn(40, 29, generator=g)
    c = torch.empty(37, 29)
    for offs_64 in (False, True):
        c.fill_(float("nan"))
        G._gemm_kernel[(triton_cdiv(37, 16) * triton_cdiv(29, 16),)](
            a, b, c, 37, 29, 40, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
            BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, WARP_SPECIALIZE=False, UPCAST=True, OFFS_64=offs_64)
        torch.testing.assert_close(c, a @ b, atol=1e-5, rtol=1e-5)


def test_gemm_int64_indices_cover_the_k_axis():
    """Hunt finding: OFFS_64 widened offs_m and offs_n only; ``offs_k * stride_bk`` and the K step
    ``BLOCK_K * stride_bk`` stayed int32, so a B whose rows are >= 2**31 / BLOCK_K elements apart (a [K, N] B with
    N >= 33.5M, or its slice) read from ~2**32 elements before B from the second K tile on. An 8.6 GB fp16 storage
    (virtual: only B's 65 rows and the wrapped row are touched) puts a B row stride past that bound; the wrapped
    address holds different values, so the old kernel's result differs in every element. (Small integers in fp16:
    every product and sum exact; int8 operands, used here before, are refused by gemm now.)"""
    rng = np.random.default_rng()
    S, O = 2 ** 31 // 64 + 1, 2 ** 31  # B's row stride; its storage offset (the wrapped row lands inside storage)
    M, N, K = 16, 16, 65
    store = torch.empty(O + 64 * S + N, dtype=torch.float16)
    b = store.as_strided((K, N), (S, 1), O)
    dense = torch.from_numpy(rng.integers(-1, 2, (K, N)).astype(np.float16))
    b.copy_(dense)
    store[64:64 + N] = torch.from_numpy(rng.integers(40, 60, N).astype(np.float16))  # what a wrapped row-64 reads
    a = torch.from_numpy(rng.integers(0, 2, (M, K)).astype(np.float16))
    a[:, 64] = 1  # every row uses B's row 64, the one behind the wrapped address
    assert G._offs_64(a, b)
    c = G.gemm(a, b, G.GemmConfig(block_m=16, block_n=16, block_k=64))
    torch.testing.assert_close(c.float(), a.float() @ dense.float(), rtol=0, atol=0)


def test_lora_forward_weight_offsets_are_int64():
    """Hunt finding: the fused LoRA forward's weight pointer was ``outs * stride_wo`` in int32 - for a frozen
    weight of >= 2**31 elements (N x K, stride K) output column n read from n K - 2**32: other memory, or a fault.
    A [3, 16] fp16 weight whose rows are 2**30 + 16 apart (8 GiB virtual storage, a few pages touched) puts row 2
    past 2**31; the wrapped address holds zeros, so the old kernel's third column was off by the whole product."""
    rng = np.random.default_rng()
    K, N, T = 16, 3, 16
    S, off = 2 ** 30 + 16, 2 ** 31
    store = torch.empty(off + 2 * S + K, dtype=torch.float16)
    w = store.as_strided((N, K), (S, 1), storage_offset=off)
    w.copy_(torch.from_numpy(rng.standard_normal((N, K)).astype(np.float16)))
    store[32:32 + K] = 0  # where row 2 lands when 2 S wraps in int32
    x = torch.from_numpy(rng.standard_normal((T, K)).astype(np.float16))
    a = torch.from_numpy(rng.standard_normal((4, K)).astype(np.float16))
    b = torch.from_numpy(rng.standard_normal((N, 4)).astype(np.float16))
    y = L.lora_linear(x, w, a, b, scale=0.5, base_gemm="triton")
    ref = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-2)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_interpreter_wraps_int32_products_like_the_gpu():
    """Why the int64 cast matters and why the interpreter can test it: its int32 arithmetic wraps (numpy int32),
    as the GPU's does - an int32 row index times a stride past 2**31 goes negative in both."""
    import triton
    import triton.language as tl

    @triton.jit
    def wrap(O, stride, WIDE: tl.constexpr):
        r = tl.arange(0, 16)
        if WIDE:
            r = r.to(tl.int64)
        tl.store(O + tl.arange(0, 16), (r * stride).to(tl.int64))

    out = torch.zeros(16, dtype=torch.int64)
    wrap[(1,)](out, 2 ** 28, WIDE=False)
    assert out[8].item() == -2 ** 31
    wrap[(1,)](out, 2 ** 28, WIDE=True)
    assert out.tolist() == [i * 2 ** 28 for i in range(16)]


def test_moe_expert_gemms_refuse_mixed_operand_dtypes():
    """tl.dot and torch._grouped_mm refuse operands of two dtypes on a GPU; under the interpreter the MoE kernels
    cast both to float32 first, so bf16 rows times fp32 expert weights ran on the CPU and would fail to compile
    on the GPU. The launchers now raise the same error everywhere."""
    counts = torch.tensor([3, 0, 2])
    idx = M.make_index(torch.tensor([0, 1, 2, 0, 1]), counts, 3)
    x = torch.randn(5, 16).to(torch.bfloat16)
    w = torch.randn(3, 16, 16)
    with pytest.raises(ValueError, match="grouped_mm: operand dtypes differ"):
        M.grouped_mm_triton(x, w, idx)
    with pytest.raises(ValueError, match="grouped_wgrad: operand dtypes differ"):
        M.grouped_wgrad_triton(x, torch.randn(5, 16), idx, 3)
    y = M.grouped_mm_triton(x, w.to(torch.bfloat16), idx)  # one dtype: runs
    torch.testing.assert_close(y.float(), M.grouped_mm_ref(x.float(), w.to(torch.bfloat16).float(), idx),
                               atol=3e-2, rtol=2e-2)


def test_lora_gemm_autotune_key_separates_masked_and_bias_variants():
    """Triton's autotuner keys on the listed arguments and tensor dtypes only: the dX GEMM with the dropout mask
    (a second fp32 epilogue tile) reused whatever tile the unmasked dX had been tuned to, and the forward with a
    bias the one without. The key lists the flags (the tuners exist only off the interpreter: checked here on
    the key they are built from)."""
    assert {"HAS_MASK", "HAS_BIAS"} <= set(L.GEMM_TUNE_KEY)
    params = set(L._lora_gemm_kernel.arg_names)
    assert set(L.GEMM_TUNE_KEY) <= params  # every key names a kernel argument (an unknown name is ignored)


def test_dropout_seed_is_not_specialised():
    """Triton specialises int arguments equal to 1 (a constant) and divisible by 16 (an alignment hint): each is
    another compiled variant. The per-call dropout seed made the dropout kernel recompile during training (the
    first seed divisible by 16, ~1-5 s on sm_90) and could trigger a compile inside a CUDA-graph capture; the
    interpreter compiles nothing, so no CPU run showed it. The seed is now a do_not_specialize argument."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    keys = {native_specialize_impl(BaseBackend, v, False, True, True) for v in (5, 16, 1)}
    assert len(keys) == 3  # the premise: three seeds, three variants when specialised
    assert native_specialize_impl(BaseBackend, 16, False, False, True) == \
        native_specialize_impl(BaseBackend, 5, False, False, True)  # not specialised: one
    # interpreter mode keeps the decorator's arguments (a GPU build keeps them per parameter: KernelParam)
    assert "seed" in (L._lora_down_kernel.kwargs.get("do_not_specialize") or [])


def test_masked_epilogue_never_splits_into_halves_narrower_than_16():
    """The dX epilogue's column-half split (big accumulators) made a tl.dot with N = BLOCK_O / 2: at block_n=16
    (a legal GemmConfig, e.g. block_m=256 on 1 warp) that is N = 8, which Triton versions with a minimum dot size
    of 16 refuse to compile and the interpreter accepts. The rule now keeps such tiles full width; the tiles the
    autotuner and the sweeps use (64..256 columns) are unchanged."""
    assert not L.epi_split(256, 16, 1) and not L.epi_split(512, 16, 2)
    assert L.epi_split(256, 32, 2)  # halves of 16: allowed
    assert [L.epi_split(128, bo, w) for bo, w in ((256, 8), (128, 4), (128, 8), (64, 4))] == [True, True, False, False]


def test_multi_lora_wider_adapters_take_peft_numerics_with_the_kernel_mask():
    """A packed batch on a bf16 input whose adapters are fp32 (one bf16, one without rows): each segment's LoRA
    term in its adapter's dtype (PEFT's numerics), the dropout mask drawn by the dropout kernel - bit-identical to
    the torch reference, which draws it with the Philox mirror - and the fp32 adapters' gradients at fp32
    accuracy against float64 (the bf16 inputs are exact there); the adapter without rows gets zero gradients."""
    g = torch.Generator().manual_seed(4)
    T, K, N = 45, 40, 24

    def rnd(*shape, dt=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    x = rnd(T, K, dt=torch.bfloat16)
    w = rnd(N, K, dt=torch.bfloat16, scale=K ** -0.5)
    specs = ((4, torch.float32, 0.2), (2, torch.bfloat16, 0.0), (3, torch.float32, 0.1))
    ads = [L.LoRAAdapterWeights(rnd(r, K, dt=dt, scale=0.3).requires_grad_(), rnd(N, r, dt=dt, scale=0.3)
                                .requires_grad_(), 1.5 + i, p) for i, (r, dt, p) in enumerate(specs)]
    segs = [(1, 30, 41), (0, 3, 27)]  # adapter 2 has no rows; rows 0-2, 27-29 and 41-44 are base only
    dy = rnd(T, N, dt=torch.bfloat16)
    leaves = [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
    y = L.multi_lora_linear(x, w, ads, segs, seed=2 ** 31 + 77)
    y_ref = L.multi_lora_linear_reference(x, w, ads, segs, seed=2 ** 31 + 77)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    got, want = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, atol=0, rtol=0)
    assert all(bool((t == 0).all()) for t in got[4:])  # adapter 2: zero gradients, not None
    # adapter 0 (fp32) against float64 with the same mask
    keep = L.dropout_keep_mask(2 ** 31 + 77, T, K, 0.2)[3:27].double()
    a64, b64 = ads[0].lora_a.detach().double(), ads[0].lora_b.detach().double()
    xd = x[3:27].double() * keep / 0.8
    s64 = xd @ a64.t()
    db64 = 1.5 * dy[3:27].double().t() @ s64
    da64 = 1.5 * (dy[3:27].double() @ b64).t() @ xd
    for u, v in ((got[0], da64), (got[1], db64)):
        assert u.dtype == torch.float32
        assert ((u.double() - v).norm() / v.norm()).item() < 1e-6
