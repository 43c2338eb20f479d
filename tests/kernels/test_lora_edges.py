"""Edge cases of the public LoRA functions a user reaches directly (review findings, TRITON_INTERPRET=1, tiny
shapes): float64, an empty batch, double backward, malformed segments / block_m / dtypes."""
from __future__ import annotations

import pytest
import torch

from adasched.kernels.lora import (
    LoRAAdapterWeights,
    dropout_keep_mask,
    lora_linear,
    lora_linear_reference,
    multi_lora_linear,
    multi_lora_linear_reference,
)


def _ads(K, N, dtype, ranks=(1, 5), ps=(0.3, 0.0), scales=(2.0, 0.5)):
    g = torch.Generator().manual_seed(3)
    return [LoRAAdapterWeights((torch.randn(r, K, generator=g) * 0.5).to(dtype).requires_grad_(),
                               (torch.randn(N, r, generator=g) * 0.5).to(dtype).requires_grad_(), s, p)
            for r, p, s in zip(ranks, ps, scales)]


def _grads(y, leaves, dy):
    """Gradients of every leaf (None where the graph does not reach it: the assertions catch that)."""
    return list(torch.autograd.grad(y, leaves, dy, allow_unused=True))


def test_float64_is_computed_in_float64():
    """Review finding: float64 inputs came back float64 but with float32 precision (errors ~1e-6, the kernels
    accumulate in fp32), so e.g. gradcheck of a fused PEFT layer failed. float64 now takes the exact torch path
    (same dropout masks): every output and gradient element within 1e-12 of the float64 reference."""
    K, N, T = 19, 13, 21
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, K, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64).requires_grad_()
    ads = _ads(K, N, torch.float64, ranks=(1, 4, 2), ps=(0.3, 0.0, 0.1), scales=(2.0, 0.5, 1.5))
    segs = [(1, 9, 21), (0, 0, 7)]  # unsorted, rows 7-8 base only, adapter 2 unused
    leaves = [x, bias] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
    dy = torch.randn(T, N, generator=g, dtype=torch.float64)
    y = multi_lora_linear(x, w, ads, segs, bias=bias, seed=5)
    got = [y] + _grads(y, leaves, dy)
    # the formula written out here (not the library's reference path, which float64 now takes itself), with the
    # kernels' Philox keep mask
    p_row = torch.zeros(T, dtype=torch.float64)
    for aid, s0, e0 in segs:
        p_row[s0:e0] = ads[aid].dropout_p
    keep = dropout_keep_mask(5, T, K, p_row).to(torch.float64)
    y_ref = x @ w.T + bias
    for aid, s0, e0 in segs:
        ad = ads[aid]
        xd = x[s0:e0] * keep[s0:e0] / (1.0 - ad.dropout_p)
        y_ref = y_ref.index_add(0, torch.arange(s0, e0), ad.scale * ((xd @ ad.lora_a.T) @ ad.lora_b.T))
    want = [y_ref] + [g if g is not None else torch.zeros_like(t)
                      for g, t in zip(_grads(y_ref, leaves, dy), leaves)]
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, i
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m: f"output/grad {i}: {m}")
    # and the float32 kernel path gives the same function (same mask) to float32 accuracy
    y32 = multi_lora_linear(x.detach().float(), w.float(), [LoRAAdapterWeights(ad.lora_a.detach().float(),
                            ad.lora_b.detach().float(), ad.scale, ad.dropout_p) for ad in ads], segs,
                            bias=bias.detach().float(), seed=5)
    torch.testing.assert_close(y32.double(), y_ref.detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(got[-1], torch.zeros_like(got[-1])) and torch.equal(got[-2], torch.zeros_like(got[-2]))
    a, b = ads[1].lora_a, ads[1].lora_b
    assert torch.autograd.gradcheck(lambda xx, aa, bb: lora_linear(xx, w, aa, bb, 0.7, bias=bias),
                                    (x[:3].detach().requires_grad_(), a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_batch_gives_zero_lora_gradients(dtype):
    """Review finding: with 0 tokens the result was the bare base projection, so the LoRA weights got no gradient
    at all (None): backward() left .grad unset and DDP without find_unused_parameters waits for them. PEFT gives
    zeros; now so do we."""
    K, N = 12, 7
    x = torch.randn(0, K, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    a = torch.randn(3, K, dtype=dtype, requires_grad=True)
    b = torch.randn(N, 3, dtype=dtype, requires_grad=True)
    y = lora_linear(x, w, a, b, 2.0, dropout_p=0.2, bias=bias)
    assert y.shape == (0, N) and y.dtype == dtype
    y.sum().backward()
    for t in (a, b, bias):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t))
    assert x.grad.shape == (0, K)
    ads = _ads(K, N, dtype)
    y = multi_lora_linear(x, w, ads, [(0, 0, 0), (1, 0, 0)])
    grads = torch.autograd.grad(y.sum(), [t for ad in ads for t in (ad.lora_a, ad.lora_b)])
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)


def test_double_backward_is_refused_not_silently_dropped():
    """Review finding: grad(..., create_graph=True) through the fused layer returned a dX with no graph behind
    it, so a gradient penalty's second-order terms were silently missing. The backward is once-differentiable now:
    differentiating it raises."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 10, generator=g, requires_grad=True)
    w = torch.randn(8, 10, generator=g)
    a = torch.randn(2, 10, generator=g, requires_grad=True)
    b = torch.randn(8, 2, generator=g, requires_grad=True)
    y = lora_linear(x, w, a, b, 0.5)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    torch.testing.assert_close(gx, torch.autograd.grad(lora_linear_reference(x, w, a, b, 0.5).square().sum(), x)[0])
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        (gx.square().sum() + y.sum()).backward()


def test_malformed_arguments_name_the_argument():
    """Review findings: a fractional segment bound was truncated silently ((0, 0.5, 3) ran as (0, 0, 3)), a
    segment that is not a sequence raised TypeError, block_m=0 silently meant the default, integer inputs ran,
    a 0-d x raised IndexError."""
    K, N = 16, 8
    x, w = torch.randn(10, K), torch.randn(N, K)
    ads = _ads(K, N, torch.float32)
    cases = [
        (lambda: multi_lora_linear(x, w, ads, [(0, 0.5, 3)]), "segments\\[0\\]"),
        (lambda: multi_lora_linear(x, w, ads, [(0, 0, 4), 5]), "segments\\[1\\]"),
        (lambda: multi_lora_linear(x, w, ads, [(0, "0", 4)]), "segments\\[0\\]"),
        (lambda: multi_lora_linear(x, w, ads, [(True, 0, 4)]), "segments\\[0\\]"),  # True ran as adapter 1
        (lambda: multi_lora_linear(x, w, ads, [(0, 0, 4)], block_m=0), "block_m"),
        (lambda: lora_linear(x.long(), w.long(), ads[0].lora_a.detach().long(), ads[0].lora_b.detach().long(),
                             1.0), "x: torch.int64 is not float16"),
        (lambda: lora_linear(torch.tensor(1.0), w, ads[0].lora_a, ads[0].lora_b, 1.0), "x: "),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    # integer-valued numbers that are ints (numpy-like / 0-d tensors) still work
    y = multi_lora_linear(x, w, ads, [(torch.tensor(1), torch.tensor(2), 9)], seed=4)
    torch.testing.assert_close(y, multi_lora_linear_reference(x, w, ads, [(1, 2, 9)], seed=4))


@pytest.mark.parametrize("base_gemm", ["triton", "triton_tma", "torch"])
def test_strided_bias_view(base_gemm):
    """Review finding: a bias that is a strided view (e.g. every third element of a fused QKV bias) was read by
    the Triton GEMM epilogue as if contiguous: wrong outputs (off by ~2), silently. Every output and gradient
    element (the view's parent gets the bias gradient) against the float64 reference."""
    K, N, T = 20, 12, 19
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g)
    a = (torch.randn(3, K, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(N, 3, generator=g) * 0.5).requires_grad_()
    parent = torch.randn(3 * N, generator=g, requires_grad=True)
    dy = torch.randn(T, N, generator=g)
    y = lora_linear(x, w, a, b, 1.5, dropout_p=0.2, bias=parent[1::3], seed=9, base_gemm=base_gemm)
    got = [y] + list(torch.autograd.grad(y, (x, a, b, parent), dy))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, a, b, parent)]
    x64, a64, b64, p64 = leaves64
    y64 = lora_linear_reference(x64, w.double(), a64, b64, 1.5, dropout_p=0.2, bias=p64[1::3], seed=9)
    want = [y64] + list(torch.autograd.grad(y64, leaves64, dy.double()))
    for i, (u, v) in enumerate(zip(got, want)):
        torch.testing.assert_close(u.double(), v, atol=2e-5 * max(1.0, v.abs().max().item()), rtol=2e-5,
                                   msg=lambda m: f"output/grad {i}: {m}")


