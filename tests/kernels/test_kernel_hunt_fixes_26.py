"""Findings of the 26th session's hunt on the MoE and GEMM kernels' arguments, each a test that fails on the code
before the fix (TRITON_INTERPRET=1: the Triton path runs on the CPU)."""
from __future__ import annotations

import random

import pytest
import torch

from adasched.kernels import moe as K
from adasched.kernels.gemm import gemm


def _routed(rng: random.Random, T: int, E: int):
    """A top-1 routing of T tokens over E experts, sorted by expert: (index, expert of each row)."""
    exp = torch.tensor([rng.randrange(E) for _ in range(T)])
    order = torch.argsort(exp, stable=True)
    return K.make_index(order, torch.bincount(exp, minlength=E), T)


@pytest.mark.parametrize("wrong", [-1, +2])
def test_backward_weight_refuses_a_wrong_expert_count(wrong):
    """The Triton path read offsets past the index for a larger count (a segfault under the interpreter) and
    dropped the last experts' gradients for a smaller one; the torch path raised IndexError."""
    rng = random.Random()
    T, E, H, F = rng.randint(4, 9), 3, 4, 6
    ix = _routed(rng, T, E)
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, H, 2 * F), torch.randn(E, F, H)
    a = K.grouped_mm(x, w1, ix, "triton")
    _, saved = K.expert_mlp_backward_data(x, a, torch.randn(T, H), w1, w2, ix, "swiglu", "triton")
    with pytest.raises(ValueError, match=f"index has {E} experts, expected {E + wrong}"):
        K.expert_mlp_backward_weight(saved, E + wrong)
    with pytest.raises(ValueError, match=f"index has {E} experts, expected {E + wrong}"):
        K.grouped_wgrad_triton(x, torch.randn(T, 2 * F), ix, E + wrong)
    dw1, dw2 = K.expert_mlp_backward_weight(saved, E)  # the right count still works
    assert dw1.shape == w1.shape and dw2.shape == w2.shape


@pytest.mark.parametrize("fn", ["permute", "unpermute"])
def test_rows_that_are_not_2d_are_refused_on_every_backend(fn):
    """The Triton path read a (T, 3, 2) input as rows of 3 elements and returned (T, 3) of wrong data, where the
    torch backend permuted the whole rows."""
    rng = random.Random()
    T = rng.randint(2, 6)
    ix = _routed(rng, T, 2)
    x = torch.randn(T, 3, 2)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=f"{fn}: rows must be 2-D"):
            if fn == "permute":
                K.permute(x, ix, backend)
            else:
                K.unpermute(x, torch.rand(T), ix, backend)


def test_negative_counts_are_refused():
    """Counts [5, -3, 2] add up to 4 rows and passed the sum check; the grouped GEMM's first tile ran to row 5 of
    a 4-row output (a write past the tensor) and the reference returned 6 rows."""
    with pytest.raises(ValueError, match="make_index: expert count -3 is negative"):
        K.make_index(torch.arange(4), torch.tensor([5, -3, 2]), 4)
    with pytest.raises(ValueError, match="must be integer tensors"):
        K.make_index(torch.arange(4), torch.tensor([2.0, 2.0]), 4)


@pytest.mark.parametrize("fn", ["permute", "unpermute", "grouped_mm"])
def test_integer_rows_are_refused_not_rounded_through_float32(fn):
    """2**24 + 1 came back as 2**24 from the Triton path (it moves values through float32); the torch backend
    gave the exact integer - the two backends disagreed silently."""
    rng = random.Random()
    T = rng.randint(2, 6)
    ix = _routed(rng, T, 2)
    x = torch.full((T, 3), 2 ** 24 + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="is not float16, bfloat16, float32 or float64"):
        if fn == "permute":
            K.permute(x, ix, "triton")
        elif fn == "unpermute":
            K.unpermute(x, torch.rand(T), ix, "triton")
        else:
            K.grouped_mm(x, torch.full((2, 3, 2), 4097, dtype=torch.int64), ix, "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemm_is_differentiable_on_the_kernel_path(dtype):
    """`gemm(a, b)` with a.requires_grad returned a tensor without a graph on the kernel path (float32/16 under the
    interpreter or on a GPU) but kept one on the reference path (float64, or a CPU without the interpreter)."""
    M, Kd, N = (random.randint(3, 20) for _ in range(3))
    a = torch.randn(M, Kd, dtype=dtype, requires_grad=True)
    b = torch.randn(Kd, N, dtype=dtype, requires_grad=True)
    c = gemm(a, b)
    assert c.requires_grad
    g = torch.randn(M, N, dtype=dtype)
    c.backward(g)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.float(), g.double().matmul(b.detach().double().T).float(), **tol)
    torch.testing.assert_close(b.grad.float(), a.detach().double().T.matmul(g.double()).float(), **tol)
    with torch.no_grad():
        assert not gemm(a, b).requires_grad
