"""MoE numerics review: routing of every router under capacity against a slow per-token reference (which experts,
which gates, which assignments dropped), the auxiliary losses and their gradients against their formulas in
float64, a call with no tokens, activation-checkpoint recompute with stateful routers (sigmoid_bias bias,
top_p controller), gradient accumulation with the sliced dense all-reduce, and expert parallelism over 3 real
gloo ranks on the edges the 4-rank test does not reach (a rank with no tokens, an expert with no tokens, more
chunks than tokens, drops, the router state kept equal on every rank)."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from adasched.runtime.dist import spawn_gloo
from adasched.runtime.moe import ExpertParallel, GradSliceReducer, MoELayer, Router, RouterConfig
from adasched.runtime.moe.router import ROUTER_KINDS


# ---------------------------------------------------------------------------------------------------
# routing against a per-token reference
# ---------------------------------------------------------------------------------------------------
def _choices(kind, logits, bias, k, p, k_max):
    """Per token, its ordered choices [(expert, gate)] (choice rank = list position), from float64 logits."""
    out = []
    for t in range(logits.shape[0]):
        row = logits[t]
        if kind == "sigmoid_bias":                       # renormalised over the chosen k when k > 1 (Megatron)
            s = torch.sigmoid(row)
            sel = sorted(range(len(row)), key=lambda e: -(float(s[e]) + float(bias[e])))[:k]
            tot = sum(float(s[e]) for e in sel) if k > 1 else 1.0
            out.append([(e, float(s[e]) / tot) for e in sel])
            continue
        pr = torch.softmax(row, 0)
        order = sorted(range(len(row)), key=lambda e: -float(pr[e]))
        if kind == "switch":
            out.append([(order[0], float(pr[order[0]]))])
        elif kind == "gshard":                           # renormalised over the chosen k when k > 1
            sel = order[:k]
            tot = sum(float(pr[e]) for e in sel) if k > 1 else 1.0
            out.append([(e, float(pr[e]) / tot) for e in sel])
        else:                                            # top_p: prefix reaching p, crossing element kept
            sel, acc = [], 0.0
            for e in order[:k_max]:
                sel.append((e, float(pr[e])))
                acc += float(pr[e])
                if acc >= p:
                    break
            out.append(sel)
    return out


def _capacity_reference(choices, E, cf, policy):
    """GShard/DeepSpeed drop order ("position"): an expert keeps first choices before second choices, and within a
    choice rank earlier tokens first; "probs": the highest gates. C = ceil(cf * assignments / E)."""
    cands = [(rank, t, e, g) for t, ch in enumerate(choices) for rank, (e, g) in enumerate(ch)]
    if cf is None:
        return sorted((t, e, g) for _, t, e, g in cands), 0
    cap = min(len(cands), math.ceil(Fraction(str(cf)) * len(cands) / E))  # the factor as written (1.1 is 11/10)
    kept = []
    for e in range(E):
        mine = [c for c in cands if c[2] == e]
        mine.sort(key=(lambda c: (c[0], c[1])) if policy == "position" else (lambda c: -c[3]))
        kept += mine[:cap]
    return sorted((t, e, g) for _, t, e, g in kept), len(cands) - len(kept)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("kind,k", [("gshard", 3), ("gshard", 1), ("switch", 1), ("sigmoid_bias", 3),
                                    ("sigmoid_bias", 1), ("top_p", 3)])
def test_routing_and_drops_match_per_token_reference(kind, k, policy):
    E, T, Hd = 5, 23, 10
    torch.manual_seed(11)
    cfg = RouterConfig(kind=kind, num_experts=E, top_k=k, capacity_factor=0.6, drop_policy=policy, p=0.55, k_max=3)
    r = Router(Hd, cfg)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(T, Hd)
    out = r(x)
    logits = (x.double() @ r.proj.weight.detach().double().t())
    want, dropped = _capacity_reference(_choices(kind, logits, r.expert_bias.double(), k, 0.55, 3), E, 0.6, policy)
    got = sorted(zip(out.token_idx.tolist(), out.expert_idx.tolist(), out.weight.tolist()))
    assert [g[:2] for g in got] == [w[:2] for w in want], kind
    torch.testing.assert_close(torch.tensor([g[2] for g in got], dtype=torch.float64),
                               torch.tensor([w[2] for w in want], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert dropped > 0 and out.stats.dropped == dropped
    assert out.counts.tolist() == [sum(1 for w in want if w[1] == e) for e in range(E)]
    assert out.stats.mean_k == pytest.approx(len(want) / T)


@pytest.mark.parametrize("kind,k", [("gshard", 1), ("switch", 1), ("sigmoid_bias", 1), ("sigmoid_bias", 2),
                                    ("top_p", 1), ("expert_choice", 1)])
def test_task_loss_trains_the_router_at_every_k(kind, k):
    """The gates carry the router's gradient for every router at k = 1 too: sigmoid_bias renormalised a single
    chosen score to the constant 1, so its router got no gradient from the task loss (max |grad| ~1e-6, rounding)."""
    torch.manual_seed(18)
    layer = MoELayer(8, 6, RouterConfig(kind=kind, num_experts=4, top_k=k, k_max=k, z_loss_coef=0.0,
                                        aux_loss_coef=0.0, entropy_coef=0.0), backend="torch")
    x = torch.randn(10, 8, dtype=torch.float64)
    layer.double()
    layer(x).square().sum().backward()
    g = layer.router.proj.weight.grad
    assert g.abs().max() > 1e-3, (kind, k, g.abs().max())
    # and it is the true gradient: a central finite difference on one router weight (float64 end to end: the router
    # routes a float64 layer in float64, so a step of 1e-6 and a 1e-6 tolerance)
    w = layer.router.proj.weight
    i, j = divmod(int(g.abs().argmax()), g.shape[1])
    sel = layer.router(x).expert_idx
    with torch.no_grad():
        w[i, j] += 1e-6
        up = layer(x).square().sum()
        assert torch.equal(layer.router(x).expert_idx, sel)
        w[i, j] -= 2e-6
        down = layer(x).square().sum()
        assert torch.equal(layer.router(x).expert_idx, sel)
        w[i, j] += 1e-6
    assert float((up - down) / 2e-6) == pytest.approx(float(g[i, j]), rel=1e-6)


def test_capacity_changed_between_steps():
    """A capacity factor (or k) changed on a live layer between steps takes effect at the next forward and equals
    a layer built with it; a bad value raises naming it and leaves the old one (it was taken as is: 0 dropped every
    assignment)."""
    torch.manual_seed(19)
    live = MoELayer(8, 6, RouterConfig(kind="gshard", num_experts=4, top_k=2), backend="torch")
    x = torch.randn(24, 8)
    for cf, k in ((None, 2), (0.5, 2), (3.0, 1), (0.25, 3)):
        live.router.config.capacity_factor = cf
        live.router.config.top_k = k
        fresh = MoELayer(8, 6, RouterConfig(kind="gshard", num_experts=4, top_k=k, capacity_factor=cf),
                         backend="torch")
        fresh.load_state_dict(live.state_dict())
        torch.testing.assert_close(live(x), fresh(x), rtol=0, atol=0)
        assert live.last_stats.as_dict() == fresh.last_stats.as_dict()
        assert (live.last_stats.dropped > 0) == (cf is not None and cf < 1)
    for field, bad, needle in (("capacity_factor", 0.0, "capacity_factor: 0.0"), ("top_k", 5, "top_k: 5"),
                               ("drop_policy", "random", "drop_policy: 'random'")):
        before = getattr(live.router.config, field)
        with pytest.raises(ValueError, match=needle):
            setattr(live.router.config, field, bad)
        assert getattr(live.router.config, field) == before


def _aux_reference(kind, logits, cfg, assignments_before_drop):
    """The aux terms from their formulas in float64 (differentiable in logits)."""
    T, E = logits.shape
    aux = cfg.z_loss_coef * torch.logsumexp(logits, -1).square().mean()
    if kind in ("gshard", "switch", "top_p"):
        probs = torch.softmax(logits, -1)
        f = torch.bincount(assignments_before_drop, minlength=E).double() / assignments_before_drop.numel()
        aux = aux + cfg.aux_loss_coef * E * (f * probs.mean(0)).sum()
        if kind == "top_p":
            aux = aux + cfg.entropy_coef * (-(probs * probs.log()).sum(-1)).mean()
    return aux


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_aux_losses_and_their_gradients_match_formulas(kind):
    E, T, Hd = 6, 19, 8
    torch.manual_seed(12)
    cfg = RouterConfig(kind=kind, num_experts=E, top_k=2, p=0.5, k_max=3, aux_loss_coef=0.3, z_loss_coef=0.2,
                       entropy_coef=0.1, capacity_factor=0.8 if kind != "expert_choice" else 1.0)
    r = Router(Hd, cfg)
    x = torch.randn(T, Hd)
    out = r(x)
    out.aux_loss.backward()
    w = r.proj.weight.detach().double().requires_grad_(True)
    logits = x.double() @ w.t()
    before = torch.tensor([e for ch in _choices(kind, logits.detach(), r.expert_bias.double(), 2, 0.5, 3)
                           for e, _ in ch]) if kind != "expert_choice" else None
    want = _aux_reference(kind, logits, cfg, before)
    want.backward()
    torch.testing.assert_close(out.aux_loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.proj.weight.grad.double(), w.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_no_tokens_gives_zero_aux_loss_not_nan(kind):
    """A rank whose batch is empty (uneven data-parallel shards): the router's losses were mean() over nothing =
    NaN, which poisons a logged or summed loss; now 0, and the layer runs forward and backward on 0 rows."""
    torch.manual_seed(13)
    cfg = RouterConfig(kind=kind, num_experts=4, top_k=2, capacity_factor=1.0 if kind == "gshard" else None)
    layer = MoELayer(8, 6, cfg, backend="torch")
    x = torch.randn(0, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 8)
    assert torch.isfinite(layer.aux_loss) and float(layer.aux_loss.detach()) == 0.0, (kind, layer.aux_loss)
    (y.sum() + layer.aux_loss).backward()
    assert torch.all(layer.router.proj.weight.grad == 0) and torch.all(layer.w1.grad == 0)
    assert layer.last_stats.num_tokens == 0 and layer.last_stats.mean_k == 0.0


# ---------------------------------------------------------------------------------------------------
# activation checkpointing with stateful routers
# ---------------------------------------------------------------------------------------------------
_STATEFUL = {"sigmoid_bias": dict(bias_update_rate=0.5),
             "top_p": dict(p=0.9, k_max=3, target_k=1.2, controller_rate=0.5)}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("kind", list(_STATEFUL))
def test_checkpoint_recompute_routes_like_the_forward(kind, reentrant):
    """torch.utils.checkpoint (Megatron/DeepSpeed activation recompute) replays the layer's forward in the backward.
    The router state (sigmoid_bias's bias, top_p's controlled p) used to move in the forward, so the replay routed
    with the moved state: other experts, silently wrong gradients (dx off by ~5 on this case), the state moved
    twice, or a CheckpointError (top_p, non-reentrant). Now the state moves once, when the backward reaches the
    gates: every gradient and the state after each step equal the run without checkpointing. (Reentrant
    checkpointing runs the first forward under no_grad, so ``layer.aux_loss`` read after it carries no graph - a
    limitation of side-channel losses under reentrant recompute: the comparison leaves the aux loss out there.)"""
    torch.manual_seed(14)
    plain = MoELayer(8, 6, RouterConfig(kind=kind, num_experts=4, top_k=2, **_STATEFUL[kind]), backend="torch")
    ckpt = copy.deepcopy(plain)
    for step in range(3):
        x = torch.randn(20, 8, generator=torch.Generator().manual_seed(step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = plain(xa)
        (ya.square().sum() + (0 if reentrant else plain.aux_loss)).backward()
        yb = checkpoint(ckpt, xb, use_reentrant=reentrant)
        (yb.square().sum() + (0 if reentrant else ckpt.aux_loss)).backward()
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
        for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=lambda m, n=n: f"step {step} {n}: {m}")
        torch.testing.assert_close(ckpt.router.expert_bias, plain.router.expert_bias, rtol=0, atol=0)
        assert ckpt.router.p == plain.router.p
    # and the state did move, once per step
    if kind == "sigmoid_bias":
        assert plain.router.expert_bias.abs().sum() > 0
    else:
        assert plain.router.p < 0.9


@pytest.mark.parametrize("mode", ["plain", "reentrant", "non-reentrant"])
def test_attached_aux_loss_trains_the_router_under_checkpointing(mode):
    """attach_aux_loss=True: the router losses' gradient rides on the output's backward. Under reentrant
    checkpointing ``layer.aux_loss`` comes from a no_grad forward (no graph: adding it to the loss trained nothing);
    attached, every gradient equals the un-checkpointed layer with ``loss + aux_loss``."""
    torch.manual_seed(16)
    cfg = RouterConfig(kind="top_p", num_experts=4, k_max=3, p=0.6, aux_loss_coef=0.5, z_loss_coef=0.1,
                       entropy_coef=0.2)
    plain = MoELayer(8, 6, cfg, backend="torch")
    att = MoELayer(8, 6, cfg, backend="torch", attach_aux_loss=True)
    att.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = plain(xa)
    (ya.square().sum() + plain.aux_loss).backward()
    yb = att(xb) if mode == "plain" else checkpoint(att, xb, use_reentrant=mode == "reentrant")
    yb.square().sum().backward()
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    assert not att.aux_loss.requires_grad and float(att.aux_loss) == float(plain.aux_loss.detach()) > 0
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-7)
    for (n, p), (_, q) in zip(plain.named_parameters(), att.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    with pytest.raises(ValueError, match="attach_aux_loss: 1"):
        MoELayer(8, 6, cfg, attach_aux_loss=1)


def test_attached_aux_loss_follows_a_loss_scale_and_allows_in_place_on_the_output():
    """A scaled backward (GradScaler, DeepSpeed fp16 loss scale, loss / accumulation steps) with
    ``aux_loss_scale`` = that factor gives the grads of ``(loss + aux_loss) * scale`` (the attached gradient was a
    fixed 1: under a loss scale of 1024 the aux loss weighed 1/1024 after unscaling); and the output can be modified
    in place (``h += x``; it was a view made in a custom Function: RuntimeError)."""
    torch.manual_seed(17)
    cfg = RouterConfig(kind="gshard", num_experts=4, top_k=2, aux_loss_coef=0.5, z_loss_coef=0.1)
    plain = MoELayer(8, 6, cfg, backend="torch")
    att = MoELayer(8, 6, cfg, backend="torch", attach_aux_loss=True)
    att.load_state_dict(plain.state_dict())
    S = 1024.0
    x = torch.randn(2, 5, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = plain(xa)
    ya = ya + xa
    ((ya.square().sum() + plain.aux_loss) * S).backward()
    att.aux_loss_scale = S
    yb = att(xb)
    yb += xb                                                  # an in-place residual on the attached output
    (yb.square().sum() * S).backward()
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-6, atol=1e-4)
    for (n, p), (_, q) in zip(plain.named_parameters(), att.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    # under reentrant checkpointing (no in-place there: torch refuses it on any checkpointed output)
    xc = x.clone().requires_grad_()
    att.zero_grad()
    yc = checkpoint(att, xc, use_reentrant=True) + xc
    (yc.square().sum() * S).backward()
    torch.testing.assert_close(xc.grad, xa.grad, rtol=1e-6, atol=1e-4)
    for (n, p), (_, q) in zip(plain.named_parameters(), att.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    att.aux_loss_scale = float("nan")
    with pytest.raises(ValueError, match="aux_loss_scale"):
        att(xb)


def test_router_state_survives_checkpoints_and_dtype_casts():
    """The controlled p is in the state_dict (it was a plain attribute: a resumed run routed with config.p again);
    a state_dict without it (saved before) still loads strictly; ``.to(bfloat16)`` keeps the bias and p in full
    precision (a bf16 bias at 0.6 swallowed every 1e-3 step)."""
    torch.manual_seed(17)
    cfg = RouterConfig(kind="top_p", num_experts=4, k_max=3, p=0.9, target_k=1.2, controller_rate=0.3)
    layer = MoELayer(8, 6, cfg, backend="torch")
    for _ in range(2):
        layer(torch.randn(12, 8)).sum().backward()
    assert layer.router.p < 0.9
    resumed = MoELayer(8, 6, cfg, backend="torch")
    resumed.load_state_dict(layer.state_dict())
    assert resumed.router.p == layer.router.p
    old = {k: v for k, v in layer.state_dict().items() if not k.endswith("p_threshold")}
    resumed.router.p = 0.33
    resumed.load_state_dict(old)                          # strict: an older checkpoint still loads
    assert resumed.router.p == 0.33
    half = MoELayer(8, 6, RouterConfig(kind="sigmoid_bias", num_experts=4, top_k=1), backend="torch")
    half = half.to(torch.bfloat16)
    assert half.w1.dtype == torch.bfloat16 and half.router.proj.weight.dtype == torch.bfloat16
    assert half.router.expert_bias.dtype == torch.float32 and half.router.p_threshold.dtype == torch.float64
    half.router.expert_bias.fill_(0.6)
    half.router.update_bias(torch.tensor([1, 2, 3, 10]))
    torch.testing.assert_close(half.router.expert_bias, torch.tensor([0.601, 0.601, 0.601, 0.599]))
    y = half.train()(torch.randn(6, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert half.router.expert_bias.dtype == torch.float32


def test_dtype_cast_keeps_the_router_state_values_not_only_their_dtype():
    """``.to(bfloat16)`` / ``.half()`` keep the bias and p at their values: they were cast down and back up, so a
    bias of 0.6003 became 0.6016 (more than one 1e-3 update step) and p 0.41234568 became 0.41210938."""
    bias = torch.tensor([0.6003, -0.3001, 1e-4, 1.2345])
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        r = Router(8, RouterConfig(kind="top_p", num_experts=4, k_max=2, p=0.4))
        r.p = 0.4123456789
        r.expert_bias.copy_(bias)
        r = cast(r)
        assert r.proj.weight.dtype in (torch.bfloat16, torch.float16)
        assert r.p == 0.4123456789 and torch.equal(r.expert_bias, bias)
        r = r.float()
        assert r.p == 0.4123456789 and torch.equal(r.expert_bias, bias)


def test_router_state_moves_with_the_backward_once():
    torch.manual_seed(15)
    layer = MoELayer(8, 6, RouterConfig(kind="top_p", num_experts=4, k_max=3, **{k: v for k, v in
                                        _STATEFUL["top_p"].items() if k != "k_max"}), backend="torch")
    x = torch.randn(16, 8)
    y = layer(x)
    assert layer.router.p == 0.9 and layer.last_stats.p == 0.9
    mean_k = layer.last_stats.mean_k
    y.sum().backward(retain_graph=True)
    want = min(1.0, max(0.01, 0.9 - 0.5 * (mean_k - 1.2)))
    assert layer.router.p == pytest.approx(want)
    y.sum().backward()                                   # the same graph again: no second step
    assert layer.router.p == pytest.approx(want)
    layer.eval()
    layer(x).sum().backward()                            # eval: no step
    assert layer.router.p == pytest.approx(want)



def test_router_state_step_reads_nothing_back_to_the_host():
    """The layer's router-state step of a training forward (top_p controller, sigmoid_bias bias) makes no
    device-to-host read (``aten._local_scalar_dense``: item()/float()): the top_p one did float(nk[0]) after the
    dispatch, a device sync at the end of every training forward on a GPU. p still moves by the float formula
    exactly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    for kind, extra in (("top_p", dict(k_max=3, p=0.7, target_k=1.3, controller_rate=0.2)),
                        ("sigmoid_bias", dict(top_k=2))):
        torch.manual_seed(18)
        layer = MoELayer(8, 6, RouterConfig(kind=kind, num_experts=4, **extra), backend="torch")
        routing = layer.router(torch.randn(11, 8, requires_grad=True))
        Reads.n = 0
        with Reads():
            layer._schedule_router_update(routing)
        assert Reads.n == 0, kind
        if kind == "top_p":
            mean_k = routing.token_idx.numel() / 11
            routing.weight.sum().backward()
            assert layer.router.p == min(1.0, max(0.01, 0.7 - 0.2 * (mean_k - 1.3)))

