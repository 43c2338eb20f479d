"""ExpertGradReducer without expert copies (EP over the whole data-parallel group: ``ExpertParallel.create`` or
``create_groups(E, D)``, train_moe's default): there is nothing to sum, only the 1 / data-parallel-size scaling.
It staged every expert gradient into bucket buffers from the backward hooks and kept them until ``finish()`` (a
second copy of every expert gradient, then copied back); now ``finish()`` scales the gradients in place and
nothing is staged. Single process: the reducer issues no collective in this case."""
from __future__ import annotations

import torch

from adasched.runtime.moe import ExpertGradReducer, ExpertParallel


def _ep(dp_size=4):
    return ExpertParallel(group=None, ranks=list(range(dp_size)), rank=1, num_experts=2 * dp_size)


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    # forward order; the unused one first, so it is last in backward order (a prefix of ready gradients exists)
    return [torch.nn.Parameter(torch.randn(2, 3, 4, generator=g)), torch.nn.Parameter(torch.randn(2, 5, 7, generator=g)),
            torch.nn.Parameter(torch.randn(2, 7, 5, generator=g))]


def _loss(ps, x):
    _unused, w1, w2 = ps
    return ((x @ w1).tanh() @ w2).square().sum()


def test_no_copies_scales_in_place_and_stages_nothing():
    ep = _ep()
    assert ep.expert_dp_group is None and ep.dp_size == 4
    ps = _params(1)
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(2))
    want = torch.autograd.grad(_loss(ps, x), ps[1:])
    red = ExpertGradReducer(ps, ep, bucket_elements=8)
    _loss(ps, x).backward()
    assert red.launched_elements == 0, "expert gradients were staged into buffers although nothing is summed"
    ptrs = [p.grad.data_ptr() for p in ps[1:]]
    red.finish()
    assert [p.grad.data_ptr() for p in ps[1:]] == ptrs
    for p, w in zip(ps[1:], want):
        torch.testing.assert_close(p.grad, w / 4, rtol=1e-6, atol=0)
    assert torch.equal(ps[0].grad, torch.zeros_like(ps[0]))      # no gradient here: zeros, as with copies
    red.remove()


def test_no_copies_gradient_accumulation():
    ep = _ep(2)
    ps = _params(3)
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 3, 5, generator=gen) for _ in range(2)]
    want = [sum(g) for g in zip(*(torch.autograd.grad(_loss(ps, x), ps[1:]) for x in xs))]
    red = ExpertGradReducer(ps, ep)
    with red.no_sync():
        _loss(ps, xs[0]).backward()
    _loss(ps, xs[1]).backward()
    red.finish()
    for p, w in zip(ps[1:], want):
        torch.testing.assert_close(p.grad, w / 2, rtol=1e-6, atol=1e-7)
    for p in ps:                                                   # the next step starts from zero grads
        p.grad = None
    _loss(ps, xs[0]).backward()
    red.finish()
    for p, w in zip(ps[1:], torch.autograd.grad(_loss(ps, xs[0]), ps[1:])):
        torch.testing.assert_close(p.grad, w / 2, rtol=1e-6, atol=1e-7)
    red.remove()
