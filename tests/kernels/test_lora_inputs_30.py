"""30th session (kernels hunt): a [..., 0] input of 3 or more dimensions raised torch's "cannot reshape tensor of 0
elements into shape [-1, 0]" from lora_linear and its reference (F.linear gives [..., N] there), and scale /
dropout_p took strings and bools as numbers ("2" ran as scale 2.0, True as 1.0)."""
from __future__ import annotations

import random

import pytest
import torch

from adasched.kernels import lora as L


@pytest.mark.parametrize("fn", [L.lora_linear, L.lora_linear_reference], ids=["fused", "reference"])
@pytest.mark.parametrize("lead", [(2, 3), (1, 4, 2), (3, 0)])
def test_inputs_of_no_features_give_the_bias(fn, lead):
    N, r = random.randint(1, 7), random.randint(1, 3)
    x = torch.randn(*lead, 0, requires_grad=True)
    w, a, b = torch.randn(N, 0), torch.randn(r, 0, requires_grad=True), torch.randn(N, r, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    y = fn(x, w, a, b, random.uniform(0.1, 2.0), bias=bias)
    assert y.shape == (*lead, N)
    torch.testing.assert_close(y, torch.nn.functional.linear(x.detach(), w, bias.detach()), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad.shape == x.shape and torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0
    torch.testing.assert_close(bias.grad, g.reshape(-1, N).sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arg,value", [("scale", "2"), ("scale", True), ("dropout_p", "0.1"), ("dropout_p", False),
                                       ("scale", b"1")])
def test_strings_and_bools_are_not_numbers(arg, value):
    x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    kw = {"scale": 0.5, "dropout_p": 0.0, arg: value}
    for fn in (L.lora_linear, L.lora_linear_reference):
        with pytest.raises(ValueError, match=rf"^{arg}: {value!r} must be a number$".replace("(", r"\(")):
            fn(x, w, a, b, **kw)
    ad = L.LoRAAdapterWeights(a, b, **kw)
    with pytest.raises(ValueError, match=rf"^adapters\[0\]\.{arg}: .* must be a number"):
        L.multi_lora_linear(x, w, [ad], [(0, 0, 4)])