# ---------------------------------------------------------------------------------------------------
# expert parallelism over 3 gloo ranks
# ---------------------------------------------------------------------------------------------------
HID, FFN, E3 = 8, 6, 6
ATOL = RTOL = 2e-5


def _close(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=ATOL, rtol=RTOL)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} mismatched, max err {(got - want).abs().max():.3g}"


def _ep_case(rank, world, ep, cfg, Ts, r_fwd, r_bwd, seed, *, wgrad="fused", bias=None, train=False, steps=1,
             ckpt=False, backend="torch"):
    """The EP layer on this rank's tokens vs the single-process layer on every rank's tokens (gradients summed
    over ranks for the replicated router), over ``steps`` training steps; returns the EP layer."""
    torch.manual_seed(seed)
    ref = MoELayer(HID, FFN, cfg, backend="torch").train(train)
    if bias is not None:
        ref.router.expert_bias.copy_(bias)
    lay = MoELayer(HID, FFN, cfg, backend=backend, ep=ep, r_fwd=r_fwd, r_bwd=r_bwd, wgrad=wgrad).train(train)
    lay.router.load_state_dict(ref.router.state_dict())
    lay.load_full_experts(ref.w1.detach(), ref.w2.detach())
    name = (f"{cfg.kind} cf={cfg.capacity_factor} T={Ts} r=({r_fwd},{r_bwd}) ckpt={ckpt} backend={backend} "
            f"hier={ep.hierarchical}/{ep.gpus_per_node}")
    for step in range(steps):
        gens = [torch.Generator().manual_seed(1000 * seed + 10 * step + s) for s in range(world)]
        xs = [torch.randn(T, HID, generator=g) for T, g in zip(Ts, gens)]
        gys = [torch.randn(T, HID, generator=g) for T, g in zip(Ts, gens)]
        for m in (ref, lay):
            for q in m.parameters():
                q.grad = None
        x = xs[rank].clone().requires_grad_(True)
        y = checkpoint(lay, x, use_reentrant=False) if ckpt else lay(x)
        ((y * gys[rank]).sum() + lay.aux_loss).backward()
        # reference: one layer, every rank's tokens; the routing state moves once, on the group's statistics
        router_state = copy.deepcopy(ref.router.state_dict()), ref.router.p
        outs, counts, assigned = [], torch.zeros(cfg.num_experts, dtype=torch.int64), 0
        for s in range(world):
            ref.router.load_state_dict(router_state[0])
            ref.router.p = router_state[1]
            xr = xs[s].clone().requires_grad_(True)
            yr = ref(xr)
            counts += ref.last_stats.tokens_per_expert
            assigned += int(ref.last_stats.tokens_per_expert.sum())
            outs.append((xr, yr, ref.last_stats))
            ((yr * gys[s]).sum() + ref.aux_loss).backward()
        ref.router.load_state_dict(router_state[0])      # undo the per-call steps; apply the group's once
        ref.router.p = router_state[1]
        if train and cfg.kind == "sigmoid_bias":
            ref.router.update_bias(counts)
        if train and cfg.kind == "top_p" and cfg.target_k is not None:
            ref.router.controller_step(assigned / max(sum(Ts), 1))
        xr, yr, st = outs[rank]
        _close(y.detach(), yr.detach(), f"{name} step {step}: output")
        _close(x.grad, xr.grad, f"{name} step {step}: dx")
        off, n = lay.expert_offset, lay.w1.shape[0]
        _close(lay.w1.grad, ref.w1.grad[off:off + n], f"{name} step {step}: dw1")
        _close(lay.w2.grad, ref.w2.grad[off:off + n], f"{name} step {step}: dw2")
        g = lay.router.proj.weight.grad.clone()
        dist.all_reduce(g)
        _close(g, ref.router.proj.weight.grad, f"{name} step {step}: router grad")
        assert lay.last_stats.as_dict() == st.as_dict(), name
        torch.testing.assert_close(lay.router.expert_bias, ref.router.expert_bias, rtol=0, atol=0)
        assert lay.router.p == pytest.approx(ref.router.p, abs=1e-12), (name, lay.router.p, ref.router.p)
        with torch.no_grad():                             # a small SGD step on both, so step 2 routes differently
            for m in (ref, lay):
                m.router.proj.weight -= 0.5 * (g if m is lay else ref.router.proj.weight.grad)
    return lay


