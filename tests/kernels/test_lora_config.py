"""The fused LoRA GEMMs launched with an explicit GemmConfig (Twill's plan-derived config or a sweep point), under
TRITON_INTERPRET=1: every output and gradient element equals the default path and the float64 reference, the
kernels really launch with the config's tiles, and bad configs are refused."""
from __future__ import annotations

import pytest
import torch
from kernel_spy import KernelSpy

from adasched.kernels import lora as L
from adasched.kernels.gemm import GemmConfig
from adasched.kernels.lora import LoRAAdapterWeights, lora_linear, lora_linear_reference, multi_lora_linear

pytest.importorskip("triton")

CONFIGS = [
    GemmConfig(block_m=16, block_n=32, block_k=16, group_m=1, num_stages=2, num_warps=4),
    GemmConfig(block_m=32, block_n=16, block_k=32, group_m=4, num_stages=4, num_warps=8, maxnreg=128),
    # a warp-specialised K loop (Twill's Blackwell configs): same function, the interpreter ignores the split
    GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, num_stages=3, num_warps=4, warp_specialize=True),
    # X and W through TMA descriptors (the shapes below have 16-byte aligned rows): forward W [N, K] read
    # out-major and transposed in shared memory, dX's W read red-major; tiles past the edges zero-filled
    GemmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_stages=4, num_warps=8, tma=True),
]


def assert_close(name, got, ref, tol=2e-5):
    g, r = got.detach().double(), ref.detach().double()
    assert g.shape == r.shape, name
    bad = ~torch.isclose(g, r, atol=tol * max(1.0, r.abs().max().item()), rtol=tol)
    assert not bad.any(), f"{name}: {int(bad.sum())}/{bad.numel()} elements differ"


def _packed_leaves(T, K, N, specs):
    """x [T, K], w [N, K], one trainable adapter per (rank, scale, dropout) in ``specs`` and dY [T, N], drawn from
    torch's global generator in that order."""
    x = torch.randn(T, K)
    w = torch.randn(N, K) * K ** -0.5
    ads = [LoRAAdapterWeights(torch.randn(r, K).requires_grad_(True), torch.randn(N, r).requires_grad_(True), s, p)
           for r, s, p in specs]
    return x, w, ads, torch.randn(T, N)


def _multi_reference64(x, w, ads, segs, seed, dy):
    """(y, dx, dA0, dB0, dA1, dB1, ...) of the float64 torch reference for the same leaves."""
    x64 = x.double().requires_grad_(True)
    ads64 = [LoRAAdapterWeights(ad.lora_a.detach().double().requires_grad_(True),
                                ad.lora_b.detach().double().requires_grad_(True), ad.scale, ad.dropout_p) for ad in ads]
    y64 = L.multi_lora_linear_reference(x64, w.double(), ads64, segs, seed=seed)
    leaves = [x64] + [t for ad in ads64 for t in (ad.lora_a, ad.lora_b)]
    return (y64.detach(), *torch.autograd.grad(y64, leaves, dy.double()))


def _leaves(T, K, N, r):
    f = lambda *s, sc=1.0: (torch.randn(*s) * sc)  # noqa: E731
    x, w, a, b, bias = f(T, K), f(N, K, sc=K ** -0.5), f(r, K, sc=K ** -0.5), f(N, r, sc=0.5), f(N, sc=0.1)
    return x, w, a, b, bias, f(T, N)


