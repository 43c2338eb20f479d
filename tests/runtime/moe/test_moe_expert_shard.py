"""FSMoE's expert-sharded layout (``ExpertParallel.create_groups(..., expert_shards=S)``) on 4 real gloo ranks
against the single-process layer: nodes of S ranks each hold 1/S of the FFN width of the node's experts, a chunk's
rows cross the nodes in one all-to-all, are all-gathered inside the node and the partial outputs
reduce-scattered back. Outputs, input gradients, router gradients and every expert-shard gradient (summed over
the shard's copies) are checked element by element, for 2 nodes x 2 shards, 1 node x 4 shards and 2 copies of
1 node x 2 shards, every pipeline degree pair in {1, 2, 3}, the three weight-gradient placements, SwiGLU and GELU,
capacity drops and a shared expert."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import ExpertGradReducer, ExpertParallel, MoELayer, RouterConfig, split_parameters
from adasched.runtime.moe.ep import WGRAD_MODES

H, FFN, E = 8, 12, 4
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_moe_ep import H as EP_TEST_H, _close, _inputs  # noqa: E402  (uneven tokens per rank; element-wise check)

assert EP_TEST_H == H  # _inputs draws (T, H) tensors of that module's H


def _shard_of(full_w1, full_w2, lay):
    """The reference's (E, ...) tensors cut as ``lay`` holds them: its experts, its slice of the FFN width."""
    n, off, fs = lay.w1.shape[0], lay.expert_offset, lay.ffn_slice
    w1 = full_w1[off:off + n]
    w1 = torch.cat([w1[..., :FFN][..., fs], w1[..., FFN:][..., fs]], -1) if lay.activation == "swiglu" else w1[..., fs]
    return w1, full_w2[off:off + n][:, fs]


def _case(rank, world, ep, *, kind="gshard", r_fwd=1, r_bwd=1, wgrad="fused", cf=None, activation="swiglu",
          shared=0, seed=0, dp=None):
    """``dp``: (group, ranks) of a data-parallel group smaller than the world (the reference then sees only its
    ranks' tokens; the replicated gradients are summed over it)."""
    dp_group, dp_ranks = dp if dp is not None else (None, list(range(world)))
    cfg = RouterConfig(kind=kind, num_experts=E, top_k=2, k_max=3, p=0.5, capacity_factor=cf)
    torch.manual_seed(seed)                              # same weights on every rank
    ref = MoELayer(H, FFN, cfg, backend="torch", activation=activation, shared_experts=shared).eval()
    lay = MoELayer(H, FFN, cfg, backend="torch", activation=activation, ep=ep, r_fwd=r_fwd, r_bwd=r_bwd,
                   wgrad=wgrad, shared_experts=shared).eval()
    lay.router.load_state_dict(ref.router.state_dict())
    lay.load_full_experts(ref.w1.detach(), ref.w2.detach())
    w1_want, w2_want = _shard_of(ref.w1.detach(), ref.w2.detach(), lay)
    assert torch.equal(lay.w1, w1_want) and torch.equal(lay.w2, w2_want)
    if shared:
        with torch.no_grad():
            lay.shared_w1.copy_(ref.shared_w1)
            lay.shared_w2.copy_(ref.shared_w2)
    xs, gys = _inputs(world, seed + 1)
    x = xs[rank].clone().requires_grad_(True)
    y = lay(x)
    ((y * gys[rank]).sum() + lay.aux_loss).backward()
    name = (f"shards={ep.shards} ep={ep.size} {kind} {activation} r=({r_fwd},{r_bwd}) wgrad={wgrad} cf={cf} "
            f"shared={shared}")
    # every expert-shard gradient summed over its copies (the other domains) = the reference's over all tokens
    dw = [lay.w1.grad.clone(), lay.w2.grad.clone()]
    if ep.expert_dp_group is not None:
        for g in dw:
            dist.all_reduce(g, group=ep.expert_dp_group)
    red = lay.router.proj.weight.grad.clone()
    dist.all_reduce(red, group=dp_group)
    x_ref = y_ref = None
    for s in dp_ranks:
        xr = xs[s].clone().requires_grad_(s == rank)
        yr = ref(xr)
        ((yr * gys[s]).sum() + ref.aux_loss).backward()
        if s == rank:
            x_ref, y_ref = xr, yr.detach()
    _close(y, y_ref, f"{name}: output")
    _close(x.grad, x_ref.grad, f"{name}: dx")
    g1, g2 = _shard_of(ref.w1.grad, ref.w2.grad, lay)
    _close(dw[0], g1, f"{name}: dw1")
    _close(dw[1], g2, f"{name}: dw2")
    _close(red, ref.router.proj.weight.grad, f"{name}: router grad")
    if shared:
        for w_ep, w_ref in ((lay.shared_w1, ref.shared_w1), (lay.shared_w2, ref.shared_w2)):
            g = w_ep.grad.clone()
            dist.all_reduce(g, group=dp_group)
            _close(g, w_ref.grad, f"{name}: shared expert grad")