def _ep_worker(rank, world):
    ep = ExpertParallel.create(E3)
    done = 0
    # drops + uneven tokens + a rank with none + more chunks than a rank has tokens (empty chunks)
    for kind, policy in (("gshard", "position"), ("top_p", "probs")):
        cfg = RouterConfig(kind=kind, num_experts=E3, top_k=2, k_max=3, p=0.6, capacity_factor=0.7,
                           drop_policy=policy)
        _ep_case(rank, world, ep, cfg, [9, 0, 4], 4, 3, seed=1, wgrad="deferred")
        done += 1
    # the same edges through the Triton kernels (interpreted) and through the hierarchical exchange with one rank
    # per node (intra-node groups of one) and with one node (inter-node groups of one)
    cfg = RouterConfig(kind="gshard", num_experts=E3, top_k=2, capacity_factor=0.7)
    _ep_case(rank, world, ep, cfg, [9, 0, 4], 2, 3, seed=5, wgrad="per-chunk", backend="triton")
    for gpn in (1, 3):
        hier = ExpertParallel.create(E3, hierarchical=True, gpus_per_node=gpn)
        _ep_case(rank, world, hier, cfg, [0, 9, 4], 3, 2, seed=6, wgrad="deferred")
    done += 3
    # experts 1 and 4 receive no token anywhere (bias -10): zero weight gradients on their owners, and equal
    bias = torch.tensor([0.0, -10.0, 0.1, 0.0, -10.0, 0.2])
    cfg = RouterConfig(kind="sigmoid_bias", num_experts=E3, top_k=2)
    lay = _ep_case(rank, world, ep, cfg, [5, 7, 3], 2, 2, seed=2, bias=bias, wgrad="per-chunk")
    for e in (1, 4):
        if lay.expert_offset <= e < lay.expert_offset + lay.w1.shape[0]:
            le = e - lay.expert_offset
            assert torch.all(lay.w1.grad[le] == 0) and torch.all(lay.w2.grad[le] == 0)
    done += 1
    # router state in training (rank 1 with no tokens): the bias and the controlled p equal on every rank and equal
    # to the group step, with and without activation checkpointing (the recompute re-runs the exchanges)
    for ckpt in (False, True):
        _ep_case(rank, world, ep, RouterConfig(kind="sigmoid_bias", num_experts=E3, top_k=2, bias_update_rate=0.05),
                 [6, 0, 9], 2, 1, seed=3, train=True, steps=2, ckpt=ckpt)
        lay = _ep_case(rank, world, ep, RouterConfig(kind="top_p", num_experts=E3, k_max=4, p=0.8, target_k=1.5,
                                                     controller_rate=0.3), [12, 0, 5], 1, 2, seed=4, train=True,
                       steps=2, ckpt=ckpt)
        ps = [None] * world
        dist.all_gather_object(ps, lay.router.p)
        assert len(set(ps)) == 1 and ps[0] < 0.8, ps
        done += 2
    return done


