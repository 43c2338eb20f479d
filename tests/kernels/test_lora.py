"""Fused LoRA kernels under TRITON_INTERPRET=1 against the torch reference (same dtype) and a float64 reference."""
from __future__ import annotations

import collections
import warnings

import pytest
import torch
from kernel_spy import KernelSpy
from torch.utils._python_dispatch import TorchDispatchMode

from adasched.kernels import lora as L
from adasched.kernels.lora import (
    LoRAAdapterWeights,
    dropout_keep_mask,
    keep_threshold,
    lora_linear,
    lora_linear_reference,
    multi_lora_linear,
    multi_lora_linear_reference,
    philox4x32,
    philox_uint32,
)

# (dtype, atol, rtol) against the float64 reference; same-dtype reference comparisons use the same numbers. float16:
# the kernels round once at the store (at most 5.8e-4 measured, h49); a bfloat16 store (>= 1.4e-3) or an output in
# another dtype does not pass (the old 1e-2, doubled for gradients, passed both). GRAD: the gradients' factor.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-3, 1e-3)}
GRAD = {torch.float32: 2, torch.float16: 1}


def assert_all_close(name: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
                     dtype: torch.dtype | None = None) -> None:
    """Every element compared (``dtype``: also got's dtype); on failure report the mismatch count and the first bad
    indices."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert dtype is None or got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    g, r = got.detach().double(), ref.detach().double()
    atol = atol * max(1.0, r.abs().max().item())  # sums with cancellation: absolute error scales with the terms
    bad = ~torch.isclose(g, r, atol=atol, rtol=rtol)  # NaN (an unwritten poisoned element) counts as bad
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; first at {idx}: "
                             f"got {[g[tuple(i)].item() for i in idx]} ref {[r[tuple(i)].item() for i in idx]}")


def _rand(*shape, dtype, scale=1.0, grad=False):
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def _leaf64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the ``with`` block (``.ops``: name -> calls)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))



def test_philox_mirror_is_bit_exact_with_triton_randint():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def _draw(OUT, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        w0, w1, w2, w3 = tl.randint4x(seed, offs)
        ok = offs < n
        tl.store(OUT + offs * 5, tl.randint(seed, offs).to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(OUT + offs * 5 + 1, w0.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(OUT + offs * 5 + 2, w1.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(OUT + offs * 5 + 3, w2.to(tl.int64) & 0xFFFFFFFF, mask=ok)
        tl.store(OUT + offs * 5 + 4, w3.to(tl.int64) & 0xFFFFFFFF, mask=ok)

    for seed in (0, 12345, 2 ** 31 + 77):
        n = 300
        out = torch.empty(n, 5, dtype=torch.int64)
        _draw[(triton.cdiv(n, 64),)](out, seed, n, BLOCK=64)
        words = philox4x32(seed, torch.arange(n))
        want = torch.stack([philox_uint32(seed, torch.arange(n)), *words], dim=1)
        assert torch.equal(out, want), f"seed {seed}: {int((out != want).sum())} of {out.numel()} words differ"
        assert len(set(out[:, 1].tolist())) == n  # distinct counters give distinct draws


def test_dropout_mask_reproducible_and_matches_kernel():
    T, K, p = 29, 48, 0.3
    m1 = dropout_keep_mask(99, T, K, p)
    assert torch.equal(m1, dropout_keep_mask(99, T, K, p))
    assert not torch.equal(m1, dropout_keep_mask(100, T, K, p))
    assert abs(1.0 - m1.float().mean().item() - p) < 0.06  # 1392 draws
    # the kernel's own mask and Xd, straight from the forward launcher
    x = _rand(T, K, dtype=torch.float32)
    w = _rand(40, K, dtype=torch.float32)
    a, b = _rand(4, K, dtype=torch.float32), _rand(40, 4, dtype=torch.float32)
    plan = L._tile_plan(T, ((0, 0, T),), (4,), (1.0,), (p,), 16, x.device)
    _, _, xd, mask = L._fused_forward(x, w, None, a, b, plan, 99)
    assert mask.shape == (T, L.mask_bytes(K)) and mask.dtype == torch.uint8  # packed bits
    assert torch.equal(L.unpack_keep_bits(mask, K), m1)
    assert_all_close("xd", xd, x * m1 / (1 - p), 1e-6, 1e-6)
    # seed=None draws from torch's generator: reproducible under manual_seed
    torch.manual_seed(5)
    y1 = lora_linear(x, w, a, b, 1.0, 0.5)
    torch.manual_seed(5)
    y2 = lora_linear_reference(x, w, a, b, 1.0, 0.5)
    assert_all_close("seed=None", y1, y2, 1e-5, 1e-5)
    # ... a 64-bit draw (an int64 kernel argument, ~2**62 values: long runs do not repeat masks)
    torch.manual_seed(5)
    drawn = int(torch.randint(*L.SEED_DRAW_RANGE, (1,)).item())
    assert 2 ** 31 <= drawn < 2 ** 63
    assert_all_close("seed=None is the 64-bit draw", y1, lora_linear_reference(x, w, a, b, 1.0, 0.5, seed=drawn),
                     1e-5, 1e-5)


def test_dropout_layout_spans_blocks_and_partial_planes():
    """K = 300: a full 256-column block and a partial one (planes 0-1 partly, 2-7 empty); the mask-only launch
    (HAS_DOT=False, used by base_gemm="torch_all") draws the same Xd and bits as the fused one."""
    T, K, p = 19, 300, 0.4
    x = _rand(T, K, dtype=torch.float32)
    a = _rand(8, K, dtype=torch.float32)
    plan = L._tile_plan(T, ((0, 0, T),), (8,), (1.0,), (p,), 16, x.device)
    s, xd, mask = L._down(x, a, plan, 7, with_s=True)
    s2, xd2, mask2 = L._down(x, a, plan, 7, with_s=False)
    keep = dropout_keep_mask(7, T, K, p)
    assert mask.shape == (T, 64) and s2 is None
    assert torch.equal(L.unpack_keep_bits(mask, K), keep) and torch.equal(mask2, mask)
    assert_all_close("xd", xd, x * keep / (1 - p), 1e-6, 1e-6)
    assert torch.equal(xd2, xd)
    assert_all_close("S", s[:, :8], (x * keep / (1 - p)) @ a.t(), 2e-5, 2e-5)
    # the mirror's layout, spelled out for one element: column 77 is block 0, plane 2, lane 13 -> word 1 of
    # counter row*128 + 0*64 + 0*32 + 13; byte 13 bit 2 of the row
    u = L.dropout_uniforms(7, T, K)
    row = 5
    assert u[row, 77].item() == philox4x32(7, torch.tensor([row * 128 + 13]))[1].item()
    assert ((mask[row, 13].item() >> 2) & 1) == int(u[row, 77].item() >= keep_threshold(p))
    # column 290: block 1, plane 1 (h = 1, word 0), lane 2 -> counter row*128 + 64 + 32 + 2
    assert u[row, 290].item() == philox4x32(7, torch.tensor([row * 128 + 98]))[0].item()
    assert abs(1.0 - keep.float().mean().item() - p) < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p,with_bias,r", [(0.0, True, 4), (0.25, False, 8), (0.1, True, 8)])
def test_lora_linear_matches_references(dtype, p, with_bias, r):
    atol, rtol = TOL[dtype]
    T, K, N = 37, 48, 40
    x = _rand(T, K, dtype=dtype, grad=True)
    w = _rand(N, K, dtype=dtype, scale=K ** -0.5)
    a = _rand(r, K, dtype=dtype, scale=K ** -0.5, grad=True)
    b = _rand(N, r, dtype=dtype, scale=0.5, grad=True)
    bias = _rand(N, dtype=dtype, grad=True) if with_bias else None
    scale, seed = 1.75, 4242
    leaves = [t for t in (x, a, b, bias) if t is not None]

    y = lora_linear(x, w, a, b, scale, p, bias, seed=seed)
    dy = _rand(T, N, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    y_ref = lora_linear_reference(x, w, a, b, scale, p, bias, seed=seed)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    leaves64 = [_leaf64(t) for t in leaves]
    x64, a64, b64 = leaves64[:3]
    bias64 = leaves64[3] if with_bias else None
    y64 = lora_linear_reference(x64, w.double(), a64, b64, scale, p, bias64, seed=seed)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())

    names = ["dx", "dA", "dB", "dbias"]
    assert_all_close("y vs ref", y, y_ref, atol, rtol, dtype)
    assert_all_close("y vs f64", y, y64, atol, rtol, dtype)
    f = GRAD[dtype]
    for n, g, gr, g64 in zip(names, grads, grads_ref, grads64):
        assert_all_close(f"{n} vs ref", g, gr, atol * f, rtol * f, dtype)
        assert_all_close(f"{n} vs f64", g, g64, atol * f, rtol * f, dtype)
    if dtype == torch.float32:
        rel = (y.double() - y64).norm() / y64.norm()
        assert rel < 1e-5, rel


@pytest.mark.parametrize("split", [1, -1])
def test_masked_dx_epilogue_split_and_unsplit_match_float64(monkeypatch, split):
    """The dX GEMM's masked LoRA term, per column half (EPI_SPLIT=1: the interpreter's 16-wide tiles in halves
    of 8) and full width (-1: the rule, which does not split tiles this small): every element of dx against
    float64, K = 300 so the tiles cross the mask's 256-column blocks and end in a partial one."""
    monkeypatch.setattr(L, "_INTERPRET_EPI_SPLIT", split)
    atol, rtol = TOL[torch.float32]
    T, K, N, r, p = 40, 300, 24, 8, 0.3
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=K ** -0.5)
    a = _rand(r, K, dtype=torch.float32, scale=K ** -0.5, grad=True)
    b = _rand(N, r, dtype=torch.float32, scale=0.5, grad=True)
    dy = _rand(T, N, dtype=torch.float32)
    y = lora_linear(x, w, a, b, 1.5, p, seed=77, base_gemm="triton")
    (dx,) = torch.autograd.grad(y, [x], dy)
    x64 = _leaf64(x)
    y64 = lora_linear_reference(x64, w.double(), a.double(), b.double(), 1.5, p, seed=77)
    (dx64,) = torch.autograd.grad(y64, [x64], dy.double())
    assert_all_close(f"dx split={split}", dx, dx64, atol * 2, rtol * 2)


