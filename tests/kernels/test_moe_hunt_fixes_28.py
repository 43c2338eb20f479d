"""28th session's MoE kernel hunt (each failed before): the expert MLP's backward took rows the index does not
describe (Triton: uninitialised rows for more, writes past its buffers - heap corruption - for fewer; a 3-D x gave
dw1 of another shape); the public grouped launchers and the weight-gradient step checked no row counts; mixed dtypes
on the torch backend, integer activations, malformed make_index arguments failed deep inside or silently; a grouped
GEMM over zero experts on the torch backend left the graph."""
from __future__ import annotations

import random

import pytest
import torch

from adasched.kernels import moe as K


def _index(E: int, N: int):
    counts = torch.tensor([N // E + (1 if e < N % E else 0) for e in range(E)])
    return K.make_index(torch.randint(0, 5, (N,)), counts, 5)


def _mlp(E=2, H=4, F=3):
    w1 = torch.randn(E, H, 2 * F)
    w2 = torch.randn(E, F, H)
    return w1, w2


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rows", ["more", "fewer", "3-D"])
def test_the_expert_mlp_backward_takes_the_rows_the_index_describes(backend, rows):
    E, N = 2, 8
    idx = _index(E, N)
    w1, w2 = _mlp(E)
    n = {"more": N + random.randint(1, 4), "fewer": N - random.randint(1, 4), "3-D": N}[rows]
    x = torch.randn(n, 1, 4) if rows == "3-D" else torch.randn(n, 4)
    a, dy = torch.randn(n, 6), torch.randn(n, 4)
    with pytest.raises(ValueError, match="expert_mlp_backward_data: "):
        K.expert_mlp_backward_data(x, a, dy, w1, w2, idx, "swiglu", backend)
    with pytest.raises(ValueError, match="expert_mlp_backward_data: "):
        K.expert_mlp_backward(x, a, dy, w1, w2, idx, "swiglu", backend)


def test_the_grouped_launchers_check_their_rows():
    E, N = 2, 8
    idx = _index(E, N)
    w = torch.randn(E, 4, 5)
    with pytest.raises(ValueError, match="grouped_mm: the index holds 8 rows, the input 10"):
        K.grouped_mm_triton(torch.randn(10, 4), w, idx)
    with pytest.raises(ValueError, match="grouped_mm: x .* do not multiply"):
        K.grouped_mm_triton(torch.randn(8), w, idx)
    with pytest.raises(ValueError, match="grouped_wgrad: x .* must be 2-D with one row count"):
        K.grouped_wgrad_triton(torch.randn(8, 4), torch.randn(3, 5), idx, E)
    with pytest.raises(ValueError, match="grouped_wgrad: x .* must be 2-D"):
        K.grouped_wgrad_triton(torch.randn(8), torch.randn(8, 5), idx, E)
    with pytest.raises(ValueError, match="grouped_wgrad: the index holds 8 rows, the input 6"):
        K.grouped_wgrad_triton(torch.randn(6, 4), torch.randn(6, 5), idx, E)
    # the right rows still give every element of the reference
    x, dy = torch.randn(N, 4), torch.randn(N, 5)
    ref = torch.stack([x[s:t].double().t() @ dy[s:t].double() for s, t in
                       zip(idx.offsets[:-1].tolist(), idx.offsets[1:].tolist())])
    torch.testing.assert_close(K.grouped_wgrad_triton(x, dy, idx, E).double(), ref, rtol=1e-5, atol=1e-5)


def test_the_weight_gradient_step_checks_what_it_was_given():
    E, N = 2, 8
    idx = _index(E, N)
    w1, w2 = _mlp(E)
    x, a, dy = torch.randn(N, 4), torch.randn(N, 6), torch.randn(N, 4)
    _, saved = K.expert_mlp_backward_data(x, a, dy, w1, w2, idx, "swiglu", "triton")
    saved.dy = saved.dy[:2]
    with pytest.raises(ValueError, match=r"expert_mlp_backward_weight: saved dy \(2, 4\) is not 2-D of the index's 8"):
        K.expert_mlp_backward_weight(saved, E)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_are_one_error_on_every_backend(backend):
    idx = _index(2, 8)
    with pytest.raises(ValueError, match="grouped_mm: operand dtypes differ"):
        K.grouped_mm(torch.randn(8, 4, dtype=torch.float64), torch.randn(2, 4, 5), idx, backend)
    with pytest.raises(ValueError, match="grouped_mm: operand dtypes differ"):
        K.grouped_mm(torch.randn(8, 4), torch.randn(2, 4, 5, dtype=torch.float16), idx, backend)


def test_integer_activations_are_refused():
    a = torch.randint(-3, 3, (4, 6), dtype=torch.int32)
    with pytest.raises(ValueError, match="activation_triton: torch.int32 is not float16, bfloat16, float32 or float64"):
        K.activation_triton(a, "gelu")
    with pytest.raises(ValueError, match="activation_backward_triton: torch.int32 is not float16, bfloat16"):
        K.activation_backward_triton(a, torch.randn(4, 3), "swiglu")


def test_make_index_names_malformed_arguments():
    with pytest.raises(ValueError, match="make_index: token ids .* must be 1-D"):
        K.make_index(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([6]), 4)
    with pytest.raises(ValueError, match="make_index: token ids .* must be 1-D"):
        K.make_index(torch.zeros(6, dtype=torch.int64), torch.tensor([[6]]), 4)
    with pytest.raises(ValueError, match="make_index: num_tokens must be an integer >= 0, got -1"):
        K.make_index(torch.zeros(0, dtype=torch.int64), torch.tensor([0]), -1)
    idx = K.make_index(torch.tensor([1, 0, 1]), torch.tensor([2, 1]), torch.tensor(3))  # an integer 0-d tensor
    assert idx.num_tokens == 3 and idx.tok_offsets.tolist() == [0, 1, 3, 3]


def test_zero_experts_on_the_torch_backend_stay_in_the_graph():
    idx = K.make_index(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 3)
    k, m = random.randint(1, 6), random.randint(1, 6)
    x = torch.randn(0, k, requires_grad=True)
    w = torch.randn(0, k, m, requires_grad=True)
    y = K.grouped_mm(x, w, idx, "torch")
    assert y.shape == (0, m)
    y.sum().backward()
    assert x.grad.shape == (0, k) and w.grad.shape == (0, k, m)