def _layouts(rank, world):
    """2 nodes x 2 shards (no copies), 1 node x 4 shards, and 2 domains of 1 node x 2 shards (2 copies): groups,
    then every pipeline / placement / router / activation case on each."""
    out = []
    for ep_size, shards in ((2, 2), (1, 4), (1, 2)):
        ep = ExpertParallel.create_groups(E, ep_size, expert_shards=shards)
        out.append((ep.size, ep.shards, ep.rank, ep.shard_rank, list(ep.ranks), list(ep.domain_ranks),
                    list(ep.expert_dp_ranks)))
        for r_fwd, r_bwd in ((1, 1), (2, 3), (3, 2)):
            for wgrad in WGRAD_MODES:
                _case(rank, world, ep, r_fwd=r_fwd, r_bwd=r_bwd, wgrad=wgrad, seed=r_fwd * 10 + r_bwd)
        _case(rank, world, ep, kind="switch", r_fwd=2, r_bwd=2, cf=1.0, activation="gelu", seed=5)
        _case(rank, world, ep, kind="top_p", r_fwd=2, r_bwd=1, shared=1, seed=6)
    return out


def test_expert_sharded_layer_matches_single_process():
    got = spawn_gloo(_layouts, 4, timeout_s=300)
    # (EP size, shards, EP index, shard index, EP group, domain, copies) per rank and layout
    assert got[0] == [(2, 2, 0, 0, [0, 2], [0, 1, 2, 3], [0]), (1, 4, 0, 0, [0], [0, 1, 2, 3], [0]),
                      (1, 2, 0, 0, [0], [0, 1], [0, 2])]
    assert got[1] == [(2, 2, 0, 1, [1, 3], [0, 1, 2, 3], [1]), (1, 4, 0, 1, [1], [0, 1, 2, 3], [1]),
                      (1, 2, 0, 1, [1], [0, 1], [1, 3])]
    assert got[2] == [(2, 2, 1, 0, [0, 2], [0, 1, 2, 3], [2]), (1, 4, 0, 2, [2], [0, 1, 2, 3], [2]),
                      (1, 2, 0, 0, [2], [2, 3], [0, 2])]
    assert got[3] == [(2, 2, 1, 1, [1, 3], [0, 1, 2, 3], [3]), (1, 4, 0, 3, [3], [0, 1, 2, 3], [3]),
                      (1, 2, 0, 1, [3], [2, 3], [1, 3])]


def _refusals(rank, world):
    msgs = []
    for kwargs in (dict(ep_size=2, expert_shards=4), dict(ep_size=1, expert_shards=3),
                   dict(ep_size=2, expert_shards=2, hierarchical=True), dict(ep_size=2, expert_shards=0)):
        with pytest.raises(ValueError) as err:
            ExpertParallel.create_groups(E, **kwargs)
        msgs.append(str(err.value))
    ep = ExpertParallel.create_groups(E, 2, expert_shards=2)
    with pytest.raises(ValueError) as err:               # 12 // 5: the FFN width does not split over the shards
        MoELayer(H, 10, RouterConfig(kind="gshard", num_experts=E), ep=ExpertParallel.create_groups(
            E, 1, expert_shards=4))
    msgs.append(str(err.value))
    with pytest.raises(ValueError) as err:
        MoELayer(H, FFN, RouterConfig(kind="gshard", num_experts=E), ep=ep, order_fwd="interleaved")
    msgs.append(str(err.value))
    from adasched.runtime.moe import prepare_for_deepspeed

    with pytest.raises(ValueError) as err:
        prepare_for_deepspeed(torch.nn.Sequential(MoELayer(H, FFN, RouterConfig(kind="gshard", num_experts=E), ep=ep)))
    msgs.append(str(err.value))
    return msgs


def test_expert_sharded_layout_refusals_name_the_argument():
    msgs = spawn_gloo(_refusals, 4, timeout_s=120)[0]
    assert msgs[0] == "ep_size: 2 x expert_shards 4 does not divide the data-parallel size 4"
    assert msgs[1] == "ep_size: 1 x expert_shards 3 does not divide the data-parallel size 4"
    assert msgs[2].startswith("expert_shards: the expert-sharded layout has its own exchange")
    assert msgs[3] == "expert_shards: 0 must be an int >= 1"
    assert msgs[4] == "ffn: 10 is not divisible by the expert shards 4"
    assert msgs[5].startswith("order_fwd='interleaved' needs the flat exchange: on the expert-sharded path")
    assert msgs[6].startswith("model: an MoELayer shards its experts over 2 ranks (expert_shards); DeepSpeed's")


