"""Expert parallelism over 4 real gloo ranks vs the single-process layer: outputs and every gradient, for every
router and every pipeline degree r in {1, 2, 4} (forward and backward set differently), each placement of the
backward weight gradients (fused, per-chunk, deferred - with the issue order checked), both collective issue
orders (dispatch-first, interleaved - checked too), flat and hierarchical all-to-all, and the dense-gradient all-reduce launched in slices inside the MoE backward gaps. The hierarchical
path is also checked to be asynchronous end to end: chunk k+1's inter-node step is issued before chunk k's expert
compute ends, and every process group sees its collectives in the same order on every rank, also when the ranks
run their computes at skewed speeds."""
import time

import torch
import torch.distributed as dist

import adasched.runtime.moe.ep as ep_mod

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import ExpertParallel, GradSliceReducer, MoELayer, RouterConfig
from adasched.runtime.moe.ep import ORDERS, WGRAD_MODES
from adasched.runtime.moe.router import ROUTER_KINDS

H, FFN, E = 8, 6, 8
ATOL = RTOL = 2e-5


def _inputs(world, seed):
    xs, gys = [], []
    for s in range(world):
        g = torch.Generator().manual_seed(seed * 100 + s)
        T = 9 + 3 * s                                    # uneven token counts per rank
        xs.append(torch.randn(T, H, generator=g))
        gys.append(torch.randn(T, H, generator=g))
    return xs, gys


def _close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=ATOL, rtol=RTOL)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} mismatched, first {bad.nonzero()[:3].tolist()}, "
                           f"max err {float((got - want).abs().max()):.3g}")


def _layer_case(rank, world, ep, kind, r_fwd, r_bwd, cf, seed, wgrad="fused", order="dispatch-first", shared=0):
    cfg = RouterConfig(kind=kind, num_experts=E, top_k=2, k_max=3, p=0.5, capacity_factor=cf)
    torch.manual_seed(seed)                              # same weights on every rank
    ref = MoELayer(H, FFN, cfg, backend="torch", shared_experts=shared).eval()
    if kind == "sigmoid_bias":
        ref.router.expert_bias.copy_(torch.randn(E) * 0.1)
    lay = MoELayer(H, FFN, cfg, backend="torch", ep=ep, r_fwd=r_fwd, r_bwd=r_bwd, wgrad=wgrad, order_fwd=order,
                   order_bwd=order, shared_experts=shared).eval()
    lay.router.load_state_dict(ref.router.state_dict())
    lay.load_full_experts(ref.w1.detach(), ref.w2.detach())
    if shared:
        with torch.no_grad():
            lay.shared_w1.copy_(ref.shared_w1)
            lay.shared_w2.copy_(ref.shared_w2)
    xs, gys = _inputs(world, seed)
    x = xs[rank].clone().requires_grad_(True)
    y = lay(x)
    ((y * gys[rank]).sum() + lay.aux_loss).backward()
    red = lay.router.proj.weight.grad.clone()
    dist.all_reduce(red)                                 # replicated router: sum of the ranks' gradients
    # reference: the single-process layer on every rank's tokens, gradients summed
    x_ref = None
    for s in range(world):
        xr = xs[s].clone().requires_grad_(s == rank)
        yr = ref(xr)
        ((yr * gys[s]).sum() + ref.aux_loss).backward()
        if s == rank:
            x_ref, y_ref = xr, yr.detach()
            stats_ref = ref.last_stats
    name = (f"{kind} r_fwd={r_fwd} r_bwd={r_bwd} wgrad={wgrad} order={order} cf={cf} hier={ep.hierarchical} "
            f"shared={shared}")
    _close(y, y_ref, f"{name}: output")
    _close(x.grad, x_ref.grad, f"{name}: dx")
    n, off = lay.w1.shape[0], lay.expert_offset
    _close(lay.w1.grad, ref.w1.grad[off:off + n], f"{name}: dw1")
    _close(lay.w2.grad, ref.w2.grad[off:off + n], f"{name}: dw2")
    _close(red, ref.router.proj.weight.grad, f"{name}: router grad")
    if shared:                                           # replicated shared expert: sum of the ranks' gradients
        for w_ep, w_ref in ((lay.shared_w1, ref.shared_w1), (lay.shared_w2, ref.shared_w2)):
            g = w_ep.grad.clone()
            dist.all_reduce(g)
            _close(g, w_ref.grad, f"{name}: shared expert grad")
    assert lay.last_stats.tokens_per_expert.tolist() == stats_ref.tokens_per_expert.tolist(), name
    assert lay.last_stats.dropped == stats_ref.dropped, name


