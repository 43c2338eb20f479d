"""The fused LoRA linear under torch.compile (custom ops, no graph break) and activation checkpointing.

Every comparison is against the same function run eagerly with the same generator state: the compiled graph
calls the same kernels through ``adasched::lora_linear_fwd`` / ``_bwd``, so outputs and gradients must be equal
element for element (aot_eager); under inductor the surrounding ops are fused by the compiler, so float32
rounding is allowed there.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._inductor.config as inductor_config
from torch.utils.checkpoint import checkpoint

from adasched.kernels import lora_op
from adasched.kernels.gemm import GemmConfig
from adasched.kernels.lora import LoRAAdapterWeights, lora_linear, multi_lora_linear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_random():
    """The seed of a None-seed call is drawn in the graph (torch.randint); inductor replaces random ops by its own
    stream unless told to fall back to eager's, which comparisons with eager need."""
    with inductor_config.patch(fallback_random=True):
        yield


def _leaves(gen, T=40, K=48, N=40, r=8):
    x = torch.randn(T, K, generator=gen).requires_grad_()
    w = torch.randn(N, K, generator=gen)
    a = (torch.randn(r, K, generator=gen) * 0.2).requires_grad_()
    b = (torch.randn(N, r, generator=gen) * 0.2).requires_grad_()
    bias = torch.randn(N, generator=gen).requires_grad_()
    return x, w, a, b, bias


def _run(fn, leaves, rng_seed):
    """Output and the gradients of every leaf that requires grad, from torch.manual_seed(rng_seed)."""
    for t in leaves:
        t.grad = None
    torch.manual_seed(rng_seed)
    y = fn()
    (y.square() * torch.linspace(0.5, 1.5, y.shape[-1])).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in leaves if t.requires_grad]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w), (g - w).abs().max()


@pytest.mark.parametrize("base", ["triton", "torch", "torch_all"])
def test_compiled_lora_linear_equals_eager_and_draws_a_seed_per_call(base):
    x, w, a, b, bias = _leaves(torch.Generator().manual_seed(1))

    def f():
        return torch.tanh(lora_linear(x, w, a, b, 2.0, 0.3, bias=bias, base_gemm=base))

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break would raise
    first = _run(compiled, (x, a, b, bias), 7)
    _assert_same(first, _run(f, (x, a, b, bias), 7))
    second = _run(compiled, (x, a, b, bias), 8)  # a new generator state: a new mask, not the traced one
    _assert_same(second, _run(f, (x, a, b, bias), 8))
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("base", ["triton", "torch_all", "torch_grouped"])
def test_compiled_multi_lora_equals_eager(base):
    gen = torch.Generator().manual_seed(2)
    T, K, N = 70, 40, 32
    x = torch.randn(T, K, generator=gen).requires_grad_()
    w = torch.randn(N, K, generator=gen)
    ads = [LoRAAdapterWeights((torch.randn(r, K, generator=gen) * 0.2).requires_grad_(),
                              (torch.randn(N, r, generator=gen) * 0.2).requires_grad_(), s, p)
           for r, s, p in ((4, 1.5, 0.0), (8, 0.5, 0.2), (16, 2.0, 0.1))]
    segs = [(2, 0, 17), (0, 20, 41), (1, 45, 66)]  # rows 17-19, 41-44 and 66-69: base only
    leaves = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]

    def f():
        return multi_lora_linear(x, w, ads, segs, base_gemm=base)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    want = _run(f, leaves, 3)
    _assert_same(_run(compiled, leaves, 3), want)
    if base == "torch_grouped":  # X 8 bytes off the 16-byte grid: the trace cannot see it, the op copies X
        # (the CPU's _grouped_mm takes any address: this checks the results; the copy itself is checked below)
        buf = torch.empty(T * K + 2)
        x_odd = buf[2:].view(T, K)
        assert x_odd.data_ptr() % 16 == 8
        with torch.no_grad():
            x_odd.copy_(x)
        x_odd.requires_grad_()

        def g():
            return multi_lora_linear(x_odd, w, ads, segs, base_gemm=base)

        got = _run(torch.compile(g, backend="aot_eager", fullgraph=True), [x_odd] + leaves[1:], 3)
        _assert_same(got, want)


