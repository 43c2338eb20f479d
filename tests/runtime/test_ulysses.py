"""Ulysses attention on real gloo groups vs single-process attention (forward and q/k/v gradients), with
several degrees, uneven shards, a rank holding no token, mixed groups within one micro-batch, and head counts
the degree does not divide (a rank with no head when the degree exceeds them); and vs DeepSpeed's
DistributedAttention on a static group."""
import os

import pytest
import torch

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.ulysses import (head_range, packed_causal_attention, reference_packed_attention,
                                      shard_range, shard_sizes, ulysses_attention)

H, D = 8, 5
# micro-batches on 4 ranks: list of (ranks, sequence lengths) that run concurrently
MICRO_BATCHES = [
    [([0, 1, 2, 3], [13, 1, 9, 22])],             # degree 4, 45 tokens: uneven shards 12/11/11/11
    [([0, 1], [7, 5]), ([2, 3], [17])],           # two groups of degree 2, different batches
    [([0, 1], [6, 9, 3]), ([2], [11, 4]), ([3], [8])],  # mixed: one group of 2 + two groups of 1
    [([0, 1, 2, 3], [2, 1])],                     # 3 tokens over 4 ranks: rank 3 holds none
]


def _cu(lens):
    cu = [0]
    for s in lens:
        cu.append(cu[-1] + s)
    return cu


def _inputs(case, gi, lens, dtype, heads=H):
    g = torch.Generator().manual_seed(1000 * case + gi + 17 * heads)
    T = sum(lens)
    return [torch.randn(T, heads, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4)]  # q, k, v, dout


def _reference(q, k, v, dout, cu):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = reference_packed_attention(q, k, v, cu)
    (out * dout).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _ulysses_worker(rank, world, dtype_names, heads=H):
    from adasched.runtime.pg_pool import get_pool

    pool = get_pool(timeout_s=30)
    results = []
    for dtype_name in dtype_names:
        dtype = getattr(torch, dtype_name)
        for case, groups in enumerate(MICRO_BATCHES):
            for gi, (ranks, lens) in enumerate(groups):
                if rank not in ranks:
                    continue
                q, k, v, dout = _inputs(case, gi, lens, dtype, heads)
                cu = _cu(lens)
                a, b = shard_range(cu[-1], len(ranks), ranks.index(rank))
                x = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
                out = ulysses_attention(*x, cu, pool.group(ranks) if len(ranks) > 1 else None)
                (out * dout[a:b]).sum().backward()
                results.append((dtype_name, case, gi, a, b, out.detach(), *(t.grad for t in x)))
    return results


TOL = {"float64": 1e-10, "float32": 2e-5}


@pytest.mark.parametrize("heads", [H, 3, 6], ids=["heads8", "heads3-degree4-has-idle-rank", "heads6-uneven"])
def test_ulysses_matches_single_process(heads):
    dtypes = list(TOL) if heads == H else ["float64"]
    out = spawn_gloo(_ulysses_worker, 4, dtypes, heads, timeout_s=60)
    covered = {}
    for rank, results in enumerate(out):
        for dtype_name, case, gi, a, b, o, gq, gk, gv in results:
            ranks, lens = MICRO_BATCHES[case][gi]
            assert rank in ranks and o.dtype == getattr(torch, dtype_name) and o.shape == (b - a, heads, D)
            q, k, v, dout = _inputs(case, gi, lens, torch.float64, heads)
            if dtype_name == "float32":  # same inputs the workers saw, reference in float64
                q, k, v, dout = (t.float().double() for t in (q, k, v, dout))
            ref = _reference(q, k, v, dout, _cu(lens))
            tol = TOL[dtype_name]
            for name, got, want in zip(("out", "dq", "dk", "dv"), (o, gq, gk, gv), ref):
                torch.testing.assert_close(got.double(), want[a:b], rtol=tol, atol=tol,
                                           msg=f"{dtype_name} case {case} group {gi} {name}")
            covered.setdefault((dtype_name, case, gi), []).append((a, b))
    # every token of every group came back from exactly one rank
    for dtype_name in dtypes:
        for case, groups in enumerate(MICRO_BATCHES):
            for gi, (ranks, lens) in enumerate(groups):
                spans = sorted(covered[(dtype_name, case, gi)])
                assert spans == [shard_range(sum(lens), len(ranks), i) for i in range(len(ranks))]
    assert any(b == a for res in out for _, _, _, a, b, *_ in res)  # the empty-shard case really ran