def _reduced_step(rank, world):
    """ExpertGradReducer over the copies of a 1-node x 2-shard layout (2 domains): after finish() every shard's
    gradient is the gradient of the mean loss over the 4 ranks (reference / 4), and copies agree bitwise."""
    cfg = RouterConfig(kind="gshard", num_experts=E, top_k=2)
    ep = ExpertParallel.create_groups(E, 1, expert_shards=2)
    torch.manual_seed(3)
    ref = MoELayer(H, FFN, cfg, backend="torch")
    lay = MoELayer(H, FFN, cfg, backend="torch", ep=ep, r_fwd=2, r_bwd=2)
    lay.router.load_state_dict(ref.router.state_dict())
    lay.load_full_experts(ref.w1.detach(), ref.w2.detach())
    _, experts = split_parameters(lay)
    reducer = ExpertGradReducer(experts, ep)
    xs, gys = _inputs(world, 9)
    ((lay(xs[rank]) * gys[rank]).sum()).backward()
    reducer.finish()
    for s in range(world):
        ((ref(xs[s]) * gys[s]).sum()).backward()
    g1, g2 = _shard_of(ref.w1.grad / world, ref.w2.grad / world, lay)
    _close(lay.w1.grad, g1, "reduced dw1")
    _close(lay.w2.grad, g2, "reduced dw2")
    copies = [torch.empty_like(lay.w1.grad) for _ in range(2)]
    dist.all_gather(copies, lay.w1.grad, group=ep.expert_dp_group)
    return torch.equal(copies[0], copies[1])


def test_expert_sharded_gradients_reduce_over_copies():
    assert spawn_gloo(_reduced_step, 4, timeout_s=120) == [True] * 4


def _planned_sharded_order(r, stream):
    """(direction, chunk, step) of the planner's sharded-layout tasks on one link, in its queue order (dispatch-first):
    the inter-node all-to-alls are step 1 of a dispatch / step 2 of a combine, the intra-node all-gather step 2 of
    a dispatch, the reduce-scatter step 1 of a combine."""
    from adasched.planner.fsmoe.costmodel import StageCosts
    from adasched.planner.fsmoe.model import _tasks

    step = {"dispatch": ("dispatch", 1), "allgather": ("dispatch", 2), "reducescatter": ("combine", 1),
            "combine": ("combine", 2)}
    out = []
    for t in _tasks(StageCosts((0.0,) * 5, (1.0,) * 5, "order"), r, "dispatch-first"):
        if t.stream == stream:
            name = t.name.rstrip("0123456789")
            out.append((step[name][0], int(t.name[len(name):]), step[name][1]))
    return out


def _async_case(rank, world):
    """2 nodes x 2 shards, r_fwd=4, r_bwd=3, compute speeds skewed per rank (rank 2 slowest): results still match;
    in each pass chunk k+1's all-to-all is issued before chunk k's compute starts and every chunk's all-gather
    before its own compute; each group's collectives are issued once each, in the planner's queue order for the
    layout, the same on every rank."""
    import time

    import adasched.runtime.moe.ep as ep_mod

    ep = ExpertParallel.create_groups(E, 2, expert_shards=2)
    fwd, bwd = ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward

    def slow(fn):
        def wrapped(*a, **k):
            time.sleep(0.004 * ((rank + 1) % world))
            return fn(*a, **k)
        return wrapped

    ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward = slow(fwd), slow(bwd)
    ep.events = []
    try:
        _case(rank, world, ep, r_fwd=4, r_bwd=3, seed=91)
    finally:
        ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward = fwd, bwd
        events, ep.events = ep.events, None
    per_pass = {}
    for pass_name, r in (("forward", 4), ("backward", 3)):
        ev = [e[1:] for e in events if e[0] == pass_name]
        inter = [(d, c, s) for what, c, det in ev if what == "issue" for d, s in [det] if (d == "dispatch") == (s == 1)]
        intra = [(d, c, s) for what, c, det in ev if what == "issue" for d, s in [det] if (d == "dispatch") != (s == 1)]
        assert inter == _planned_sharded_order(r, "inter") == \
            [("dispatch", c, 1) for c in range(r)] + [("combine", c, 2) for c in range(r)], (pass_name, inter)
        assert intra == _planned_sharded_order(r, "intra") == \
            [("dispatch", c, 2) for c in range(r)] + [("combine", c, 1) for c in range(r)], (pass_name, intra)
        for k in range(r - 1):                           # chunk k+1's all-to-all is in flight during chunk k's compute
            assert ev.index(("issue", k + 1, ("dispatch", 1))) < ev.index(("compute_start", k, None)), (pass_name, k)
        for k in range(r):
            assert ev.index(("issue", k, ("dispatch", 2))) < ev.index(("compute_start", k, None)), (pass_name, k)
        per_pass[pass_name] = (inter, intra)
    return per_pass