def _run(fn, x, w, a, b, bias, dy, **kw):
    x, a, b, bias = (t.clone().requires_grad_(True) for t in (x, a, b, bias))
    y = fn(x, w, a, b, 1.5, 0.25, bias=bias, seed=77, **kw)
    return (y.detach(), *torch.autograd.grad(y, (x, a, b, bias), dy))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_explicit_config_equals_default_path_and_reference(cfg, monkeypatch):
    torch.manual_seed(3)
    x, w, a, b, bias, dy = _leaves(37, 40, 48, 5)
    default = _run(lora_linear, x, w, a, b, bias, dy)
    spy = KernelSpy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    got = _run(lora_linear, x, w, a, b, bias, dy, gemm_config=cfg)
    ref = _run(lora_linear_reference, *(t.double() for t in (x, w, a, b, bias, dy)))
    for name, g, d, r in zip(("y", "dx", "dA", "dB", "dbias"), got, default, ref):
        assert_close(f"{name} vs default", g, d)
        assert_close(f"{name} vs float64 reference", g, r)
    # both GEMMs (forward: out N=48; dX: out K=40) launched with the config's tiles, M tiles of block_m rows
    assert len(spy.calls) == 2
    n_tiles = -(-37 // cfg.block_m)
    for (grid, _, kw), out_dim in zip(spy.calls, (48, 40)):
        assert (kw["BLOCK_M"], kw["BLOCK_O"], kw["BLOCK_RED"], kw["GROUP_M"], kw["WARP_SPECIALIZE"]) == (
            cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.warp_specialize)
        assert grid == (n_tiles * -(-out_dim // cfg.block_n),)
        assert kw.get("USE_TMA", False) == cfg.tma
    if cfg.tma:  # forward: W [N, K] has unit stride along the reduction; dX: along the output
        assert [kw["W_OUT_MAJOR"] for kw in spy.kwargs()] == [True, False]


def test_tma_config_multi_lora_and_unaligned_fallback(monkeypatch):
    """tma=True on a packed batch whose segments start mid-tile (the descriptor reads from each tile's first row;
    rows past the tile's valid ones belong to the next segment and are never stored), and on a K whose rows are
    not 16-byte aligned (pointer tiles instead): every output and gradient against float64."""
    cfg = CONFIGS[3]
    torch.manual_seed(8)
    for K, want_tma in ((40, True), (37, False)):
        T, N = 53, 24
        x, w, ads, dy = _packed_leaves(T, K, N, ((4, 2.0, 0.2), (8, 0.5, 0.0)))
        segs = [(0, 3, 21), (1, 21, 50)]
        spy = KernelSpy(L._lora_gemm_kernel)
        monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
        xx = x.clone().requires_grad_(True)
        y = multi_lora_linear(xx, w, ads, segs, bias=None, seed=4, gemm_config=cfg)
        leaves = [xx] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
        got = (y.detach(), *torch.autograd.grad(y, leaves, dy))
        monkeypatch.undo()
        assert [kw.get("USE_TMA", False) for kw in spy.kwargs()] == [want_tma, want_tma]
        ref = _multi_reference64(x, w, ads, segs, 4, dy)
        for name, g, r in zip(("y", "dx", "dA0", "dB0", "dA1", "dB1"), got, ref):
            assert_close(f"K={K} {name}", g, r)


def test_multi_lora_explicit_config_uncovered_rows():
    torch.manual_seed(5)
    T, K, N = 50, 24, 40
    x, w, ads, dy = _packed_leaves(T, K, N, ((3, 2.0, 0.0), (8, 0.5, 0.3)))
    segs = [(1, 0, 13), (0, 20, 47)]  # rows 13..19 and 47..49 get the base projection only
    outs = []
    for cfg in (None, CONFIGS[1]):
        xx = x.clone().requires_grad_(True)
        y = multi_lora_linear(xx, w, ads, segs, seed=9, gemm_config=cfg)
        grads = torch.autograd.grad(y, [xx] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)], dy)
        outs.append((y.detach(), *grads))
    ref = _multi_reference64(x, w, ads, segs, 9, dy)
    names = ("y", "dx", "dA0", "dB0", "dA1", "dB1")
    for name, g, d, r in zip(names, outs[1], outs[0], ref):
        assert_close(f"{name} vs default", g, d)
        assert_close(f"{name} vs float64 reference", g, r)


def test_bad_gemm_config_is_refused():
    x, w, a, b, bias, _ = _leaves(8, 16, 16, 2)
    with pytest.raises(ValueError, match="block_m: 32 differs"):
        multi_lora_linear(x, w, [LoRAAdapterWeights(a, b, 1.0)], [(0, 0, 8)], block_m=32,
                          gemm_config=GemmConfig(block_m=16, block_n=16, block_k=16))
    with pytest.raises(ValueError, match="gemm_config"):
        lora_linear(x, w, a, b, 1.0, gemm_config={"num_stages": 3})


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_persistent_grid_loops_over_every_tile(tma, monkeypatch):
    """GemmConfig(persistent=True): fewer programs than output tiles (5 "SMs" x 1 CTA of 8 warps: registers at
    the cap allow one), each looping over tiles pid, pid + 5, ...; every output and gradient element against
    float64, on a packed batch with uncovered rows."""
    cfg = GemmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_stages=4, num_warps=8, tma=tma,
                     persistent=True)
    assert L._ctas_per_sm(cfg, 4) == 1  # shared memory would allow 17, threads 8
    assert L._ctas_per_sm(GemmConfig(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=4), 2) == 2
    monkeypatch.setattr(L, "_num_sms", lambda device: 5)
    torch.manual_seed(12)
    T, K, N = 200, 40, 96
    x, w, ads, dy = _packed_leaves(T, K, N, ((4, 2.0, 0.2), (8, 0.5, 0.0)))
    segs = [(0, 5, 90), (1, 90, 190)]
    spy = KernelSpy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    xx = x.clone().requires_grad_(True)
    y = multi_lora_linear(xx, w, ads, segs, seed=21, gemm_config=cfg)
    leaves = [xx] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
    got = (y.detach(), *torch.autograd.grad(y, leaves, dy))
    monkeypatch.undo()
    n_tiles = 1 + 6 + 7 + 1  # rows 0-4 uncovered, two segments, rows 190-199 uncovered: 16-row tiles
    assert [grid for grid, _, _ in spy.calls] == [(5,), (5,)] and 5 < n_tiles * 2
    assert all(kw["PERSISTENT"] and kw["USE_TMA"] == tma for kw in spy.kwargs())
    ref = _multi_reference64(x, w, ads, segs, 21, dy)
    for name, g, r in zip(("y", "dx", "dA0", "dB0", "dA1", "dB1"), got, ref):
        assert_close(name, g, r)


