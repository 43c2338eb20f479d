"""Adapters wider than the input (fp32 adapters on a half-precision input, PEFT's default dtype mix) under
torch.compile. That path computes the LoRA term by torch ops; it was wrapped whole in ``torch.compiler.disable``,
so ``torch.compile(fullgraph=True)`` of a layer in PEFT's default dtypes raised (the same call in the input's dtype
traces as one custom op). Now the torch ops trace into the graph and only the dropout mask's kernel launch stays
outside it. Compared with eager on fresh random inputs, outputs and every gradient, every element."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adasched.kernels.lora import LoRAAdapterWeights, lora_linear, multi_lora_linear  # noqa: E402

T, K, N, R = 37, 48, 40, 4


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(torch.float16).requires_grad_()
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(torch.float16)
    a = (torch.randn(R, K, generator=g) * K ** -0.5).requires_grad_()      # fp32 adapters
    b = (torch.randn(N, R, generator=g) * R ** -0.5).requires_grad_()
    dy = torch.randn(T, N, generator=g).to(torch.float16)
    return x, w, a, b, dy


def _run(fn, x, w, a, b, dy):
    y = fn(x, w, a, b)
    grads = torch.autograd.grad(y, [x, a, b], dy)
    return [y.detach(), *grads]


def _same(got, want):
    """torch.testing's per-dtype tolerances (fp32: rtol 1.3e-6), dtype and shape checked (aot_eager runs the same
    ops: equal bit for bit here; the earlier rtol 1e-3 was fp16's, wide for the fp32 adapter gradients)."""
    assert len(got) == len(want)
    for i, (u, v) in enumerate(zip(got, want)):
        torch.testing.assert_close(u, v, msg=lambda m, i=i: f"output {i}: {m}")


def test_wider_adapters_compile_fullgraph_without_dropout():
    torch._dynamo.reset()
    x, w, a, b, dy = _inputs(1)

    def f(x, w, a, b):
        return lora_linear(x, w, a, b, 2.0, 0.0)

    want = _run(f, x, w, a, b, dy)
    assert want[0].dtype == torch.float16 and want[2].dtype == torch.float32
    got = _run(torch.compile(f, backend="aot_eager", fullgraph=True), x, w, a, b, dy)
    _same(got, want)


def test_wider_adapters_compile_with_dropout_and_multi_adapter_segments():
    """Dropout (the mask drawn outside the graph from an explicit seed) and two adapters, one wider than the
    input and one in its dtype: compiled equals eager."""
    torch._dynamo.reset()
    x, w, a, b, dy = _inputs(2)
    g = torch.Generator().manual_seed(3)
    a2 = (torch.randn(2, K, generator=g) * K ** -0.5).to(torch.float16).requires_grad_()
    b2 = (torch.randn(N, 2, generator=g) * 0.5).to(torch.float16).requires_grad_()

    def f(x, w, a, b):
        ads = [LoRAAdapterWeights(a, b, 2.0, 0.25), LoRAAdapterWeights(a2, b2, 0.5, 0.0)]
        return multi_lora_linear(x, w, ads, [(0, 0, 20), (1, 20, T)], seed=1234)

    want = _run(f, x, w, a, b, dy)
    got = _run(torch.compile(f, backend="aot_eager"), x, w, a, b, dy)
    _same(got, want)
