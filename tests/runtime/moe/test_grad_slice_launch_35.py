"""A layer's planned dense-gradient slice goes out as ONE all-reduce whatever the backward degree r_bwd.

The FSMoE planner prices each layer's slice as alpha4 + beta4 * x (one launch); the runtime launched it in r_bwd
pieces, one per chunk gap, paying (r_bwd - 1) more latencies the plan did not count (Mixtral L4096 on 64 GPUs:
0.341 ms exposed per layer with r_bwd 2). The reduced gradients still equal the mean over ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import ExpertParallel, GradSliceReducer, MoELayer, RouterConfig

H, FFN, E = 8, 6, 4


def _worker(rank: int, world: int, r_bwd: int, slice_elems: int):
    ep = ExpertParallel.create(num_experts=E)
    torch.manual_seed(0)
    layer = MoELayer(H, FFN, RouterConfig(kind="gshard", num_experts=E, top_k=2), backend="torch", ep=ep,
                     r_fwd=2, r_bwd=r_bwd)
    post = torch.nn.Linear(H, H)  # after the MoE layer: its gradient exists when the layer's backward runs
    reducer = GradSliceReducer(list(post.parameters()), [float(slice_elems)])
    layer.reducer = reducer
    x = torch.randn(16, H, generator=torch.Generator().manual_seed(100 + rank))
    gy = torch.randn(16, H, generator=torch.Generator().manual_seed(200 + rank))
    sizes, real = [], dist.all_reduce

    def counting(t, *args, **kwargs):
        sizes.append(t.numel())
        return real(t, *args, **kwargs)

    dist.all_reduce = counting
    try:
        (post(layer(x)) * gy).sum().backward()
        in_backward = list(sizes)
        reducer.finish()
    finally:
        dist.all_reduce = real
    mine = [p.grad.clone() for p in post.parameters()]
    # the reference: every rank's local gradient, averaged by hand
    post.zero_grad(set_to_none=True)
    reducer.remove()
    layer.reducer = None
    (post(layer(x)) * gy).sum().backward()
    want = [p.grad.clone() for p in post.parameters()]
    for w in want:
        real(w)
        w /= world
    return in_backward, [(m - w).abs().max().item() for m, w in zip(mine, want)]


@pytest.mark.parametrize("r_bwd", [1, 4])
def test_one_all_reduce_per_layer_slice(r_bwd):
    total = H * H + H
    for slice_elems in (total, 50):
        out = spawn_gloo(_worker, 2, r_bwd, slice_elems, timeout_s=120)
        for in_backward, errors in out:
            assert in_backward == [slice_elems], (r_bwd, slice_elems, in_backward)
            assert max(errors) <= 1e-6, errors