def test_epi_split_override_needs_a_config():
    T, K, N = 16, 32, 16
    plan = L._tile_plan(T, ((0, 0, T),), (4,), (1.0,), (0.0,), 16, torch.device("cpu"))
    x, w = torch.randn(T, K), torch.randn(N, K)
    with pytest.raises(ValueError, match="epi_split: only with an explicit config"):
        L._gemm(x, w, w.stride(1), w.stride(0), torch.zeros(T, 16), torch.randn(N, 4), 1, N, None, None,
                torch.empty(T, N), plan, N, K, apply_scale=True, backward=False, epi_split=1)


def test_epi_split_rule():
    # split where the fp32 accumulator alone takes >= 128 registers per thread
    assert L.epi_split(128, 256, 8) and L.epi_split(128, 128, 4) and L.epi_split(256, 128, 8)
    assert not L.epi_split(128, 128, 8) and not L.epi_split(128, 64, 4) and not L.epi_split(16, 16, 4)


def test_lora_linear_batched_input_and_partial_grads():
    """x [B, S, K]; only lora_a/lora_b require grad (frozen activations), then only x (frozen adapter)."""
    K, N, r = 24, 33, 4
    x = _rand(2, 19, K, dtype=torch.float32)
    w = _rand(N, K, dtype=torch.float32, scale=0.2)
    a = _rand(r, K, dtype=torch.float32, scale=0.2, grad=True)
    b = _rand(N, r, dtype=torch.float32, grad=True)
    y = lora_linear(x, w, a, b, 0.5, 0.2, seed=1)
    assert y.shape == (2, 19, N)
    yr = lora_linear_reference(x, w, a, b, 0.5, 0.2, seed=1)
    dy = _rand(2, 19, N, dtype=torch.float32)
    for n, g, gr in zip(["dA", "dB"], torch.autograd.grad(y, (a, b), dy), torch.autograd.grad(yr, (a, b), dy)):
        assert_all_close(n, g, gr, 1e-5, 1e-5)
    xg = x.clone().requires_grad_()
    a2, b2 = a.detach(), b.detach()
    (gx,) = torch.autograd.grad(lora_linear(xg, w, a2, b2, 0.5, 0.2, seed=3), (xg,), dy)
    (gxr,) = torch.autograd.grad(lora_linear_reference(xg, w, a2, b2, 0.5, 0.2, seed=3), (xg,), dy)
    assert_all_close("dx", gx, gxr, 1e-5, 1e-5)


@pytest.mark.parametrize("base_gemm", ["triton", "triton-split", "triton-dbcopies", "triton_tma", "torch",
                                       "torch_all"])