def test_ep_three_ranks_edges_and_router_state():
    assert spawn_gloo(_ep_worker, 3, timeout_s=90) == [10] * 3


# ---------------------------------------------------------------------------------------------------
# gradient accumulation with the sliced dense all-reduce
# ---------------------------------------------------------------------------------------------------
def _accum_worker(rank, world):
    ep = ExpertParallel.create(4)
    torch.manual_seed(0)
    lin, out = torch.nn.Linear(HID, HID), torch.nn.Linear(HID, HID)
    moe = MoELayer(HID, FFN, RouterConfig(kind="gshard", num_experts=4), backend="torch", ep=ep, r_bwd=2)
    dense = list(lin.parameters()) + list(moe.router.parameters()) + list(out.parameters())   # forward order
    xs = [torch.randn(5, HID, generator=torch.Generator().manual_seed(10 * rank + m)) for m in range(2)]

    def zero():
        for q in list(lin.parameters()) + list(moe.parameters()) + list(out.parameters()):
            q.grad = None

    def step(x):
        out(moe(lin(x))).square().sum().backward()

    for x in xs:                                # reference: plain accumulation, then the mean over ranks
        step(x)
    want = [p.grad.clone() for p in dense]
    for w in want:
        dist.all_reduce(w)
        w /= world
    zero()
    red = GradSliceReducer(dense, [1e6])
    moe.reducer = red
    with red.no_sync():                         # micro-batch 0: nothing launched
        step(xs[0])
    assert red.launched_in_gaps == 0
    step(xs[1])                                 # micro-batch 1: slices of the accumulated gradients
    assert red.launched_in_gaps >= HID * HID + HID   # the output layer's, inside the MoE backward's gaps
    red.finish()
    for p, w in zip(dense, want):
        _close(p.grad, w, "accumulated dense grad")
    # without no_sync the second backward would all-reduce stale slices and finish() wrote them over the
    # accumulated gradient (1.75 off on 2.1 here): now an error
    zero()
    step(xs[0])
    try:
        step(xs[1])
        raise AssertionError("a second backward into launched slices was accepted")
    except RuntimeError as err:
        assert "no_sync" in str(err), err
    red.finish()
    # a dense parameter that gets no gradient this step (a branch skipped on every rank; zero_grad(set_to_none)):
    # it is reduced as zeros (finish() raised AttributeError on its None grad)
    zero()
    extra = torch.nn.Linear(HID, 1)
    red2 = GradSliceReducer(dense + list(extra.parameters()), [1e6])
    moe.reducer = red2
    out(moe(lin(xs[0]))).square().sum().backward()
    red2.finish()
    assert torch.equal(extra.weight.grad, torch.zeros_like(extra.weight))
    red.remove()
    red2.remove()
    return True