def _gap_case(rank, world, ep):
    """moe1 -> dense -> moe2: the dense layer's gradient exists before moe1's backward, so its slice is
    all-reduced inside moe1's backward gaps; the result equals the mean of the reference gradients."""
    cfg = RouterConfig(kind="gshard", num_experts=E, top_k=2)
    torch.manual_seed(7)
    refs = [MoELayer(H, FFN, cfg, backend="torch"), torch.nn.Linear(H, H), MoELayer(H, FFN, cfg, backend="torch")]
    torch.manual_seed(8)
    eps = [MoELayer(H, FFN, cfg, backend="torch", ep=ep, r_fwd=2, r_bwd=4, wgrad="deferred"), torch.nn.Linear(H, H),
           MoELayer(H, FFN, cfg, backend="torch", ep=ep, r_fwd=4, r_bwd=2)]
    for a, b in zip(eps, refs):
        a.load_state_dict(b.state_dict(), strict=False) if not isinstance(a, MoELayer) else None
        if isinstance(a, MoELayer):
            a.router.load_state_dict(b.router.state_dict())
            a.load_full_experts(b.w1.detach(), b.w2.detach())
    dense = [p for m in eps for n, p in m.named_parameters() if not n.startswith("w")]
    reducer = GradSliceReducer(dense, slices=[0, 10 ** 6], average=True)
    eps[0].reducer = eps[2].reducer = reducer
    xs, gys = _inputs(world, 3)
    y = eps[2](eps[1](eps[0](xs[rank])))
    ((y * gys[rank]).sum() + eps[0].aux_loss + eps[2].aux_loss).backward()
    in_gaps = reducer.launched_in_gaps
    reducer.finish()
    assert in_gaps >= H * H + H, f"dense layer's gradient not reduced in moe1's gaps ({in_gaps} elements)"
    for s in range(world):
        yr = refs[2](refs[1](refs[0](xs[s])))
        ((yr * gys[s]).sum() + refs[0].aux_loss + refs[2].aux_loss).backward()
    want = [p.grad / world for m in refs for n, p in m.named_parameters() if not n.startswith("w")]
    for i, (p, w) in enumerate(zip(dense, want)):
        _close(p.grad, w, f"gap case: dense grad {i}")
    reducer.remove()


def _issue_order(events, pass_name):
    """Per process group kind, the (direction, chunk, step) of every collective issued in one pass, in issue
    order; and the event index of each (what, chunk, detail)."""
    ev = [e[1:] for e in events if e[0] == pass_name]
    intra, inter = [], []
    for what, chunk, detail in ev:
        if what == "issue":
            direction, step = detail
            # dispatch: step 1 intra-node, step 2 inter-node; combine: step 1 inter-node, step 2 intra-node
            on_intra = (direction == "dispatch") == (step == 1)
            (intra if on_intra else inter).append((direction, chunk, step))
    return ev, intra, inter


def _planned_two_step_order(r, stream):
    """(direction, chunk, step) of the planner's two-step tasks on one link (``intra``/``inter``), in queue order."""
    from adasched.planner.fsmoe.costmodel import StageCosts
    from adasched.planner.fsmoe.model import _tasks

    step = {"dispatch_intra": ("dispatch", 1), "dispatch": ("dispatch", 2), "combine": ("combine", 1),
            "combine_intra": ("combine", 2)}
    out = []
    for t in _tasks(StageCosts((0.0,) * 5, (1.0,) * 5, "order", two_step=True), r, "dispatch-first"):
        if t.stream == stream:
            name = t.name.rstrip("0123456789")
            out.append((step[name][0], int(t.name[len(name):]), step[name][1]))
    return out