@pytest.mark.parametrize("dtype,block_m", [(torch.float32, 16), (torch.float16, 32)])
def test_multi_lora_three_adapters_uncovered_rows(monkeypatch, dtype, block_m, base_gemm):
    """Every output and gradient element against float64, with the base GEMMs in our kernel (LoRA term in the
    accumulator; "triton-split": its masked dX epilogue per column half; "triton-dbcopies": dB summed from 3
    copies) and in torch's GEMM (LoRA term through its C input)."""
    if base_gemm == "triton-split":
        monkeypatch.setattr(L, "_INTERPRET_EPI_SPLIT", 1)
        base_gemm = "triton"
    if base_gemm == "triton-dbcopies":  # the dY kernel spreading its dB adds over 3 copies (tile i -> copy i % 3)
        monkeypatch.setattr(L, "DY_LAUNCH", {**L.DY_LAUNCH, "copies": 3})
        base_gemm = "triton"
    atol, rtol = TOL[dtype]
    T, K, N = 61, 40, 36
    specs = [(4, 0.0, 2.0), (8, 0.3, 0.5), (16, 0.1, 1.25)]  # (rank, dropout, scale)
    adapters = [LoRAAdapterWeights(_rand(r, K, dtype=dtype, scale=0.15, grad=True),
                                   _rand(N, r, dtype=dtype, scale=0.5, grad=True), s, p) for r, p, s in specs]
    # adapter 1 owns two segments; rows [0,3), [21,25), [28,30) are uncovered; segments unsorted on purpose
    segments = [(1, 3, 21), (2, 30, 61), (0, 25, 28), (1, 21, 21), (1, 28, 28)]
    x = _rand(T, K, dtype=dtype, grad=True)
    w = _rand(N, K, dtype=dtype, scale=0.15)
    bias = _rand(N, dtype=dtype)
    leaves = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    spy = KernelSpy(L._lora_gemm_kernel)
    if base_gemm == "triton_tma":  # record whether each big GEMM really read through descriptors
        monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    y = multi_lora_linear(x, w, adapters, segments, bias=bias, seed=11, block_m=block_m, base_gemm=base_gemm)
    dy = _rand(T, N, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    if base_gemm == "triton_tma":  # float16 dY rows of N = 36 are 72 bytes: dX falls back to pointer tiles
        assert [kw["USE_TMA"] for kw in spy.kwargs()] == [True, dtype == torch.float32]

    ads64 = [LoRAAdapterWeights(_leaf64(ad.lora_a), _leaf64(ad.lora_b), ad.scale, ad.dropout_p) for ad in adapters]
    x64 = _leaf64(x)
    leaves64 = [x64] + [t for ad in ads64 for t in (ad.lora_a, ad.lora_b)]
    y64 = multi_lora_linear_reference(x64, w.double(), ads64, segments, bias=bias.double(), seed=11)
    grads64 = torch.autograd.grad(y64, leaves64, dy.double())
    y_ref = multi_lora_linear_reference(x, w, adapters, segments, bias=bias, seed=11)

    assert_all_close("y vs ref", y, y_ref, atol, rtol, dtype)
    assert_all_close("y vs f64", y, y64, atol, rtol, dtype)
    base = x.detach().double() @ w.double().t() + bias.double()
    for s, e in ((0, 3), (21, 25), (28, 30)):
        assert_all_close(f"uncovered rows {s}:{e}", y[s:e], base[s:e], atol, rtol, dtype)
    names = ["dx"] + [f"{n}{i}" for i in range(3) for n in ("dA", "dB")]
    for n, g, g64 in zip(names, grads, grads64):
        assert_all_close(f"{n} vs f64", g, g64, atol * GRAD[dtype], rtol * GRAD[dtype], dtype)


def test_multi_lora_unused_adapter_gets_zero_grad_and_many_adapters():
    T, K, N = 40, 32, 24
    adapters = [LoRAAdapterWeights(_rand(r, K, dtype=torch.float32, scale=0.2, grad=True),
                                   _rand(N, r, dtype=torch.float32, grad=True), 1.0 + i, 0.0)
                for i, r in enumerate((2, 3, 5, 7, 16, 1))]
    segments = [(i, 6 * i, 6 * i + 5) for i in range(5)]  # adapter 5 unused, gaps of one row
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.2)
    leaves = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    y = multi_lora_linear(x, w, adapters, segments)
    yr = multi_lora_linear_reference(x, w, adapters, segments)
    assert_all_close("y", y, yr, 2e-5, 2e-5)
    dy = _rand(T, N, dtype=torch.float32)
    grads_ref = torch.autograd.grad(yr, leaves, dy, allow_unused=True)  # adapter 5 is not in the reference graph
    for i, (g, gr, leaf) in enumerate(zip(torch.autograd.grad(y, leaves, dy), grads_ref, leaves)):
        assert_all_close(f"grad {i}", g, torch.zeros_like(leaf) if gr is None else gr, 2e-5, 2e-5)
    assert torch.count_nonzero(torch.autograd.grad(multi_lora_linear(x, w, adapters, segments),
                                                   adapters[5].lora_a, dy)[0]) == 0


def test_base_gemm_torch_single_adapter_matches_triton_path():
    T, K, N, r = 45, 24, 40, 8
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.2)
    a = _rand(r, K, dtype=torch.float32, scale=0.2, grad=True)
    b = _rand(N, r, dtype=torch.float32, scale=0.5, grad=True)
    dy = _rand(T, N, dtype=torch.float32)
    bias = _rand(N, dtype=torch.float32, grad=True)
    for p in (0.2, 0.0):
        got = {}
        for base in ("triton", "torch", "torch_all"):
            y = lora_linear(x, w, a, b, 2.0, p, bias, seed=5, base_gemm=base)
            got[base] = (y, *torch.autograd.grad(y, (x, a, b, bias), dy))
        for other in ("torch", "torch_all"):
            for name, g1, g2 in zip(("y", "dx", "dA", "dB", "dbias"), got[other], got["triton"]):
                assert_all_close(f"p={p} {name} {other} vs triton", g1, g2, *TOL[torch.float32])
    with pytest.raises(ValueError, match="base_gemm"):
        lora_linear(x, w, a, b, 2.0, base_gemm="cublas")
    from adasched.kernels.gemm import GemmConfig

    for base in ("torch", "torch_all"):
        with pytest.raises(ValueError, match=f"base_gemm: '{base}' cannot take a gemm_config"):
            lora_linear(x, w, a, b, 2.0, base_gemm=base, gemm_config=GemmConfig(block_m=16))
    assert L.resolve_base_gemm("auto", x) == "triton"  # off the GPU "auto" keeps the fully fused kernel
    assert L.resolve_base_gemm("torch", x) == "torch"


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_all_one_segment_of_several_adapters(p):
    """base_gemm="torch_all" with one segment covering every row: the other adapters of the call get zero
    gradients (dA/dB zero-filled only then), no bias, every element against float64."""
    T, K, N = 33, 280, 24
    adapters = [LoRAAdapterWeights(_rand(r, K, dtype=torch.float32, scale=0.1, grad=True),
                                   _rand(N, r, dtype=torch.float32, grad=True), sc, p) for r, sc in ((4, 0.5), (8, 2.0))]
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.1)
    leaves = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    dy = _rand(T, N, dtype=torch.float32)
    y = multi_lora_linear(x, w, adapters, [(1, 0, T)], seed=3, base_gemm="torch_all")
    grads = torch.autograd.grad(y, leaves, dy)
    ads64 = [LoRAAdapterWeights(_leaf64(ad.lora_a), _leaf64(ad.lora_b), ad.scale, ad.dropout_p) for ad in adapters]
    l64 = [_leaf64(x)] + [t for ad in ads64 for t in (ad.lora_a, ad.lora_b)]
    y64 = multi_lora_linear_reference(l64[0], w.double(), ads64, [(1, 0, T)], seed=3)
    g64 = torch.autograd.grad(y64, l64, dy.double(), allow_unused=True)
    assert_all_close("y", y, y64, 2e-5, 2e-5)
    for name, g, leaf, r in zip(("dx", "dA0", "dB0", "dA1", "dB1"), grads, leaves, g64):
        assert_all_close(name, g, torch.zeros_like(leaf) if r is None else r, 4e-5, 4e-5)
    assert torch.count_nonzero(grads[1]) == 0 and torch.count_nonzero(grads[2]) == 0