def test_expert_sharded_pipeline_is_asynchronous_and_ordered():
    got = spawn_gloo(_async_case, 4, timeout_s=180)
    assert all(g == got[0] for g in got)


def _no_wait_case(rank, world):
    """No compute waits for a later chunk's inter-node transfer: rank 0 issues one chunk's dispatch 2 s late, so
    its EP peer (rank 2) cannot finish that all-to-all for 2 s. (a) Chunk 0 late, with a shared expert: rank 2 starts
    the shared expert before it can issue chunk 0's all-gather. (b) Chunk 1 late: rank 2 computes chunk 0 before
    chunk 1's all-gather can go out (rank 3's all-to-all partner is rank 1, on time: its all-gather may go first).
    Before, the pipeline first drove chunk c+1's exchange to its last step (the all-gather), which waited for the
    all-to-all: the shared expert and chunk 0 waited 1 s per second of delay."""
    import time

    import adasched.runtime.moe.ep as ep_mod

    ep = ExpertParallel.create_groups(E, 2, expert_shards=2)
    dispatch = ep_mod._Exchange.dispatch
    out = []
    for late, shared in ((0, 1), (1, 0)):
        def slow_dispatch(self, tensors, chunk, late=late):
            if rank == 0 and chunk == late and self.ep.events is not None:
                time.sleep(2.0)
            return dispatch(self, tensors, chunk)

        ep_mod._Exchange.dispatch = slow_dispatch
        ep.events = []
        try:
            _case(rank, world, ep, r_fwd=2, r_bwd=1, shared=shared, seed=40 + late)
        finally:
            ep_mod._Exchange.dispatch = dispatch
            events, ep.events = ep.events, None
        ev = [e[1:] for e in events if e[0] == "forward"]
        gather = ev.index(("issue", late, ("dispatch", 2)))
        first = ev.index(("shared_start", -1, None)) if late == 0 else ev.index(("compute_start", 0, None))
        out.append(first < gather)
    return out


def test_expert_sharded_compute_does_not_wait_for_later_transfers():
    got = spawn_gloo(_no_wait_case, 4, timeout_s=180)
    assert got[2] == [True, True], got


def _eight_ranks(rank, world):
    """8 ranks, EP 2 x 2 shards: two domains, so every shard has a copy in the other domain (expert_dp_group of 2)
    while the all-to-all spans 2 nodes - the case the 4-rank layouts cannot build."""
    ep = ExpertParallel.create_groups(E, 2, expert_shards=2)
    _case(rank, world, ep, r_fwd=2, r_bwd=3, wgrad="per-chunk", seed=71)
    _case(rank, world, ep, kind="switch", r_fwd=1, r_bwd=2, cf=1.0, activation="gelu", seed=72)
    return (list(ep.ranks), ep.shard_rank, list(ep.domain_ranks), list(ep.expert_dp_ranks))


def test_expert_sharded_with_copies_on_eight_ranks():
    got = spawn_gloo(_eight_ranks, 8, timeout_s=240)
    assert got[0] == ([0, 2], 0, [0, 1, 2, 3], [0, 4])
    assert got[3] == ([1, 3], 1, [0, 1, 2, 3], [3, 7])
    assert got[6] == ([4, 6], 0, [4, 5, 6, 7], [2, 6])
    assert got[7] == ([5, 7], 1, [4, 5, 6, 7], [3, 7])


def _custom_dp_group(rank, world):
    """4 ranks as 2 data-parallel groups {0, 2} and {1, 3} (the tensor-parallel pairs {0, 1}, {2, 3} outside):
    each group one domain of 1 node x 2 shards. Tokens, shards and gradient sums stay inside the group."""
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]         # every rank creates both, in order
    mine = [0, 2] if rank % 2 == 0 else [1, 3]
    dp = (groups[rank % 2], mine)
    ep = ExpertParallel.create_groups(E, 1, dp[0], expert_shards=2)
    _case(rank, world, ep, r_fwd=2, r_bwd=2, wgrad="deferred", seed=81, dp=dp)
    _case(rank, world, ep, kind="top_p", r_fwd=1, r_bwd=3, shared=1, activation="gelu", seed=82, dp=dp)
    return (list(ep.ranks), ep.shard_rank, list(ep.domain_ranks), list(ep.expert_dp_ranks), list(ep.dp_ranks))


def test_expert_sharded_on_a_custom_data_parallel_group():
    got = spawn_gloo(_custom_dp_group, 4, timeout_s=180)
    assert got == [([0], 0, [0, 2], [0], [0, 2]), ([1], 0, [1, 3], [1], [1, 3]),
                   ([2], 1, [0, 2], [2], [0, 2]), ([3], 1, [1, 3], [3], [1, 3])]