def test_tma_fallback_for_broadcast_dy_and_misaligned_views(monkeypatch):
    """triton_tma where a descriptor cannot read an operand: a loss like y.sum(0) hands backward a broadcast dY
    (row stride 0) - the dX GEMM takes pointer tiles, the forward keeps TMA; a view whose base is 4 bytes off
    falls back too. Gradients against float64."""
    torch.manual_seed(14)
    T, K, N, r = 40, 48, 32, 4
    x, w, a, b, bias, _ = _leaves(T, K, N, r)
    assert L._tma_ok(x, w, w.stride(1), w.stride(0))
    assert not L._tma_ok(torch.randn(T, K + 1)[:, 1:], w, w.stride(1), w.stride(0))  # base 4 bytes off
    assert not L._tma_ok(torch.randn(1, N).expand(T, N), w, w.stride(0), w.stride(1))  # broadcast rows
    spy = KernelSpy(L._lora_gemm_kernel)
    monkeypatch.setattr(L, "_lora_gemm_kernel", spy)
    xx, aa, bb = (t.clone().requires_grad_(True) for t in (x, a, b))
    c = torch.randn(N)  # d loss / d y.sum(0): autograd hands backward c.expand(T, N)
    got = torch.autograd.grad(lora_linear(xx, w, aa, bb, 1.5, 0.25, seed=3, base_gemm="triton_tma").sum(0),
                              (xx, aa, bb), c)
    monkeypatch.undo()
    assert [kw["USE_TMA"] for kw in spy.kwargs()] == [True, False]
    x64, a64, b64 = (t.double().requires_grad_(True) for t in (x, a, b))
    ref = torch.autograd.grad(lora_linear_reference(x64, w.double(), a64, b64, 1.5, 0.25, seed=3).sum(0),
                              (x64, a64, b64), c.double())
    for name, g, rr in zip(("dx", "dA", "dB"), got, ref):
        assert_close(name, g, rr)