@pytest.mark.parametrize("base_gemm", ["triton", "torch", "torch_all"])
def test_bias_in_another_dtype_is_cast(base_gemm):
    """A float64 bias on float32 activations works in every mode (cuBLAS takes C in the output dtype)."""
    T, K, N, r = 40, 300, 24, 4
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.1)
    a = _rand(r, K, dtype=torch.float32, scale=0.1, grad=True)
    b = _rand(N, r, dtype=torch.float32, grad=True)
    bias = torch.randn(N, dtype=torch.float64, requires_grad=True)
    ad = [LoRAAdapterWeights(a, b, 1.5, 0.1)]
    y = multi_lora_linear(x, w, ad, [(0, 5, 30)], bias=bias, seed=9, base_gemm=base_gemm)
    assert y.dtype == torch.float32
    dy = _rand(T, N, dtype=torch.float32)
    dbias, = torch.autograd.grad(y, [bias], dy)
    assert dbias.dtype == torch.float64
    ref = multi_lora_linear_reference(x, w, ad, [(0, 5, 30)], bias=bias.detach().float(), seed=9)
    assert_all_close("y", y, ref, 2e-5, 2e-5)
    assert_all_close("dbias", dbias, dy.double().sum(0), 1e-5, 1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("pad", [(0, 0), (3, 5)])
def test_torch_all_one_adapter_host_calls_do_not_grow_with_segments(pad, p):
    """Host cost guard: on a GPU every torch call costs host time (~1 ms per fwd+bwd at T=2048 on the H200 with
    ~20-45 calls), which sets the step time of small shapes. With one adapter whose segments are one run of rows
    "torch_all" runs 8 GEMMs per fwd+bwd whatever the number of segments (S, term, base; P, dB, dA, dX term, dX
    base) - with dropout the dX term is our kernel. Rows before / after the run (``pad``) add the run's views and
    the fills of the uncovered rows (bias or zeros), a fixed count. The per-segment code before took 34 aten ops
    for one segment. Every output and gradient element against float64."""
    from adasched.kernels.lora_bench import HostCallCounter

    T, K, N = 64, 48, 40
    lead, tail = pad
    ads = [LoRAAdapterWeights(_rand(4, K, dtype=torch.float32, grad=True), _rand(N, 4, dtype=torch.float32, grad=True),
                              1.5, p)]
    x, w, dy = _rand(T, K, dtype=torch.float32, grad=True), _rand(N, K, dtype=torch.float32), _rand(T, N, dtype=torch.float32)
    leaves = [x, ads[0].lora_a, ads[0].lora_b]
    ads64 = [LoRAAdapterWeights(_leaf64(ads[0].lora_a), _leaf64(ads[0].lora_b), 1.5, p)]
    l64 = [_leaf64(x), ads64[0].lora_a, ads64[0].lora_b]
    counts = set()
    for nseg in (1, 2, 4):
        cut = [lead + (T - lead - tail) * i // nseg for i in range(nseg + 1)]
        segs = [(0, cut[i], cut[i + 1]) for i in range(nseg)]  # adjacent: one run

        def step():
            return torch.autograd.grad(multi_lora_linear(x, w, ads, segs, seed=4, base_gemm="torch_all"), leaves, dy)

        step()  # builds the tile plan
        with HostCallCounter() as c:
            grads = step()
        drop, partial = p > 0, pad != (0, 0)
        assert c.ops["mm"] + c.ops["addmm_"] == 8 - drop, dict(c.ops)
        assert c.ops["mul_"] == 0 and (c.ops["slice"] == 0 or partial), dict(c.ops)
        # full run: 15 (+ 2 with dropout: the Xd / mask allocations); a partial run adds its views and fills
        assert c.aten_ops <= (33 if partial else 15 + 2 * drop), dict(c.ops)
        assert dict(c.launches) == ({"_lora_down_kernel": 1, "_lora_masked_term_kernel": 1} if drop else {})
        counts.add(c.aten_ops)
        ref = torch.autograd.grad(multi_lora_linear_reference(l64[0], w.double(), ads64, segs, seed=4), l64,
                                  dy.double())
        for g, r in zip(grads, ref):
            assert_all_close("grad", g, r, 4e-5, 4e-5)
    assert len(counts) == 1, counts  # the same host work for 1, 2 and 4 segments


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("segs", [[(0, 3, 11), (0, 11, 29)], [(0, 3, 11), (0, 16, 29)], [(0, 0, 33)]])
def test_torch_all_one_adapter_ignores_inf_nan_in_uncovered_rows(segs, p):
    """Rows no segment covers (padding) may hold inf/nan in X (e.g. after a fully masked attention row) and dY:
    they must get exactly the frozen base's output and dX = dY W, and leave the adapter's dA / dB finite and
    exact - the rows are never read by the LoRA GEMMs. (A zero row mask over every row - the dense form before
    this test - gave 0 * inf = nan in dA, dB and those rows' Y.) With a bias, each base against float64."""
    T, K, N, r = 40, 24, 20, 4
    cov = {i for _, s, e in segs for i in range(s, e)}
    unc = [i for i in range(T) if i not in cov]
    x = _rand(T, K, dtype=torch.float32)
    x[unc[0], 2], x[unc[1], 5], x[unc[-1], 1] = float("inf"), float("nan"), -float("inf")
    dy = _rand(T, N, dtype=torch.float32)
    dy[unc[0], 3], dy[unc[-1], 0] = float("inf"), float("nan")
    a, b = _rand(r, K, dtype=torch.float32, scale=0.5), _rand(N, r, dtype=torch.float32, scale=0.5)
    w, bias = _rand(N, K, dtype=torch.float32, scale=0.3), _rand(N, dtype=torch.float32)

    def run(dt, fn, **kw):
        xx, aa, bb = (t.to(dt).requires_grad_(True) for t in (x, a, b))
        y = fn(xx, w.to(dt), [LoRAAdapterWeights(aa, bb, 1.5, p)], segs, bias=bias.to(dt), seed=7, **kw)
        return (y,) + torch.autograd.grad(y, (xx, aa, bb), dy.to(dt))

    got = run(torch.float32, multi_lora_linear, base_gemm="torch_all")
    ref = run(torch.float64, multi_lora_linear_reference)
    for name, g, rf in zip(("y", "dx", "dA", "dB"), got, ref):
        if name in ("dA", "dB"):
            assert torch.isfinite(g).all(), name
        same_bad = (torch.isnan(g) == torch.isnan(rf)) & (torch.isinf(g) == torch.isinf(rf))
        assert same_bad.all(), (name, (~same_bad).nonzero()[:5].tolist())
        fin = torch.isfinite(rf)
        assert_all_close(name, torch.where(fin, g.double(), 0.0), torch.where(fin, rf, 0.0), 4e-5, 4e-5)


# aten ops per fwd+bwd, "torch_all" with 2 / 4 adapters (ranks 4/8, 2/4/6/8), one segment each: the code before
# took 69 / 131 (a slice per tensor per segment; now one split per tensor)
PER_SEGMENT_OPS = {2: 52, 4: 82}


@pytest.mark.parametrize("nad", [2, 4])
def test_torch_all_several_adapters_per_segment_host_calls(nad):
    """Several adapters stay per segment (isolation: see ``_dense_run``): 2 base GEMMs + 6 per segment, views (one
    split per tensor, a column slice where a rank is below the largest) and the adapters' concatenation - no
    copies, scaling or fill passes."""
    from adasched.kernels.lora_bench import count_host_calls

    c = count_host_calls("torch_all", nad, 0.0, shape=(64, 48, 40, 8))
    assert c.ops["mm"] + c.ops["addmm_"] == 2 + 6 * nad, dict(c.ops)
    assert c.kernel_ops == 2 + 6 * nad + 2, dict(c.ops)  # + the 2 cats of A / B
    assert c.aten_ops <= PER_SEGMENT_OPS[nad], dict(c.ops)


def test_torch_all_single_adapter_whole_batch_is_eight_gemms_and_views():
    """The GPU default's commonest call (one adapter over every row, no dropout, 2-D input): 8 GEMM calls, 2
    allocations and 5 transposes per fwd+bwd - no reshape, slice, copy or scaling pass (the scale rides on the
    GEMMs' alpha)."""
    from adasched.kernels.lora_bench import count_host_calls

    c = count_host_calls("torch_all", 1, 0.0, shape=(64, 48, 40, 8))
    assert dict(c.ops) == {"mm": 4, "addmm_": 4, "empty": 2, "t": 5}, dict(c.ops)


@pytest.mark.parametrize("base_gemm", ["triton", "torch", "torch_all"])
def test_seed_as_device_tensor_matches_int_seed_and_advances_in_place(base_gemm):
    """A one-element int64 seed tensor is read by the kernel on the device: the same outputs and gradients as
    the int seed, and advancing it in place (what a CUDA-graph replay would do) draws a new mask."""
    T, K, N, r = 33, 300, 24, 4
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.1)
    a = _rand(r, K, dtype=torch.float32, scale=0.1, grad=True)
    b = _rand(N, r, dtype=torch.float32, grad=True)
    dy = _rand(T, N, dtype=torch.float32)
    seed_t = torch.tensor([2 ** 40 + 7], dtype=torch.int64)
    got = lora_linear(x, w, a, b, 1.5, 0.3, seed=seed_t, base_gemm=base_gemm)
    want = lora_linear(x, w, a, b, 1.5, 0.3, seed=2 ** 40 + 7, base_gemm=base_gemm)
    assert torch.equal(got, want)
    for g1, g2 in zip(torch.autograd.grad(got, (x, a, b), dy), torch.autograd.grad(want, (x, a, b), dy)):
        assert torch.equal(g1, g2)
    ref = lora_linear_reference(x, w, a, b, 1.5, 0.3, seed=seed_t)
    assert_all_close("y vs reference", got, ref, 2e-5, 2e-5)
    seed_t.add_(1)
    again = lora_linear(x, w, a, b, 1.5, 0.3, seed=seed_t, base_gemm=base_gemm)
    assert_all_close("next seed", again, lora_linear_reference(x, w, a, b, 1.5, 0.3, seed=2 ** 40 + 8), 2e-5, 2e-5)
    assert not torch.allclose(again, got)
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32)):
        with pytest.raises(ValueError, match="seed: a tensor seed"):
            lora_linear(x, w, a, b, 1.5, 0.3, seed=bad, base_gemm=base_gemm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.0, 0.3, 0.1)])