def test_tensor_seed_advanced_in_place_needs_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    x, w, a, b, bias = _leaves(torch.Generator().manual_seed(3))
    seed = torch.tensor([1234], dtype=torch.int64)

    def f():
        return lora_linear(x, w, a, b, 1.0, 0.25, bias=bias, seed=seed)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    outs = []
    for _ in range(2):
        got = _run(compiled, (x, a, b, bias), 0)
        _assert_same(got, _run(f, (x, a, b, bias), 0))
        outs.append(got[0])
        seed.add_(1)
    assert counter.frame_count == 1
    assert not torch.equal(outs[0], outs[1])


def test_compiled_call_with_an_explicit_gemm_config():
    x, w, a, b, bias = _leaves(torch.Generator().manual_seed(4))
    cfg = GemmConfig(block_m=16, block_n=32, block_k=16, num_stages=2, num_warps=4, maxnreg=None)
    assert lora_op.decode_config(lora_op.encode_config(cfg)) == cfg
    assert lora_op.decode_config(lora_op.encode_config(None)) is None

    def f():
        return lora_linear(x, w, a, b, 0.7, 0.2, bias=bias, seed=99, gemm_config=cfg)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    _assert_same(_run(compiled, (x, a, b, bias), 0), _run(f, (x, a, b, bias), 0))


def test_grouped_operands_are_copied_onto_the_16_byte_grid():
    buf = torch.randn(4 * 12 + 4)
    odd, even = buf[2:50].view(4, 12), buf[4:52].view(4, 12)
    got = lora_op._aligned_for("torch_grouped", odd)
    assert got.data_ptr() % 16 == 0 and torch.equal(got, odd) and got.data_ptr() != odd.data_ptr()
    assert lora_op._aligned_for("torch_grouped", even) is even
    assert lora_op._aligned_for("torch_all", odd) is odd


@pytest.mark.parametrize("base,ps,with_bias", [("triton", (0.0, 0.0), True), ("triton", (0.2, 0.0), True),
                                               ("torch", (0.0, 0.3), True), ("torch_all", (0.2, 0.0), True),
                                               ("torch_all", (0.0, 0.0), False),
                                               ("torch_grouped", (0.1, 0.2), False)])
