"""router_update="step": the router's state moves once per optimizer step from the statistics of every backward
since the last step (Megatron-core's expert-bias update), so gradient accumulation does not multiply the rate;
the default "backward" moves it in every backward. Single process and 2 gloo ranks with expert parallelism."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import ExpertParallel, MoELayer, RouterConfig, step_routers

RATE = 0.05


def _cfg(kind):
    if kind == "sigmoid_bias":
        return RouterConfig(kind="sigmoid_bias", num_experts=4, top_k=2, bias_update_rate=RATE)
    return RouterConfig(kind="top_p", num_experts=4, k_max=3, p=0.6, target_k=1.5, controller_rate=0.2)


def _micro(layer, x, use_checkpoint=False):
    y = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
    (y.square().mean() + layer.aux_loss).backward()
    st = layer.last_stats
    return st.tokens_per_expert.clone(), float(st.tokens_per_expert.sum()), st.num_tokens


def _expected(kind, layer0_state, counts, assign, tokens, cfg):
    if kind == "sigmoid_bias":
        c = counts.to(torch.float32)
        return layer0_state + RATE * torch.sign(c.mean() - c)
    mk = assign / tokens
    return min(1.0, max(cfg.p_min, layer0_state - cfg.controller_rate * (mk - cfg.target_k)))


@pytest.mark.parametrize("use_checkpoint", [False, True])
@pytest.mark.parametrize("kind", ["sigmoid_bias", "top_p"])
def test_step_mode_applies_accumulated_statistics_once(kind, use_checkpoint):
    torch.manual_seed(11)
    layer = MoELayer(8, 6, _cfg(kind), backend="torch", router_update="step")
    cfg = layer.router.config
    state = lambda: layer.router.expert_bias.clone() if kind == "sigmoid_bias" else layer.router.p  # noqa: E731
    for _step in range(3):
        s0 = state()
        stats = [_micro(layer, torch.randn(int(torch.randint(9, 30, ())), 8), use_checkpoint) for _ in range(3)]
        # nothing moves during the accumulation: the routing of micro-batch 2 and 3 used the step's start state
        if kind == "sigmoid_bias":
            assert torch.equal(state(), s0)
        else:
            assert state() == s0
        assert step_routers(layer) == 1
        counts = sum(s[0] for s in stats)
        want = _expected(kind, s0, counts, sum(s[1] for s in stats), sum(s[2] for s in stats), cfg)
        if kind == "sigmoid_bias":
            torch.testing.assert_close(state(), want, rtol=0, atol=1e-7)
            assert not torch.equal(state(), s0)
        else:
            assert state() == pytest.approx(want, rel=1e-12, abs=1e-12) and state() != s0
        assert step_routers(layer) == 1                       # nothing pending: no move
        if kind == "sigmoid_bias":
            torch.testing.assert_close(state(), want, rtol=0, atol=1e-7)
        else:
            assert state() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_backward_mode_moves_per_backward_and_step_routers_is_a_no_op():
    torch.manual_seed(12)
    layer = MoELayer(8, 6, _cfg("sigmoid_bias"), backend="torch")
    c1 = _micro(layer, torch.randn(20, 8))[0].float()
    after1 = RATE * torch.sign(c1.mean() - c1)
    torch.testing.assert_close(layer.router.expert_bias, after1, rtol=0, atol=1e-7)
    c2 = _micro(layer, torch.randn(20, 8))[0].float()
    want = after1 + RATE * torch.sign(c2.mean() - c2)
    torch.testing.assert_close(layer.router.expert_bias, want, rtol=0, atol=1e-7)
    assert step_routers(layer) == 0
    torch.testing.assert_close(layer.router.expert_bias, want, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="router_update: 'epoch'"):
        MoELayer(8, 6, _cfg("sigmoid_bias"), router_update="epoch")


def _ep_worker(rank, world):
    torch.manual_seed(100 + rank)                 # different data per rank, same router weights below
    ep = ExpertParallel.create(4)
    out = {}
    for kind in ("sigmoid_bias", "top_p"):
        torch.manual_seed(5)
        layer = MoELayer(8, 6, _cfg(kind), backend="torch", ep=ep, router_update="step")
        torch.manual_seed(200 + rank)
        stats = [_micro(layer, torch.randn(10 + 3 * rank + m, 8)) for m in range(2)]
        local = (sum(s[0] for s in stats), torch.tensor([sum(s[1] for s in stats), sum(s[2] for s in stats)],
                                                          dtype=torch.float64))
        step_routers(layer)
        state = layer.router.expert_bias.clone() if kind == "sigmoid_bias" else torch.tensor(layer.router.p)
        out[kind] = (local, state)
    # nothing pending on any rank (forwards without grad: no backward follows): the reduction of zeros moves nothing
    layer = MoELayer(8, 6, _cfg("sigmoid_bias"), backend="torch", ep=ep, router_update="step")
    with torch.no_grad():
        layer(torch.randn(12, 8))
    step_routers(layer)
    out["none"] = layer.router.expert_bias.clone()
    dist.barrier()
    return out


def test_step_mode_reduces_over_the_data_parallel_group_once():
    res = spawn_gloo(_ep_worker, 2, timeout_s=60)
    for kind in ("sigmoid_bias", "top_p"):
        counts = sum(r[kind][0][0] for r in res)
        nk = sum(r[kind][0][1] for r in res)
        if kind == "sigmoid_bias":
            c = counts.to(torch.float32)
            want = RATE * torch.sign(c.mean() - c)
        else:
            cfg = _cfg("top_p")
            want = torch.tensor(min(1.0, max(cfg.p_min, cfg.p - cfg.controller_rate * (float(nk[0] / nk[1])
                                                                                       - cfg.target_k))))
        for r in res:
            torch.testing.assert_close(r[kind][1].to(want.dtype), want, rtol=0, atol=1e-7)
    for r in res:
        assert torch.equal(r["none"], torch.zeros(4))