def test_grad_slice_reducer_gradient_accumulation():
    assert spawn_gloo(_accum_worker, 2, timeout_s=60) == [True, True]


def test_meta_device_init_then_reset_parameters():
    """torchtitan-style init: build on the meta device, to_empty, reset_parameters. The routing state was left as
    uninitialised memory (p_threshold 6.9e-310 after to_empty: top_p routed every token to one expert)."""
    from adasched.runtime.moe.layer import MoELayer
    from adasched.runtime.moe.router import RouterConfig

    cfg = RouterConfig(kind="top_p", num_experts=4, top_k=2, p=0.7, k_max=3)
    torch.manual_seed(3)
    ref = MoELayer(12, 10, cfg, shared_experts=1)
    with torch.device("meta"):
        lay = MoELayer(12, 10, cfg, shared_experts=1)
    lay = lay.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty may leave behind
        lay.router.p_threshold.fill_(6.9e-310)
        lay.router.expert_bias.fill_(123.0)
    torch.manual_seed(3)
    lay.reset_parameters()
    for (name, a), (_, b) in zip(ref.state_dict().items(), lay.state_dict().items()):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    assert lay.router.p == pytest.approx(0.7) and torch.equal(lay.router.expert_bias, torch.zeros(4))
    # same distributions as the constructor: every weight's std within 25 % of the constructor's
    for (name, a), (_, b) in zip(ref.named_parameters(), lay.named_parameters()):
        assert float(b.detach().std()) == pytest.approx(float(a.detach().std()), rel=0.25), name
    x = torch.randn(16, 12)
    lay.eval()
    y = lay(x)
    assert torch.isfinite(y).all() and lay.last_stats is not None