def test_opcheck_fake_shapes_schema_and_autograd(base, ps, with_bias):
    gen = torch.Generator().manual_seed(5)
    T, K, N = 40, 48, 40
    x = torch.randn(T, K, generator=gen).requires_grad_()
    w = torch.randn(N, K, generator=gen)
    a = torch.randn(12, K, generator=gen).requires_grad_()
    b = torch.randn(N, 12, generator=gen).requires_grad_()
    bias = torch.randn(N, generator=gen).requires_grad_() if with_bias else None
    segs = [0, 3, 20, 1, 22, 37]  # two adapters (ranks 4 and 8), gaps at rows 0-2, 20-21, 37-39
    args = (x, w, bias, a, b, segs, [4, 8], [1.5, 0.5], list(ps), 11, None, 16, base, [])
    res = torch.library.opcheck(lora_op.lora_linear_fwd, args)
    assert set(res.values()) == {"SUCCESS"}, res
    y, s, xd, mask = lora_op.lora_linear_fwd(*args)
    saved_x = xd if xd.numel() else x.detach()
    dy = torch.randn(T, N, generator=gen)
    bargs = (dy, w, a.detach(), b.detach(), s, saved_x, mask, segs, [4, 8], [1.5, 0.5], list(ps), 16, base, [],
             True, with_bias)
    res = torch.library.opcheck(lora_op.lora_linear_bwd, bargs,
                                test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("segs", [[0, 3, 20, 0, 20, 37], [0, 3, 20, 0, 22, 37], []])
def test_opcheck_torch_all_one_adapter(segs, p):
    """One adapter under "torch_all": one run of rows with gaps before / after (the dense form), a gap between
    segments (per segment) and no segment at all: the fake S has the real one's shape, rows no segment covers
    are defined (zeros), and the backward's outputs match the fake ones."""
    gen = torch.Generator().manual_seed(6)
    T, K, N, r = 40, 48, 40, 12
    x = torch.randn(T, K, generator=gen).requires_grad_()
    w = torch.randn(N, K, generator=gen)
    a = torch.randn(r, K, generator=gen).requires_grad_()
    b = torch.randn(N, r, generator=gen).requires_grad_()
    args = (x, w, None, a, b, segs, [r], [1.5], [p], 11, None, 16, "torch_all", [])
    res = torch.library.opcheck(lora_op.lora_linear_fwd, args)
    assert set(res.values()) == {"SUCCESS"}, res
    y, s, xd, mask = lora_op.lora_linear_fwd(*args)
    covered = torch.zeros(T, dtype=torch.bool)
    for i in range(0, len(segs), 3):
        covered[segs[i + 1]:segs[i + 2]] = True
    assert torch.equal(s[~covered], torch.zeros_like(s[~covered]))
    if xd.numel():
        assert torch.equal(xd[~covered], torch.zeros_like(xd[~covered])) and not mask[~covered].any()
    dy = torch.randn(T, N, generator=gen)
    bargs = (dy, w, a.detach(), b.detach(), s, xd if xd.numel() else x.detach(), mask, segs, [r], [1.5], [p], 16,
             "torch_all", [], True, False)
    res = torch.library.opcheck(lora_op.lora_linear_bwd, bargs, test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res


def test_inductor_compiled_peft_model_matches_eager(eager_random):
    peft = pytest.importorskip("peft")
    from torch import nn

    from adasched.kernels.peft_compat import apply_fused_lora

    class Block(nn.Module):
        def __init__(self, d=32, h=48):
            super().__init__()
            self.q, self.up, self.down = nn.Linear(d, d), nn.Linear(d, h), nn.Linear(h, d)

        def forward(self, x):
            x = x + torch.tanh(self.q(x))
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    model = peft.get_peft_model(Block(), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                         target_modules=["q", "up"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    assert apply_fused_lora(model) == 2
    model.train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(2, 24, 32)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    twin_params = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    for step in range(2):  # the second step draws new masks in both
        torch.manual_seed(10 + step)
        want = model(x)
        want.square().sum().backward()
        torch.manual_seed(10 + step)
        got = compiled(x)
        got.square().sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for n in params:
            torch.testing.assert_close(twin_params[n].grad, params[n].grad, rtol=1e-4, atol=1e-4)
            params[n].grad = twin_params[n].grad = None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_checkpointed_block_replays_the_seed_in_its_recompute(backend, eager_random):
    """Review finding: under torch.compile a checkpointed region recomputes the op in the backward; a seed drawn
    inside the opaque op was drawn again there (inductor does not replay it), so dA and dX were computed with
    another mask than the forward's. Drawn in the graph, the recompute replays it."""
    x, w, a, b, bias = _leaves(torch.Generator().manual_seed(8))

    def block(inp):
        return torch.tanh(lora_linear(inp, w, a, b, 2.0, 0.3, bias=bias))

    want = _run(lambda: block(x), (x, a, b, bias), 31)
    compiled = torch.compile(lambda: checkpoint(block, x, use_reentrant=False), backend=backend, fullgraph=True)
    got = _run(compiled, (x, a, b, bias), 31)
    if backend == "aot_eager":
        _assert_same(got, want)
    else:  # inductor fuses tanh and the loss around the op: float32 rounding
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant):
    x, w, a, b, bias = _leaves(torch.Generator().manual_seed(6))

    def block(inp):
        return torch.tanh(lora_linear(inp, w, a, b, 2.0, 0.3, bias=bias))

    plain = _run(lambda: block(x), (x, a, b, bias), 21)
    ckpt = _run(lambda: checkpoint(block, x, use_reentrant=reentrant), (x, a, b, bias), 21)
    _assert_same(ckpt, plain)


def test_float64_compiles_fullgraph():
    """Eager float64 takes the exact torch reference (a compiler-disabled function); a compiled graph keeps the
    custom op for it, so fullgraph=True still traces (float32 accumulation there, as before)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    a = torch.randn(2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda inp: lora_linear(inp, w, a, b, 0.5, 0.2, seed=3), backend="aot_eager", fullgraph=True)
    got = fn(x)
    want = lora_linear(x, w, a, b, 0.5, 0.2, seed=3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gx, = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), x)[0], atol=1e-5, rtol=1e-5)
