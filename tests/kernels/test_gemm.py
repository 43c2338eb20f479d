"""Triton GEMM under TRITON_INTERPRET=1 vs torch: every element, float32 and float16, odd shapes, strided
operands, every knob accepted, autograd gradients; bad input raises with the argument named."""
from __future__ import annotations

import pytest
import torch
from kernel_spy import KernelSpy

from adasched.kernels.gemm import GemmConfig, gemm, gemm_autograd, gemm_reference

# float32: K <= 48 products of N(0,1) values accumulate ~1e-6 error; float16: the kernel and the reference both
# accumulate in float32 and round once to float16, so they differ by at most an ulp (2**-10 relative); a float16
# accumulator or a bfloat16 result does not fit that (h48: the old atol=1e-2, rtol=5e-3 passed both)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3)}
CONFIGS = [
    GemmConfig(block_m=16, block_n=16, block_k=16, group_m=1),
    GemmConfig(block_m=32, block_n=16, block_k=32, group_m=2, num_stages=4, num_warps=8, warp_specialize=True,
               maxnreg=232),
]


def _close(got, want, dtype, what):
    assert got.dtype == want.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    bad = ~torch.isclose(got.float(), want.float(), **TOL[dtype])
    assert got.shape == want.shape
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} elements differ, first at {bad.nonzero()[:3].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
@pytest.mark.parametrize("shape", [(37, 45, 29), (64, 16, 48)])
def test_gemm_matches_torch(dtype, cfg, shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(M * 1000 + K * 10 + N)
    a = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(K, N, generator=g).to(dtype)
    _close(gemm(a, b, cfg), gemm_reference(a, b), dtype, "C")


def test_gemm_strided_operands_and_autograd():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(29, 33, generator=g).t().contiguous().t()  # column-major A [29, 33]
    b = torch.randn(41, 33, generator=g).t()  # B [33, 41] as a transposed view
    cfg = CONFIGS[1]
    _close(gemm(a, b, cfg), gemm_reference(a, b), torch.float32, "strided C")
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    dc = torch.randn(29, 41, generator=g)
    gemm_autograd(a, b, cfg).backward(dc)
    a2 = a.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    (a2 @ b2).backward(dc)
    _close(a.grad, a2.grad, torch.float32, "dA")
    _close(b.grad, b2.grad, torch.float32, "dB")


def test_gemm_bad_input():
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="dtypes differ"):
        gemm(torch.randn(3, 4), torch.randn(4, 6, dtype=torch.float64))
    # kernel hunt: integers went through float32 (2**24 + 1 came back as 2**24), bools gave a bool "product"
    for dt in (torch.int64, torch.int32, torch.bool):
        a, b = torch.ones(2, 3, dtype=dt), torch.ones(3, 2, dtype=dt)
        for fn in (gemm, gemm_reference):
            with pytest.raises(ValueError, match=f"gemm: {dt} is not float16, bfloat16, float32 or float64"):
                fn(a, b)
    with pytest.raises(ValueError, match="block_m"):
        GemmConfig(block_m=48)
    with pytest.raises(ValueError, match="maxnreg"):
        GemmConfig(maxnreg=300)
    with pytest.raises(ValueError, match="persistent"):  # a knob only the LoRA GEMMs have is not ignored silently
        gemm(torch.randn(4, 8), torch.randn(8, 4), GemmConfig(block_m=16, block_n=16, block_k=16, persistent=True))
    cfg = GemmConfig.from_knobs({"num_stages": 3, "num_warps": 8, "warp_specialize": False, "maxnreg": 240},
                                block_m=128, block_n=128, block_k=64)
    assert (cfg.num_stages, cfg.num_warps, cfg.maxnreg) == (3, 8, 240)


TMA_CFG = GemmConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_stages=3, num_warps=4, tma=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_tma_descriptors_every_layout(dtype, a_t, b_t, monkeypatch):
    """tma=True: A and B read through descriptors in all four memory orders (a transposed operand loaded in its
    own order and transposed in shared memory); M, N, K not multiples of the tile (the descriptor fills zeros
    past the edge); every element against torch."""
    import adasched.kernels.gemm as G

    M, K, N = 40, 56, 24
    g = torch.Generator().manual_seed(11 + 2 * a_t + b_t)
    a = torch.randn(K, M, generator=g).to(dtype).t() if a_t else torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype).t() if b_t else torch.randn(K, N, generator=g).to(dtype)
    spy = KernelSpy(G._gemm_kernel)
    monkeypatch.setattr(G, "_gemm_kernel", spy)
    _close(gemm(a, b, TMA_CFG), gemm_reference(a, b), dtype, "C (tma)")
    (kw,) = spy.kwargs()
    assert (kw["USE_TMA"], kw["A_K_UNIT"], kw["B_N_UNIT"]) == (True, not a_t, not b_t)


def test_gemm_tma_falls_back_to_pointer_tiles_when_unaligned(monkeypatch):
    import adasched.kernels.gemm as G

    g = torch.Generator().manual_seed(12)
    a = torch.randn(20, 37, generator=g)  # row stride 148 bytes: not a multiple of 16
    b = torch.randn(37, 24, generator=g)
    spy = KernelSpy(G._gemm_kernel)
    monkeypatch.setattr(G, "_gemm_kernel", spy)
    _close(gemm(a, b, TMA_CFG), gemm_reference(a, b), torch.float32, "C (fallback)")
    assert "USE_TMA" not in spy.kwargs()[0]
    assert G.tma_layout(a, b) is None and G.tma_layout(a[:, :32], b) is None  # a view keeps the parent's stride
    assert G.tma_layout(torch.randn(8, 40)[:, 8:], torch.randn(32, 8)) == (True, True)