def _async_case(rank, world, hier):
    """Hierarchical EP with r_fwd=4, r_bwd=3 and rank-skewed compute speeds: outputs and gradients still match
    the single-process layer; in each pass chunk k+1's inter-node dispatch is issued before chunk k's compute
    ends; each group's collectives are issued exactly once each, in program order."""
    fwd, bwd = ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward

    def slow(fn):
        def wrapped(*a, **k):
            time.sleep(0.004 * ((rank + 1) % world))    # rank 3 fastest, rank 2 slowest
            return fn(*a, **k)
        return wrapped

    ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward = slow(fwd), slow(bwd)
    hier.events = []
    try:
        _layer_case(rank, world, hier, "gshard", 4, 3, None, seed=91)
    finally:
        ep_mod.expert_mlp_forward, ep_mod.expert_mlp_backward = fwd, bwd
        events, hier.events = hier.events, None
    for pass_name, r in (("forward", 4), ("backward", 3)):
        ev, intra, inter = _issue_order(events, pass_name)
        assert intra == [("dispatch", c, 1) for c in range(r)] + [("combine", c, 2) for c in range(r)], (pass_name,
                                                                                                        intra)
        assert inter == [("dispatch", c, 2) for c in range(r)] + [("combine", c, 1) for c in range(r)], (pass_name,
                                                                                                        inter)
        # the planner's two-step layout (plan moe --two-step-a2a) queues each link's steps in this same order
        assert (_planned_two_step_order(r, "intra"), _planned_two_step_order(r, "inter")) == (intra, inter), pass_name
        for k in range(r - 1):
            issued = ev.index(("issue", k + 1, ("dispatch", 2)))
            ended = ev.index(("compute_end", k, None))
            assert issued < ended, f"{pass_name}: chunk {k + 1}'s inter-node dispatch issued after chunk {k}'s compute"
        # every chunk's inter-node dispatch is issued before that chunk's compute starts
        for k in range(r):
            assert ev.index(("issue", k, ("dispatch", 2))) < ev.index(("compute_start", k, None)), pass_name
    # the same per-group issue order on every rank (another order would pair mismatched collectives); the
    # interleaving of the two groups may differ with timing, so only each group's sequence is compared
    orders = [None] * world
    dist.all_gather_object(orders, [e for e in events if e[1] == "issue"])
    for pass_name in ("forward", "backward"):
        per_rank = [_issue_order(o, pass_name)[1:] for o in orders]
        assert all(p == per_rank[0] for p in per_rank), pass_name


def _wgrad_order_case(rank, world, flat):
    """Where the weight gradients run in the backward: "per-chunk" - chunk c's dW after chunk c's combine is
    issued and before chunk c+1's compute; "deferred" - every dW after the last combine is issued; "fused" -
    no separate dW step."""
    r = 3
    for wgrad in WGRAD_MODES:
        flat.events = []
        try:
            _layer_case(rank, world, flat, "gshard", 2, r, None, seed=5, wgrad=wgrad)
        finally:
            events, flat.events = flat.events, None
        ev = [e[1:] for e in events if e[0] == "backward"]
        dw = [i for i, e in enumerate(ev) if e[0] == "wgrad"]
        combine = [i for i, e in enumerate(ev) if e[0] == "issue" and e[2][0] == "combine"]
        starts = [ev.index(("compute_start", c, None)) for c in range(r)]
        assert len(combine) == r, ev
        if wgrad == "fused":
            assert dw == [], ev
        elif wgrad == "per-chunk":
            assert [ev[i][1] for i in dw] == list(range(r)), ev
            for c in range(r):
                assert combine[c] < dw[c], (wgrad, ev)
                assert c + 1 == r or dw[c] < starts[c + 1], (wgrad, ev)
        else:
            assert [ev[i][1] for i in dw] == list(range(r)), ev
            assert min(dw) > max(combine) and min(dw) > max(starts), (wgrad, ev)


def _wgrad_hier_case(rank, world, hier):
    """Hierarchical path, dW deferred and slow (0.3 s each): a combine's second (intra-node) step is issued as
    soon as its first step has finished - between two dW, not after all of them (the host thread checks before
    every dW). Gradients still match the single-process layer."""
    slow_w = ep_mod.expert_mlp_backward_weight

    def slow(*a, **k):
        time.sleep(0.3)
        return slow_w(*a, **k)

    r = 3
    ep_mod.expert_mlp_backward_weight = slow
    hier.events = []
    try:
        _layer_case(rank, world, hier, "gshard", 1, r, None, seed=13, wgrad="deferred")
    finally:
        ep_mod.expert_mlp_backward_weight = slow_w
        events, hier.events = hier.events, None
    ev = [e[1:] for e in events if e[0] == "backward"]
    dw = [i for i, e in enumerate(ev) if e[0] == "wgrad"]
    second = [i for i, e in enumerate(ev) if e[0] == "issue" and e[2] == ("combine", 2)]
    assert len(dw) == r and len(second) == r, ev
    assert max(second) < dw[-1], f"a combine's intra-node step waited for every dW: {ev}"


def _order_case(rank, world, flat):
    """Issue order of the collectives per pass: "dispatch-first" d0 d1 d2 c0 c1 c2; "interleaved" d0 d1 c0 d2 c1
    c2 (chunk c+1's dispatch just before chunk c's compute) - the two link orders the planner evaluates."""
    r = 3
    want = {"dispatch-first": [("dispatch", 0), ("dispatch", 1), ("dispatch", 2), ("combine", 0), ("combine", 1),
                               ("combine", 2)],
            "interleaved": [("dispatch", 0), ("dispatch", 1), ("combine", 0), ("dispatch", 2), ("combine", 1),
                            ("combine", 2)]}
    for order, seq in want.items():
        flat.events = []
        try:
            _layer_case(rank, world, flat, "gshard", r, r, None, seed=21, order=order)
        finally:
            events, flat.events = flat.events, None
        for pass_name in ("forward", "backward"):
            got = [(e[3][0], e[2]) for e in events if e[0] == pass_name and e[1] == "issue"]
            assert got == seq, (order, pass_name, got)