def test_numpy_integer_seed_is_an_int_seed():
    """Review finding: a numpy integer seed (e.g. from np.random.default_rng().integers) was refused with "seed: 5
    must be an int"; it now gives the mask of the same Python int. Floats and bools are still refused."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(9, 16, generator=g), torch.randn(8, 16, generator=g)
    a, b = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    y = lora_linear(x, w, a, b, 1.0, dropout_p=0.4, seed=np.int64(5))
    assert torch.equal(y, lora_linear(x, w, a, b, 1.0, dropout_p=0.4, seed=5))
    torch.testing.assert_close(y, lora_linear_reference(x, w, a, b, 1.0, dropout_p=0.4, seed=np.int64(5)))
    for bad in (5.0, True, "5"):
        with pytest.raises(ValueError, match="seed"):
            lora_linear(x, w, a, b, 1.0, dropout_p=0.4, seed=bad)


@pytest.mark.parametrize("T", [0, 5])
@pytest.mark.parametrize("xdt,bdt", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_bias_in_another_dtype_everywhere(T, xdt, bdt):
    """The kernels cast a bias in another dtype; the torch reference (now float64's path) and the empty-batch
    path raised "self and mat2 must have the same dtype" instead. Output and bias gradient against float64."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, 8, generator=g).to(xdt)
    w, a, b = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g)
    bias = torch.randn(4, generator=g).to(bdt).requires_grad_()
    dy = torch.randn(T, 4, generator=g).to(xdt)
    want = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T + bias.detach().double()
    for fn in (lora_linear, lora_linear_reference):
        bias.grad = None
        y = fn(x, w.to(xdt), a.to(xdt), b.to(xdt), 0.5, bias=bias)
        assert y.dtype == xdt
        y.backward(dy)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
        assert bias.grad.dtype == bdt
        torch.testing.assert_close(bias.grad.double(), dy.double().sum(0), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:adasched.kernels.lora. fused Triton kernels unavailable")
@pytest.mark.parametrize("fused", [True, False])
def test_host_tables_do_not_follow_the_default_device(fused, monkeypatch):
    """Hunt finding: the multi-LoRA tile table, grouped data and per-row dropout probabilities were built with
    torch.tensor(...) on the default device; under torch.set_default_device("cuda") they were CUDA tensors that
    pin_memory refuses. Checked with "meta" as the default device (no GPU here): same outputs and gradients as
    without it. fused=False: the torch path (its per-row dropout probabilities)."""
    import adasched.kernels.lora as lora_mod

    if not fused:
        monkeypatch.setattr(lora_mod, "backend_for", lambda x: "torch")
    g = torch.Generator().manual_seed(torch.seed() % 2 ** 31)
    T, K, N = 40, 24, 20
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    ads = [LoRAAdapterWeights(torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), s, p)
           for r, s, p in ((4, 0.5, 0.25), (8, 2.0, 0.0))]
    segs = [(0, 0, 17), (1, 17, 33)]

    def run():
        xs = x.clone().requires_grad_(True)
        a = [LoRAAdapterWeights(ad.lora_a.clone().requires_grad_(True), ad.lora_b.clone().requires_grad_(True),
                                ad.scale, ad.dropout_p) for ad in ads]
        y = multi_lora_linear(xs, w, a, segs, seed=11, block_m=16)
        y.backward(torch.ones_like(y))
        return [y.detach(), xs.grad] + [t.grad for ad in a for t in (ad.lora_a, ad.lora_b)]

    want = run()
    lora_mod._PLAN_CACHE.clear()  # the tables are built again under the default device
    with torch.device("meta"):
        assert torch.empty(1).device.type == "meta"
        got = run()
    assert all(t.device.type == "cpu" for t in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_scale_that_requires_grad_is_refused_not_detached():
    """Kernel hunt: a scale tensor that requires grad (a trainable alpha) was turned into a float with only
    torch's generic warning; its .grad stayed None - a learnable scale that silently never trained."""
    K, N = 8, 6
    x, w = torch.randn(5, K), torch.randn(N, K)
    ad = _ads(K, N, torch.float32)[1]
    s = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="scale: a tensor that requires grad is not supported"):
        lora_linear(x, w, ad.lora_a, ad.lora_b, s)
    with pytest.raises(ValueError, match=r"adapters\[0\].scale: a tensor that requires grad"):
        multi_lora_linear(x, w, [LoRAAdapterWeights(ad.lora_a, ad.lora_b, s, 0.0)], [(0, 0, 5)])
    # a detached tensor is a number
    y = lora_linear(x, w, ad.lora_a, ad.lora_b, s.detach())
    torch.testing.assert_close(y, lora_linear_reference(x, w, ad.lora_a, ad.lora_b, 2.0), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("rank,warps", [(16, 4), (64, 4), (128, 8)])
def test_the_dy_kernel_takes_8_warps_past_64_rank_columns(rank, warps, monkeypatch):
    """Kernel hunt (offline sm_90 compile): the dY kernel at 128 rank columns on 4 warps used 255 registers and
    spilled 1392 B; the launch takes 8 warps there now, as the down kernel does past 16 (64 columns fit 4)."""
    import sys

    from adasched.kernels import lora as L

    seen = []

    def opts(num_warps=4, num_stages=3):
        seen.append((sys._getframe(1).f_code.co_name, num_warps))
        return {}
    monkeypatch.setattr(L, "_launch_opts", opts)
    K, N = 16, 16
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, K, generator=g)
    a = (torch.randn(rank, K, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(N, rank, generator=g) * 0.3).requires_grad_()
    lora_linear(x, torch.randn(N, K, generator=g), a, b, 0.5, base_gemm="triton").sum().backward()
    assert [w for name, w in seen if name == "_dy_pass"] == [warps], seen


def test_dy_knobs_are_what_the_launch_uses():
    """The sweep labels its default row from kernels.lora.dy_knobs (review: past 64 rank columns it labelled the
    4-warp row, which real calls no longer run, and never swept 8 warps)."""
    from adasched.kernels import lora as L

    assert L.dy_knobs(16) == L.DY_LAUNCH and L.dy_knobs(64)["warps"] == L.DY_LAUNCH["warps"]
    assert L.dy_knobs(128) == {**L.DY_LAUNCH, "warps": 8}
    assert L.dy_knobs(128, {"warps": 4})["warps"] == 4 and L.dy_knobs(128, {"copies": 8})["copies"] == 8