def test_tma_unit_axis_refuses_misaligned_overlapping_and_broadcast_views():
    """What a TMA descriptor cannot read falls back: a base 4 bytes off, a row stride that is not a multiple of
    16 bytes, a broadcast (stride 0) or overlapping rows; transposed views are read along their unit axis."""
    import adasched.kernels.gemm as G

    big = torch.randn(8, 41)
    assert G.tma_unit_axis(torch.randn(8, 40)) == 1 and G.tma_unit_axis(torch.randn(40, 8).t()) == 0
    assert G.tma_unit_axis(big[:, :40]) is None  # row stride 164 bytes
    base = torch.randn(8, 44)
    assert G.tma_unit_axis(base[:, 4:]) == 1 and G.tma_unit_axis(base[:, 1:41]) is None  # base 16 / 4 bytes off
    assert G.tma_unit_axis(torch.randn(1, 40).expand(8, 40)) is None  # broadcast rows: stride 0
    assert G.tma_unit_axis(torch.randn(64).as_strided((8, 16), (4, 1))) is None  # overlapping rows


def test_float64_is_computed_in_float64():
    """The kernel cast float64 tiles to float32 (3e-7 error, gradcheck failed); float64 takes the reference now."""
    a = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(gemm(a.detach(), b.detach()), a.detach() @ b.detach(), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradcheck(lambda x, y: gemm_autograd(x, y), (a, b))


def test_double_backward_raises_instead_of_dropping_second_order_terms():
    """gemm_autograd's backward builds no graph: with a loss linear in C, dA = dC B^T still depends on B, and a
    double backward failed with torch's generic "element 0 of tensors does not require grad" - or, had anything
    else required grad, would have dropped d(dA)/dB. It raises its own message; first order under create_graph and a
    double backward with only A trainable (nothing to drop) still work."""
    a = torch.randn(6, 5, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    c = torch.randn(6, 5)
    y = gemm_autograd(a, b)
    (g,) = torch.autograd.grad(y.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="gemm_autograd: double backward is not supported"):
        ((g * c).sum() + y.sum()).backward()
    torch.testing.assert_close(g.detach(), torch.ones(6, 4) @ b.detach().t(), rtol=1e-5, atol=1e-5)
    b2 = b.detach()
    y = gemm_autograd(a, b2)
    (g,) = torch.autograd.grad(y.sum(), a, create_graph=True)     # dA = 1 B^T: no trainable input behind it
    torch.testing.assert_close(g, torch.ones(6, 4) @ b2.t(), rtol=1e-5, atol=1e-5)


def test_twill_knobs_load_through_tma_and_their_cap_is_dropped_on_a_pointer_fallback(monkeypatch):
    # Twill's maxnreg fits the register file with the one worker warpgroup of a TMA main loop (its graph models TMA
    # loads); pointer loads get two worker warpgroups, so the cap would over-ask (168 x 32 x 16 > 65,536 on sm_100)
    import adasched.kernels.gemm as G

    knobs = {"num_stages": 4, "num_warps": 8, "warp_specialize": True, "maxnreg": 168}
    cfg = GemmConfig.from_knobs(knobs, block_m=32, block_n=32, block_k=16)
    assert (cfg.tma, cfg.warp_specialize, cfg.maxnreg) == (True, True, 168)
    assert not GemmConfig.from_knobs(dict(knobs, warp_specialize=False), block_m=32, block_n=32, block_k=16).tma
    assert not GemmConfig.from_knobs(knobs, block_m=32, block_n=32, block_k=16, tma=False).tma  # extra wins
    assert G.launch_maxnreg(cfg, used_tma=True) == 168
    assert G.launch_maxnreg(cfg, used_tma=False) is None
    # a cap given without TMA, or without warp specialization, is the caller's: passed as given
    assert G.launch_maxnreg(GemmConfig(warp_specialize=True, maxnreg=200), used_tma=False) == 200
    assert G.launch_maxnreg(GemmConfig(tma=True, maxnreg=200), used_tma=False) == 200

    # what gemm() really passes, as it would on a GPU (a fake launch records the options instead of compiling)
    calls = []

    class Fake:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(kw)

    monkeypatch.setattr(G, "_gemm_kernel", Fake())
    monkeypatch.setattr(G, "_interpreting", lambda: False)
    monkeypatch.setattr(G, "backend_for", lambda t: "triton")
    g = torch.Generator().manual_seed(31)
    aligned = (torch.randn(40, 32, generator=g), torch.randn(32, 48, generator=g))
    unaligned = (torch.randn(40, 37, generator=g), torch.randn(37, 48, generator=g))  # 148-byte rows
    gemm(*aligned, cfg)
    gemm(*unaligned, cfg)
    assert (calls[0].get("USE_TMA"), calls[0].get("maxnreg")) == (True, 168), calls[0]
    assert "USE_TMA" not in calls[1] and "maxnreg" not in calls[1], calls[1]
    assert calls[1]["num_warps"] == 8 and calls[1]["WARP_SPECIALIZE"] is True


def test_lora_launch_drops_a_tma_cap_when_its_operands_fall_back_to_pointer_tiles():
    from adasched.kernels import lora as L

    cfg = GemmConfig.from_knobs({"num_stages": 4, "num_warps": 4, "warp_specialize": True, "maxnreg": 240},
                                block_m=128, block_n=128, block_k=64)
    assert L._config_launch(cfg, interpret=False, used_tma=True)[1]["maxnreg"] == 240
    assert "maxnreg" not in L._config_launch(cfg, interpret=False, used_tma=False)[1]
    plain = GemmConfig(block_m=128, block_n=128, block_k=64, num_stages=3, num_warps=4, maxnreg=240)
    assert L._config_launch(plain, interpret=False, used_tma=False)[1]["maxnreg"] == 240
