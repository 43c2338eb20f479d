"""MoELayer under torch.autocast: the expert GEMMs run in the autocast dtype, as F.linear's do, with fp32 weights
getting fp32 gradients. Before, a bf16 activation met fp32 expert weights and the layer raised (torch backend:
'expected m1 and m2 to have the same dtype'; triton: 'operand dtypes differ')."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adasched.runtime.moe import MoELayer, RouterConfig


def _reference(layer, h, routing):
    """float64 MoE output from the bf16-rounded operands, token by token (SwiGLU experts, gate-weighted sum)."""
    bf = lambda t: t.detach().to(torch.bfloat16).to(torch.float64)  # noqa: E731
    x, w1, w2 = bf(h), bf(layer.w1), bf(layer.w2)
    out = torch.zeros_like(x)
    for t, e, g in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight.detach().tolist()):
        a = x[t] @ w1[e]
        gate, up = a.chunk(2)
        out[t] += g * ((F.silu(gate) * up) @ w2[e])
    return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_bf16_runs_the_experts_in_bf16(backend):
    """torch backend: values against the float64 reference; triton: the interpreter's bf16 arithmetic is wrong
    (DESIGN), so dtypes and gradients only (the values on a GPU are device_check's)."""
    torch.manual_seed(21)
    layer = MoELayer(16, 12, RouterConfig(kind="gshard", num_experts=4, top_k=2), backend=backend)
    x = torch.randn(24, 16)
    proj = torch.randn(16, 16) * 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.linear(x, proj)
        assert h.dtype == torch.bfloat16
        y = layer(h)
        routing = layer.router(h)           # the same routing the layer used (same input, same state)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    for w in (layer.w1, layer.w2):
        assert w.grad is not None and w.grad.dtype == torch.float32 and bool(w.grad.abs().sum() > 0)
    if backend == "torch":
        want = _reference(layer, h, routing)
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_without_autocast_a_dtype_mix_is_still_refused():
    layer = MoELayer(8, 6, RouterConfig(kind="gshard", num_experts=2, top_k=1), backend="torch")
    with pytest.raises((RuntimeError, ValueError)):
        layer(torch.randn(5, 8).to(torch.bfloat16))
