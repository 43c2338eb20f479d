"""A MoE layer under torch.compile: the router compiles, the token dispatch (data-dependent row counts, kernels
with grids sized from them) runs eagerly between graphs; outputs, aux loss and every gradient equal eager's."""
from __future__ import annotations

import copy

import pytest
import torch

from adasched.runtime.moe.layer import MoELayer
from adasched.runtime.moe.router import RouterConfig


@pytest.mark.parametrize("kind,backend,attach", [("gshard", "aot_eager", False), ("top_p", "aot_eager", False),
                                                 ("sigmoid_bias", "aot_eager", True), ("gshard", "inductor", False)])
def test_compiled_moe_layer_equals_eager(kind, backend, attach):
    """attach: the aux loss rides on the output's backward (attach_aux_loss=True) and is not added to the loss;
    the eager layer adds it (review: compiled, the attached gradient was dropped - an output aliasing its input
    is replayed outside the graph - until the attach moved into the eager dispatch)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(32, 48, RouterConfig(kind=kind, num_experts=4, top_k=2), shared_experts=1)
    twin = copy.deepcopy(layer)
    twin.attach_aux_loss = attach
    compiled = torch.compile(twin, backend=backend)
    for step in range(2):  # step 2: after one sigmoid_bias update of the router's bias
        x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(step)).requires_grad_()
        xc = x.detach().clone().requires_grad_()
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        yc = compiled(xc)
        (yc.square().sum() + (0 if attach else twin.aux_loss)).backward()
        exact = backend == "aot_eager"
        tol = {} if not exact else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(yc, y, **tol)
        torch.testing.assert_close(twin.aux_loss, layer.aux_loss, **tol)
        torch.testing.assert_close(xc.grad, x.grad, **tol)
        for (n, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m, n=n: f"{n}: {m}")
            p.grad = q.grad = None
    for (n, b), (_, c) in zip(layer.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()