def _empty_batch_worker(rank, world, heads, constant_attn):
    """Every rank of a degree-4 group: a micro-batch of no tokens (or an attn_fn whose output is a constant),
    forward and backward, then a barrier - a rank skipping the backward exchange hung the others."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    T = 0 if not constant_attn else 6
    cu = [0, T]
    lo, hi = shard_range(T, world, rank)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(hi - lo, heads, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    kw = {"attn_fn": lambda q_, k_, v_, b: torch.ones(q_.shape, dtype=q_.dtype)} if constant_attn else {}
    out = ulysses_attention(q, k, v, cu, group, **kw)
    (out.sum() + q.sum()).backward()
    dist.barrier(group)
    return [tuple(out.shape), q.grad.tolist(), k.grad is None or float(k.grad.abs().sum())]


@pytest.mark.parametrize("heads,constant_attn", [(2, False), (3, False), (4, False), (2, True), (3, True)])
def test_an_empty_batch_or_a_constant_attention_runs_the_backward_on_every_rank(heads, constant_attn):
    """FlexSP runtime hunt: with degree > heads, an empty micro-batch deadlocked its backward - the ranks with
    heads got packed_causal_attention's empty zeros outside the graph and skipped the backward all-to-all, the
    ranks without heads (their output a view of the exchange) ran it and waited until the timeout. An attn_fn
    returning a constant did the same on any batch."""
    out = spawn_gloo(_empty_batch_worker, 4, heads, constant_attn, timeout_s=60)
    T = 6 if constant_attn else 0
    for rank, (shape, q_grad, k_grad_sum) in enumerate(out):
        lo, hi = shard_range(T, 4, rank)
        assert shape == (hi - lo, heads, D)
        # q's gradient is the direct term only (the attention's output does not depend on q); k's is zero
        assert q_grad == torch.ones(hi - lo, heads, D, dtype=torch.float64).tolist()
        assert k_grad_sum is True or k_grad_sum == 0.0


def test_head_range_covers_every_head_once():
    assert [head_range(6, 4, j) for j in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert [head_range(3, 4, j) for j in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]  # rank 3: no head
    assert [head_range(40, 16, j)[1] - head_range(40, 16, j)[0] for j in range(16)] == [3] * 8 + [2] * 8


def test_local_attention_float32_and_shards():
    lens = [7, 1, 30, 12]
    q, k, v, dout = _inputs(9, 0, lens, torch.float32)
    cu = _cu(lens)
    want = _reference(q.double(), k.double(), v.double(), dout.double(), cu)
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    got = packed_causal_attention(*x, cu)
    (got * dout).sum().backward()
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got, *(t.grad for t in x)), want):
        torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5, msg=name)
    # ulysses with no group = local attention
    torch.testing.assert_close(ulysses_attention(q, k, v, cu, None), got.detach(), rtol=0, atol=0)
    assert shard_sizes(45, 4) == [12, 11, 11, 11] and shard_sizes(3, 4) == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="shard 0"):
        ulysses_attention(q[:5], k[:5], v[:5], cu, None)


def _deepspeed_worker(rank, world):
    os.environ["DS_BUILD_OPS"] = "0"
    import sys

    import deepspeed.comm as dcomm
    import deepspeed.comm.torch  # noqa: F401  (deepspeed.comm also exports the name `torch`: use sys.modules)
    from deepspeed.sequence.layer import DistributedAttention

    from adasched.runtime.pg_pool import get_pool

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel at init; all_to_all does not use
    # it, so skip the (~30 s) build: the comparison below runs DeepSpeed's real all-to-all path on gloo.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    dcomm.init_distributed(dist_backend="gloo", verbose=False)
    group = get_pool(timeout_s=30).group(range(world))
    lens = [5, 11, 1, 15]  # 32 tokens: DeepSpeed needs equal shards
    cu = _cu(lens)
    q, k, v, dout = _inputs(77, 0, lens, torch.float64)
    a, b = shard_range(cu[-1], world, rank)

    def local_attn(qq, kk, vv):  # DeepSpeed layout [s, batch=1, h, d]
        return packed_causal_attention(qq[:, 0], kk[:, 0], vv[:, 0], cu)[:, None]

    ds = DistributedAttention(local_attn, group, scatter_idx=2, gather_idx=0)
    x_ds = [t[a:b, None].clone().requires_grad_() for t in (q, k, v)]
    o_ds = ds(*x_ds, batch_dim_idx=1)[:, 0]
    (o_ds * dout[a:b]).sum().backward()
    x = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
    o = ulysses_attention(*x, cu, group)
    (o * dout[a:b]).sum().backward()
    ref = _reference(q, k, v, dout, cu)
    return ([o.detach(), *(t.grad for t in x)], [o_ds.detach(), *(t.grad[:, 0] for t in x_ds)],
            [r[a:b] for r in ref])


def test_ulysses_matches_deepspeed_distributed_attention(tmp_path, monkeypatch):
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # nothing should be compiled; if DeepSpeed tries, keep it here
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_ext"))
    monkeypatch.setenv("DS_BUILD_OPS", "0")
    out = spawn_gloo(_deepspeed_worker, 4, timeout_s=90)
    for rank, (ours, theirs, ref) in enumerate(out):
        for name, x, y, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"rank {rank} {name} vs DeepSpeed")
            torch.testing.assert_close(x, r, rtol=1e-10, atol=1e-10, msg=f"rank {rank} {name} vs reference")