def _shared_case(rank, world, flat, hier):
    """A shared expert: outputs and every gradient equal the single-process layer's (flat and hierarchical, with
    deferred dW and the interleaved order on the flat path), and it runs once the first dispatches are issued,
    before chunk 0's compute, in both passes."""
    _layer_case(rank, world, flat, "gshard", 2, 3, None, seed=31, wgrad="deferred", order="interleaved", shared=2)
    hier.events = []
    try:
        _layer_case(rank, world, hier, "top_p", 3, 2, None, seed=32, wgrad="per-chunk", shared=1)
    finally:
        hev, hier.events = hier.events, None
    for pass_name in ("forward", "backward"):   # hierarchical: chunk 0's inter-node step goes out before the MLP
        ev = [e[1:] for e in hev if e[0] == pass_name]
        assert ev.index(("issue", 0, ("dispatch", 2))) < ev.index(("shared_start", -1, None)), (pass_name, ev)
    flat.events = []
    try:
        _layer_case(rank, world, flat, "gshard", 3, 3, None, seed=33, shared=1)
    finally:
        events, flat.events = flat.events, None
    for pass_name in ("forward", "backward"):
        ev = [e[1:] for e in events if e[0] == pass_name]
        start = ev.index(("shared_start", -1, None))
        assert ev.index(("shared_end", -1, None)) < ev.index(("compute_start", 0, None)), (pass_name, ev)
        issued_before = [e for e in ev[:start] if e[0] == "issue"]
        assert [(d[0], c) for _, c, d in issued_before] == [("dispatch", 0), ("dispatch", 1), ("dispatch", 2)], ev


def _worker(rank, world):
    flat = ExpertParallel.create(E)
    hier = ExpertParallel.create(E, hierarchical=True, gpus_per_node=2)
    cfg = RouterConfig(kind="gshard", num_experts=E, top_k=2)
    for kw in ({"order_fwd": "interleaved"}, {"order_bwd": "interleaved"}):   # flat exchanges only
        try:
            MoELayer(H, FFN, cfg, backend="torch", ep=hier, **kw)
            raise AssertionError(f"hierarchical EP accepted {kw}")
        except ValueError as err:
            assert "flat exchange" in str(err), err
    done = 0
    pairs = [(1, 2), (2, 4), (4, 1)]
    for i, kind in enumerate(ROUTER_KINDS):
        for j, (rf, rb) in enumerate(pairs):
            cf = 1.0 if (kind in ("gshard", "switch", "expert_choice") and j == 1) else None
            _layer_case(rank, world, flat, kind, rf, rb, cf, seed=10 * i + j,
                        wgrad=WGRAD_MODES[(i + j) % len(WGRAD_MODES)],
                        order=ORDERS[(i + j) % len(ORDERS)])
            done += 1
    for kind, rf, rb, cf, wg in [("gshard", 2, 1, 1.25, "deferred"), ("top_p", 4, 4, None, "per-chunk"),
                                 ("expert_choice", 1, 2, None, "fused"), ("gshard", 4, 3, None, "deferred")]:
        _layer_case(rank, world, hier, kind, rf, rb, cf, seed=77, wgrad=wg)
        done += 1
    _order_case(rank, world, flat)
    _shared_case(rank, world, flat, hier)
    done += 2
    _wgrad_order_case(rank, world, flat)
    _wgrad_hier_case(rank, world, hier)
    done += 2
    _async_case(rank, world, hier)
    done += 1
    _gap_case(rank, world, flat)
    return done + 1


def test_ep_matches_single_process_all_routers_all_r():
    done = spawn_gloo(_worker, 4, timeout_s=120)
    assert done == [len(ROUTER_KINDS) * 3 + 10] * 4


def _subgroup_hierarchical_worker(rank, world):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    try:
        ExpertParallel.create(4, group=groups[rank // 2], hierarchical=True, gpus_per_node=2)
    except ValueError as err:
        return str(err)
    return "created"


def test_hierarchical_create_on_a_subgroup_is_refused():
    """Each rank built only its own EP group's node groups (new_group calls differing between ranks: a reset
    connection on one rank, a hang on another); now a ValueError that points to create_groups, on every rank."""
    got = spawn_gloo(_subgroup_hierarchical_worker, 4, timeout_s=60)
    assert all(g.startswith("group: a hierarchical EP group of 2 of the 4 ranks; use ExpertParallel.create_groups")
               for g in got), got