def test_torch_grouped_matches_float64_with_gaps_repeats_and_unused_adapters(dtype, ps):
    """base_gemm="torch_grouped": every thin GEMM one torch._grouped_mm over all segments and the gaps; an adapter
    with several segments, one with none, uncovered rows, dropout on some adapters - every element vs float64."""
    atol, rtol = TOL[dtype]
    T, K, N = 61, 40, 32
    specs = [(4, 2.0), (8, 0.5), (16, 1.25), (3, 1.0)]  # the rank-3 adapter has no segment
    adapters = [LoRAAdapterWeights(_rand(r, K, dtype=dtype, scale=0.15, grad=True),
                                   _rand(N, r, dtype=dtype, scale=0.5, grad=True), sc, p)
                for (r, sc), p in zip(specs, ps + (0.0,))]
    segments = [(1, 3, 21), (2, 30, 61), (0, 25, 28), (1, 28, 30)]
    x = _rand(T, K, dtype=dtype, grad=True)
    w = _rand(N, K, dtype=dtype, scale=0.15)
    dy = _rand(T, N, dtype=dtype)
    leaves = [x] + [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    y = multi_lora_linear(x, w, adapters, segments, seed=11, base_gemm="torch_grouped")
    grads = torch.autograd.grad(y, leaves, dy)
    ads64 = [LoRAAdapterWeights(_leaf64(ad.lora_a), _leaf64(ad.lora_b), ad.scale, ad.dropout_p) for ad in adapters]
    l64 = [_leaf64(x)] + [t for ad in ads64 for t in (ad.lora_a, ad.lora_b)]
    y64 = multi_lora_linear_reference(l64[0], w.double(), ads64, segments, seed=11)
    g64 = torch.autograd.grad(y64, l64, dy.double(), allow_unused=True)
    assert_all_close("y", y, y64, atol, rtol, dtype)
    for i, (g, r, leaf) in enumerate(zip(grads, g64, leaves)):
        f = GRAD[dtype]
        assert_all_close(f"grad {i}", g, torch.zeros_like(leaf) if r is None else r, atol * f, rtol * f, dtype)


def test_torch_grouped_host_calls_do_not_grow_with_segments():
    """The point of "torch_grouped": the same dispatches for 2 or 4 adapter segments (6 grouped GEMMs - S, Y,
    dS, dB, dA, dX term - and 2 base GEMMs without dropout); only the autograd of the adapters' concatenation
    adds its two slices per adapter. With a bias it takes the per-segment "torch_all" path (cuBLAS folds the
    bias into C)."""
    T, K, N = 64, 48, 40
    counts = {}
    for nseg in (2, 4):
        ads = [LoRAAdapterWeights(_rand(4, K, dtype=torch.float32, grad=True),
                                  _rand(N, 4, dtype=torch.float32, grad=True), 1.0 + i, 0.0) for i in range(nseg)]
        segs = [(i, i * (T // nseg), (i + 1) * (T // nseg)) for i in range(nseg)]
        x, w = _rand(T, K, dtype=torch.float32, grad=True), _rand(N, K, dtype=torch.float32)
        dy = _rand(T, N, dtype=torch.float32)
        leaves = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
        multi_lora_linear(x, w, ads, segs, base_gemm="torch_grouped")  # builds the tile table and the groups
        with _CountOps() as c:
            torch.autograd.grad(multi_lora_linear(x, w, ads, segs, base_gemm="torch_grouped"), leaves, dy)
        assert c.ops["_grouped_mm"] == 6 and c.ops["addmm_"] == 2, dict(c.ops)
        counts[nseg] = c.ops
    assert counts[4]["slice"] - counts[2]["slice"] == 2 * 2  # the concatenation's backward, per adapter
    assert {k: v for k, v in counts[2].items() if k != "slice"} == {k: v for k, v in counts[4].items() if k != "slice"}
    bias = _rand(N, dtype=torch.float32)
    with _CountOps() as c:
        y = multi_lora_linear(x, w, ads, segs, bias=bias, base_gemm="torch_grouped")
    assert c.ops["_grouped_mm"] == 0
    assert_all_close("with bias", y, multi_lora_linear_reference(x, w, ads, segs, bias=bias), 2e-5, 2e-5)


def test_torch_grouped_takes_broadcast_inputs_and_float64_through_the_fallbacks():
    """Review findings: a broadcast (stride-0) gradient or input and a float64 batch must not reach
    torch._grouped_mm (it rejects both); results equal the per-segment path's."""
    T, K, N = 40, 48, 32
    ads = [LoRAAdapterWeights(_rand(4, K, dtype=torch.float32, scale=0.2, grad=True),
                              _rand(N, 4, dtype=torch.float32, grad=True), 1.5, 0.0)]
    x = _rand(T, K, dtype=torch.float32, grad=True)
    w = _rand(N, K, dtype=torch.float32, scale=0.2)
    leaves = [x, ads[0].lora_a, ads[0].lora_b]
    c = _rand(N, dtype=torch.float32)

    def loss(base):  # the gradient of y.sum(0) reaches the layer as c expanded over the rows: strides (0, 1)
        return (multi_lora_linear(x, w, ads, [(0, 8, 40)], base_gemm=base).sum(0) * c).sum()

    for g1, g2 in zip(torch.autograd.grad(loss("torch_grouped"), leaves), torch.autograd.grad(loss("torch_all"), leaves)):
        assert_all_close("broadcast dY", g1, g2, 2e-5, 2e-5)
    xb = _rand(K, dtype=torch.float32).expand(T, K)  # a broadcast input, no dropout: Xd is x itself
    assert_all_close("broadcast x", multi_lora_linear(xb, w, ads, [(0, 8, 40)], base_gemm="torch_grouped"),
                     multi_lora_linear_reference(xb, w, ads, [(0, 8, 40)]), 2e-5, 2e-5)
    ads64 = [LoRAAdapterWeights(ads[0].lora_a.detach().double(), ads[0].lora_b.detach().double(), 1.5, 0.0)]
    x64 = x.detach().double()
    assert_all_close("float64", multi_lora_linear(x64, w.double(), ads64, [(0, 8, 40)], base_gemm="torch_grouped"),
                     multi_lora_linear_reference(x64, w.double(), ads64, [(0, 8, 40)]), 1e-12, 1e-12)


def test_bad_input_is_a_clear_value_error():
    K, N = 16, 8
    x, w = _rand(10, K, dtype=torch.float32), _rand(N, K, dtype=torch.float32)
    ad = LoRAAdapterWeights(_rand(2, K, dtype=torch.float32), _rand(N, 2, dtype=torch.float32), 1.0)
    with pytest.raises(ValueError, match="overlap"):
        multi_lora_linear(x, w, [ad], [(0, 0, 5), (0, 4, 8)])
    with pytest.raises(ValueError, match="adapter index"):
        multi_lora_linear(x, w, [ad], [(1, 0, 5)])
    with pytest.raises(ValueError, match="rows"):
        multi_lora_linear(x, w, [ad], [(0, 3, 11)])
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, ad.lora_a, ad.lora_b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear(x, w, ad.lora_a, _rand(N, 3, dtype=torch.float32), 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.clone().requires_grad_(), ad.lora_a, ad.lora_b, 1.0)
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, ad.lora_a, ad.lora_b, 1.0, dropout_p=0.1, seed=-1)
    assert keep_threshold(0.0) == 0 and keep_threshold(0.5) == 2 ** 31


def test_fallback_without_triton_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(L, "HAVE_TRITON", False)
    monkeypatch.setattr(L, "_warned_fallback", False)
    K, N = 16, 12
    x = _rand(9, K, dtype=torch.float32)
    w = _rand(N, K, dtype=torch.float32)
    a, b = _rand(3, K, dtype=torch.float32), _rand(N, 3, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = lora_linear(x, w, a, b, 2.0, 0.2, seed=8)
        lora_linear(x, w, a, b, 2.0, 0.2, seed=8)
    assert sum("torch reference path" in str(r.message) for r in rec) == 1
    monkeypatch.setattr(L, "HAVE_TRITON", True)
    assert_all_close("fallback", y, lora_linear(x, w, a, b, 2.0, 0.2, seed=8), 1e-5, 1e-5)


def test_multi_lora_no_segments_is_the_base_layer():
    """All rows uncovered: the fused kernels compute x W^T + b alone; adapters get zero gradients."""
    K, N = 40, 24
    x = _rand(21, K, dtype=torch.float32, grad=True)
    w, bias = _rand(N, K, dtype=torch.float32, scale=0.2), _rand(N, dtype=torch.float32, grad=True)
    ad = LoRAAdapterWeights(_rand(8, K, dtype=torch.float32, grad=True), _rand(N, 8, dtype=torch.float32, grad=True),
                            3.0, 0.5)
    y = multi_lora_linear(x, w, [ad], [], bias=bias)
    assert_all_close("y", y, x @ w.t() + bias, 1e-5, 1e-5)
    dy = _rand(21, N, dtype=torch.float32)
    gx, gb, ga, gB = torch.autograd.grad(y, (x, bias, ad.lora_a, ad.lora_b), dy)
    assert_all_close("dx", gx, dy @ w, 1e-5, 1e-5)
    assert_all_close("dbias", gb, dy.sum(0), 1e-5, 1e-5)
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gB) == 0


def test_tile_table_pads_segments_to_the_m_tile():
    """Tiles never straddle segments; uncovered rows get adapter -1 / rank 0; every row is in exactly one tile."""
    plan = L._tile_plan(50, ((1, 5, 23), (0, 23, 24), (1, 40, 50)), (4, 8), (2.0, 0.5), (0.0, 0.5), 16,
                        torch.device("cpu"))
    t = plan.table.tolist()
    assert [tuple(r[:3]) + (r[5],) for r in t] == [
        (0, 5, 0, -1), (5, 16, 8, 1), (21, 2, 8, 1), (23, 1, 4, 0), (24, 16, 0, -1), (40, 10, 8, 1)]
    assert [r[3] for r in t if r[5] == 1] == [4, 4, 4] and t[3][3] == 0  # rank offsets into A_cat / B_cat
    assert t[1][4] == 2 ** 31 and t[3][4] == 0  # keep thresholds: p = 0.5 and p = 0
    assert plan.ftable[1].tolist() == [0.5, 2.0] and plan.r_total == 12 and plan.block_r == 16
    covered = sorted(r for row in t for r in range(row[0], row[0] + row[1]))
    assert covered == list(range(50))


def test_dy_kernel_spreads_db_over_copies_by_tile(monkeypatch):
    """DY_LAUNCH["copies"] = 3: tile i's dB adds land in copy i % 3 only (checked per copy against float64 sums
    over those tiles), and _dy_pass returns their sum; dS for every row."""
    T, N, r, bm = 80, 48, 4, 16  # 5 tiles of 16 rows, one adapter with scale 1.5
    g = torch.Generator().manual_seed(31)
    dy = torch.randn(T, N, generator=g)
    b = torch.randn(N, r, generator=g)
    plan = L._tile_plan(T, ((0, 0, T),), (r,), (1.5,), (0.0,), bm, torch.device("cpu"))
    s = torch.zeros(T, plan.block_r)
    s[:, :r] = torch.randn(T, r, generator=g)
    spy = KernelSpy(L._lora_dy_kernel)
    monkeypatch.setattr(L, "_lora_dy_kernel", spy)
    ds, db, _ = L._dy_pass(dy, s, b, plan, False, launch={"copies": 3})
    ((_, args, _),) = spy.calls
    copies = args[4]  # the dB buffer [copies, N, R]
    assert copies.shape[0] == 3
    for c in range(3):
        rows = torch.cat([torch.arange(i * bm, (i + 1) * bm) for i in range(5) if i % 3 == c])
        want = 1.5 * dy[rows].double().t() @ s[rows, :r].double()
        assert torch.allclose(copies[c, :, :r].double(), want, rtol=1e-5, atol=1e-5), c
    assert torch.allclose(db[:, :r].double(), 1.5 * dy.double().t() @ s[:, :r].double(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(ds[:, :r].double(), 1.5 * dy.double() @ b.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the bad adapter's own rows
@pytest.mark.parametrize("base_gemm", ["triton", "torch_all"])
def test_an_adapter_rows_do_not_read_another_adapters_weights(base_gemm):
    """The forward GEMM reads B's rows in aligned vectors that span every adapter's columns and zeroes the columns
    of other adapters in registers: an adapter whose B holds inf/nan must not leak into another's rows."""
    T, K, N = 48, 32, 40
    g = torch.Generator().manual_seed(41)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    good = LoRAAdapterWeights(torch.randn(8, K, generator=g), torch.randn(N, 8, generator=g), 1.5, 0.0)
    bad_b = torch.randn(N, 8, generator=g)
    bad_b[::3, 2] = float("inf")
    bad_b[1::3, 5] = float("nan")
    bad = LoRAAdapterWeights(torch.randn(8, K, generator=g), bad_b, 0.5, 0.0)
    for order in ((good, bad), (bad, good)):
        gi = 0 if order[0] is good else 1
        segs = [(gi, 0, 24), (1 - gi, 24, 48)]
        y = multi_lora_linear(x, w, list(order), segs, seed=1, base_gemm=base_gemm)
        ref = x[:24].double() @ w.double().t() + 1.5 * (x[:24].double() @ good.lora_a.double().t()) @ \
            good.lora_b.double().t()
        assert torch.isfinite(y[:24]).all()
        assert torch.allclose(y[:24].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the bad adapter's own rows
@pytest.mark.parametrize("base_gemm", ["triton", "torch_all"])
def test_backward_of_one_adapter_ignores_another_adapters_weights(base_gemm):
    """dS = dY B reads B's rows across every adapter's columns in the dY kernel: an adapter with inf/nan in B must
    leave the other adapter's dA and dB exact, and dX on its rows."""
    T, K, N = 48, 32, 40
    g = torch.Generator().manual_seed(43)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    a0, b0 = torch.randn(8, K, generator=g), torch.randn(N, 8, generator=g)
    bad_b = torch.randn(N, 8, generator=g)
    bad_b[::3, 2] = float("inf")
    bad_b[1::3, 5] = float("nan")
    dy = torch.randn(T, N, generator=g)
    bad_a = torch.randn(8, K, generator=g)
    x64, a64, b64 = (t.double().requires_grad_(True) for t in (x[24:], a0, b0))
    y64 = x64 @ w.double().t() + 1.5 * (x64 @ a64.t()) @ b64.t()
    rdx, rda, rdb = torch.autograd.grad(y64, (x64, a64, b64), dy[24:].double())
    for good_first in (False, True):  # the good adapter's columns before or after the bad one's in B
        xx = x.clone().requires_grad_(True)
        good = LoRAAdapterWeights(a0.clone().requires_grad_(True), b0.clone().requires_grad_(True), 1.5, 0.0)
        bad = LoRAAdapterWeights(bad_a.clone().requires_grad_(True), bad_b.clone().requires_grad_(True), 0.5, 0.0)
        ads = [good, bad] if good_first else [bad, good]
        gi = 0 if good_first else 1
        y = multi_lora_linear(xx, w, ads, [(1 - gi, 0, 24), (gi, 24, 48)], seed=1, base_gemm=base_gemm)
        dx, da, db = torch.autograd.grad(y, (xx, good.lora_a, good.lora_b), dy)
        for name, got, ref in (("dx", dx[24:], rdx), ("dA", da, rda), ("dB", db, rdb)):
            assert torch.isfinite(got).all(), (good_first, name)
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4), (good_first, name)


def test_dx_with_one_input_feature_and_rank_offsets_alignment():
    """K = 1 (A [r, 1] has unit strides both ways, like the forward's B - the dX GEMM must still read it as A),
    and the rank-offset alignment the kernels are told about: 8 only when every offset is a multiple of 8."""
    g = torch.Generator().manual_seed(44)
    x, w = torch.randn(8, 1, generator=g), torch.randn(16, 1, generator=g)
    a, b, dy = torch.randn(4, 1, generator=g), torch.randn(16, 4, generator=g), torch.randn(8, 16, generator=g)
    got = torch.autograd.grad(lora_linear(x.requires_grad_(True), w, a, b, 2.0, 0.0, base_gemm="triton"), (x,), dy)
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(lora_linear_reference(x64, w.double(), a.double(), b.double(), 2.0, 0.0), (x64,),
                              dy.double())
    assert torch.allclose(got[0].double(), ref[0], rtol=1e-5, atol=1e-5)
    cpu = torch.device("cpu")
    for ranks, want in (((8, 12), 1), ((8, 16), 8), ((16,), 8), ((4,), 1), ((8, 8, 4), 1)):
        segs = tuple((i, 16 * i, 16 * i + 16) for i in range(len(ranks)))
        plan = L._tile_plan(16 * len(ranks), segs, ranks, (1.0,) * len(ranks), (0.0,) * len(ranks), 16, cpu)
        assert plan.r_align == want, ranks


@pytest.mark.parametrize("base", ["triton", "torch_all"])
def test_double_backward_raises_instead_of_dropping_second_order_terms(base):
    """With a loss linear in y, dY is a constant, yet dX = dY W^T + scale dY B A depends on A and B: torch's
    once_differentiable let such a double backward run and A's and B's gradients lost their second-order part
    (off by ~100 %). It must raise; a create_graph backward whose result is not differentiated again still works."""
    gen = torch.Generator().manual_seed(int(torch.randint(2 ** 31, ())))
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    w = torch.randn(12, 16, generator=gen)
    a = torch.randn(4, 16, generator=gen, requires_grad=True)
    b = torch.randn(12, 4, generator=gen, requires_grad=True)
    c = torch.randn(8, 16, generator=gen)
    y = lora_linear(x, w, a, b, 0.5, base_gemm=base)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        ((g * c).sum() + y.sum()).backward()
    y = lora_linear(x, w, a, b, 0.5, base_gemm=base)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)   # only first order used: fine
    want = torch.ones(8, 12) @ (w + 0.5 * b.detach() @ a.detach())
    torch.testing.assert_close(g.detach(), want, rtol=1e-5, atol=1e-5)
    a.grad = None                                               # (the failed backward may have reached it)
    y.sum().backward()
    torch.testing.assert_close(a.grad, 0.5 * b.detach().t() @ torch.ones(12, 8) @ x.detach(), rtol=1e-5, atol=1e-5)


def test_double_backward_with_frozen_adapters_is_exact():
    """Only x trainable (A, B and W frozen) and a loss linear in y: dX = dY (W + scale B A) is constant, so a
    double backward has no second-order term to drop and runs (the guard arms only when A or B needs a gradient)."""
    seed = int(torch.randint(2 ** 31, ()))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    w, a, b = (torch.randn(*s, generator=gen) for s in ((12, 16), (4, 16), (12, 4)))
    c = torch.randn(8, 16, generator=gen)
    y = lora_linear(x, w, a, b, 0.5, base_gemm="triton")
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    ((g * c).sum() + y.sum()).backward()
    torch.testing.assert_close(x.grad, torch.ones(8, 12) @ (w + 0.5 * b @ a), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"seed {seed}: {m}")


def test_references_follow_autocast_and_refuse_a_0d_input_as_the_kernels_do():
    """Hunt findings: under a bf16 autocast lora_linear returned bf16 (as F.linear) and its reference float32;
    a 0-d x raised an IndexError in the reference (lora_linear: one ValueError)."""
    x = torch.randn(5, 8)
    w = torch.randn(6, 8)
    a, b = torch.randn(3, 8), torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.lora_linear(x, w, a, b, 0.7)
        ref = L.lora_linear_reference(x, w, a, b, 0.7)
    assert got.dtype == ref.dtype == torch.bfloat16
    want = (x.double() @ w.double().t() + 0.7 * (x.double() @ a.double().t()) @ b.double().t())
    torch.testing.assert_close(ref.double(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    for fn in (L.lora_linear, L.lora_linear_reference):
        with pytest.raises(ValueError, match=r"^x: a 0-d tensor"):
            fn(torch.tensor(1.0), w, a, b, 0.7)


@pytest.mark.parametrize("which", ["lora_a", "lora_b", "bias"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64, torch.float8_e4m3fn])
def test_adapters_and_bias_must_be_floating_point(which, dtype):
    """Complex adapters lost their imaginary part (a warning), bool and int ones were taken as numbers, an int64
    bias was cast: every one is refused by name now, by the kernels and the references."""
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    args = {"lora_a": torch.randn(2, 8), "lora_b": torch.randn(6, 2), "bias": torch.randn(6)}
    args[which] = (args[which] * 3).to(dtype)
    for fn in (L.lora_linear, L.lora_linear_reference):
        with pytest.raises(ValueError, match=rf"{which}: {dtype} is not float16, bfloat16, float32 or float64"):
            fn(x, w, args["lora_a"], args["lora_b"], 0.5, bias=args["bias"])


@pytest.mark.parametrize("arg,value", [("scale", None), ("scale", "x"), ("dropout_p", "abc"), ("dropout_p", [0.1])])
def test_non_numeric_scale_or_dropout_names_the_argument(arg, value):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    kw = {"scale": 0.5, "dropout_p": 0.0, arg: value}
    for fn in (L.lora_linear, L.lora_linear_reference):
        with pytest.raises(ValueError, match=rf"^{arg}: .* must be a number"):
            fn(x, w, a, b, **kw)
    ad = L.LoRAAdapterWeights(a, b, **{"scale": 0.5, "dropout_p": 0.0, arg: value})
    with pytest.raises(ValueError, match=rf"^adapters\[0\]\.{arg}: .* must be a number"):
        L.multi_lora_linear(x, w, [ad], [(0, 0, 4)])
