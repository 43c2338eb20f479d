"""REX / UBA / LinearDecay / Refined: reference values, torch LRScheduler conformance on two param groups with
different lrs, exact resume, SequentialLR / ChainedScheduler, argument errors."""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, CosineAnnealingLR, ExponentialLR, LinearLR, SequentialLR

from sched_helpers import make_opt, run

from adasched.schedules import (REX, UBA, LinearDecay, Refined, cosine_multiplier, get_schedule, linear_multiplier,
                                refined_multipliers, rex_multiplier, uba_multiplier)


def const_norms(n, seed=1):
    return np.full(n, 0.5 + np.random.default_rng(seed).random() * 3)


FACTORIES = {
    "rex": lambda o, T, **k: REX(o, T, **k),
    "uba0.5": lambda o, T, **k: UBA(o, T, phi=0.5, **k),
    "uba4": lambda o, T, **k: UBA(o, T, phi=4.0, **k),
    "linear": lambda o, T, **k: LinearDecay(o, T, **k),
    "refined": lambda o, T, **k: Refined(o, np.random.default_rng(T).lognormal(0, 0.5, T), **k),
}


# ---------------------------------------------------------------------------------------------- reference values
def test_rex_reference_values_two_groups():
    opt, lrs = make_opt(1)
    got = run(REX(opt, 5), opt, 5)
    ref = np.array([1.0, 0.889, 0.75, 0.571, 0.333, 0.0])
    np.testing.assert_allclose(got, ref[:, None] * np.array(lrs)[None, :], atol=5e-4 * max(lrs))
    exact = [(1 - t / 5) / (1 - t / 10) for t in range(6)]
    np.testing.assert_allclose(got, np.array(exact)[:, None] * np.array(lrs)[None, :], rtol=1e-14, atol=1e-16)
    assert rex_multiplier(0.5) == pytest.approx(2 / 3)


@pytest.mark.parametrize("T,warmup", [(7, 0), (23, 4)])
def test_uba_phi2_equals_cosine_every_step(T, warmup):
    opt, lrs = make_opt(2)
    ours = run(UBA(opt, T, phi=2.0, warmup_steps=warmup), opt, T + 2)
    opt2, _ = make_opt(2)
    if warmup:
        ref_s = SequentialLR(opt2, [LinearLR(opt2, 1e-9, 1.0, total_iters=warmup), CosineAnnealingLR(opt2, T - warmup)],
                             milestones=[warmup])
        ref = run(ref_s, opt2, T + 2)[warmup:]
        ours = ours[warmup:]
    else:
        ref = run(CosineAnnealingLR(opt2, T), opt2, T + 2)
    ref[-2:] = 0.0  # torch's cosine goes back up after T_max; ours stays at min_lr
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    for z in np.random.default_rng(0).random(50):
        assert uba_multiplier(z, 2.0) == cosine_multiplier(z)


def test_uba_shape_checks():
    assert uba_multiplier(0.5, 0.5) == pytest.approx(0.8)
    assert uba_multiplier(0.5, 4.0) == pytest.approx(1 / 3)
    for phi in (0.3, 1.0, 2.0, 4.0, 9.0):
        assert uba_multiplier(0.0, phi) == 1.0 and uba_multiplier(1.0, phi) == 0.0
        z = np.linspace(0, 1, 41)
        assert np.all(np.diff([uba_multiplier(v, phi) for v in z]) < 0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_refined_constant_norms_is_linear_decay(warmup):
    T = 29
    opt, lrs = make_opt(3)
    got = run(Refined(opt, const_norms(T), warmup_steps=warmup, min_lr_ratio=0.1), opt, T + 2)
    opt2, _ = make_opt(3)
    ref = run(LinearDecay(opt2, T, warmup_steps=warmup, min_lr_ratio=0.1), opt2, T + 2)
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-16)
    for norm in ("l1", "l2"):
        np.testing.assert_allclose(refined_multipliers(const_norms(T, 5), norm), 1 - np.arange(T + 1) / T,
                                   rtol=1e-13, atol=1e-15)


def test_refined_matches_brute_force_formula():
    from scipy.ndimage import median_filter

    rng = np.random.default_rng(7)
    g = rng.lognormal(0, 0.7, 60) * np.linspace(3, 1, 60)
    for norm, smoothing in (("l2", 0.1), ("l1", 0.2), ("l2", 0.0)):
        width = int(round(smoothing * g.size))
        width += 1 - width % 2
        s = median_filter(g, size=width, mode="mirror") if width > 1 else g
        w = 1 / s**2 if norm == "l2" else 1 / s
        w = list(w) + [w[-1]]
        K = g.size
        ref = np.array([w[k] * sum(w[p] for p in range(k + 1, K + 1)) for k in range(K)] + [0.0])
        np.testing.assert_allclose(refined_multipliers(g, norm, smoothing), ref / ref.max(), rtol=1e-12)


def test_refined_features():
    # a spike is removed by the median filter; large early norms give a warmup by themselves
    g = np.concatenate([np.linspace(20, 2, 20), np.full(80, 2.0)]) * (1 + 0.01 * np.random.default_rng(0).random(100))
    g_spiky = g.copy()
    g_spiky[50] = 100.0
    np.testing.assert_allclose(refined_multipliers(g_spiky), refined_multipliers(g), rtol=0.05)
    m = refined_multipliers(g)
    assert m[0] < 0.05 and np.argmax(m) > 10 and m[-1] == 0.0 and m.max() == 1.0


# ------------------------------------------------------------------------------------------ torch conformance
@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("floor", [{"min_lr_ratio": 0.2}, {"min_lr": 0.01}, {}])
def test_closed_form_and_chainable_agree(name, floor):
    T, W = 17, 4
    opt, lrs = make_opt(4)
    s = FACTORIES[name](opt, T, warmup_steps=W, **floor)
    chain = run(s, opt, T + 3)
    opt2, _ = make_opt(4)
    s2 = FACTORIES[name](opt2, T, warmup_steps=W, **floor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        closed = []
        for t in range(T + 4):
            s2.step(t)  # deprecated epoch form -> _get_closed_form_lr
            closed.append(s2.get_last_lr())
    np.testing.assert_array_equal(chain, np.array(closed))
    np.testing.assert_array_equal(chain, np.array([s.lr_at(t) for t in range(T + 4)]))
    lrs = np.array(lrs)
    mins = lrs * floor["min_lr_ratio"] if "min_lr_ratio" in floor else np.full(2, floor.get("min_lr", 0.0))
    # warmup from 0, peak = the group's base lr, floor at the end, each group keeps its own base lr
    np.testing.assert_allclose(chain[:W + 1], np.arange(W + 1)[:, None] / W * lrs[None], rtol=1e-14)
    np.testing.assert_allclose(chain[T:], np.broadcast_to(mins, chain[T:].shape), rtol=1e-12, atol=1e-15)
    assert np.all(chain <= lrs[None] * (1 + 1e-12)) and np.all(chain[W:] >= mins[None] * (1 - 1e-12))
    if name != "refined":
        assert np.all(np.diff(chain[W:], axis=0) <= 1e-15)
        frac = (chain[W:] - mins) / (lrs - mins)  # same multiplier for both groups
        np.testing.assert_allclose(frac[:, 0], frac[:, 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_resume_exact(name):
    T, W, k = 15, 2, 6
    opt, _ = make_opt(5, "adamw")
    full = run(FACTORIES[name](opt, T, warmup_steps=W, min_lr_ratio=0.05), opt, T + 1)
    opt_a, _ = make_opt(5, "adamw")
    s_a = FACTORIES[name](opt_a, T, warmup_steps=W, min_lr_ratio=0.05)
    first = run(s_a, opt_a, k)
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "sched": s_a.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    opt_b, _ = make_opt(99, "adamw")  # different starting lrs: everything must come from the checkpoint
    s_b = FACTORIES[name](opt_b, T, warmup_steps=W, min_lr_ratio=0.05)
    opt_b.load_state_dict(ck["opt"])
    s_b.load_state_dict(ck["sched"])
    rest = run(s_b, opt_b, T + 1 - k)
    np.testing.assert_array_equal(np.concatenate([first, rest[1:]]), full)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("warmup", [0, 3])
def test_resume_without_optimizer_state_is_exact(name, warmup):
    """Walk finding: a scheduler restored into a freshly built optimizer (DeepSpeed load_checkpoint with
    load_optimizer_states=False) read the fresh optimizer's lr as another scheduler's factor - 0 at the start of a
    warmup, so the lr stayed 0 for the rest of the run. load_state_dict puts its last lrs back."""
    T, k = 20, 8
    opt, _ = make_opt(7)
    full = run(FACTORIES[name](opt, T, warmup_steps=warmup), opt, T + 1)
    opt_a, _ = make_opt(7)
    s_a = FACTORIES[name](opt_a, T, warmup_steps=warmup)
    first = run(s_a, opt_a, k)
    opt_b, _ = make_opt(7)  # same base lrs, no optimizer state loaded
    s_b = FACTORIES[name](opt_b, T, warmup_steps=warmup)
    s_b.load_state_dict(s_a.state_dict())
    rest = run(s_b, opt_b, T + 1 - k)
    np.testing.assert_allclose(np.concatenate([first, rest[1:]]), full, rtol=1e-12, atol=0)


@pytest.mark.parametrize("compose", ["chained", "sequential"])
def test_resume_with_optimizer_state_keeps_a_chain_exact(compose):
    """Review finding: writing the schedule's last lrs back on load broke chains resumed with optimizer state
    (ChainedScheduler([ours, ExponentialLR]): lr 1/gamma too high for good; SequentialLR: the inactive child's
    stale lr overwrote the group). The groups are only written when they still hold a fresh scheduler's lrs."""
    T, k = 16, (6 if compose == "chained" else 3)  # sequential: resumed while the first child is active

    def build(opt):
        if compose == "chained":
            return ChainedScheduler([LinearDecay(opt, T, warmup_steps=2), ExponentialLR(opt, gamma=0.9)])
        return SequentialLR(opt, [LinearDecay(opt, 5, warmup_steps=2), LinearDecay(opt, T - 5)], milestones=[5])

    opt, _ = make_opt(3)
    full = run(build(opt), opt, T)
    opt_a, _ = make_opt(3)
    s_a = build(opt_a)
    first = run(s_a, opt_a, k)
    opt_b, _ = make_opt(3)
    s_b = build(opt_b)
    opt_b.load_state_dict(opt_a.state_dict())
    s_b.load_state_dict(s_a.state_dict())
    rest = run(s_b, opt_b, T - k)
    np.testing.assert_allclose(np.concatenate([first, rest[1:]]), full, rtol=1e-12, atol=1e-15)


def test_sequential_lr_child_restarts_at_zero():
    T1, T2 = 4, 12
    opt, lrs = make_opt(6)
    lin = LinearLR(opt, start_factor=0.1, total_iters=T1)
    rex = REX(opt, T2, min_lr_ratio=0.1)
    got = run(SequentialLR(opt, [lin, rex], milestones=[T1]), opt, T1 + T2 + 2)
    lrs = np.array(lrs)
    exp = [lrs * (0.1 + 0.9 * t / T1) for t in range(T1)]
    exp += [lrs * (0.1 + 0.9 * rex_multiplier(min(t, T2) / T2)) for t in range(T2 + 3)]
    np.testing.assert_allclose(got, np.array(exp), rtol=1e-12)
    # and as the first child, with warmup, followed by a constant tail
    opt2, lrs2 = make_opt(7)
    uba = UBA(opt2, 10, phi=0.5, warmup_steps=3, min_lr_ratio=0.2)
    const = torch.optim.lr_scheduler.ConstantLR(opt2, factor=0.2, total_iters=10**6)
    got2 = run(SequentialLR(opt2, [uba, const], milestones=[10]), opt2, 14)
    exp2 = [np.array(lrs2) * (t / 3 if t < 3 else 0.2 + 0.8 * uba_multiplier((t - 3) / 7, 0.5)) for t in range(10)]
    exp2 += [np.array(lrs2) * 0.2] * 5
    np.testing.assert_allclose(got2, np.array(exp2), rtol=1e-12)


@pytest.mark.parametrize("ours_first", [True, False])
def test_chained_scheduler_multiplies(ours_first):
    T, gamma = 10, 0.9
    opt, lrs = make_opt(8)
    rex = REX(opt, T, min_lr_ratio=0.1)
    exp_s = ExponentialLR(opt, gamma)
    got = run(ChainedScheduler([rex, exp_s] if ours_first else [exp_s, rex]), opt, T + 2)
    ref = [np.array(lrs) * (0.1 + 0.9 * rex_multiplier(min(t, T) / T)) * gamma**t for t in range(T + 3)]
    np.testing.assert_allclose(got, np.array(ref), rtol=1e-12)


def test_chained_through_zero_stays_finite():
    """Warmup starts at 0 and linear decay ends at 0: no division by the zero multiplier, no nan/inf, and the
    chained factor seen before the zero is kept."""
    opt, lrs = make_opt(9)
    lin = LinearDecay(opt, 8, warmup_steps=2)
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    got = run(ChainedScheduler([lin, step]), opt, 12)
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0) and np.all(got[8:] == 0) and np.all(got[1:8] > 0)
    # steps 3..7: factor 0.5 (StepLR at 3 and 6) applied on top of the linear schedule
    ref = [np.array(lrs) * lin_m * 0.5 ** (t // 3) for t, lin_m in
           ((t, t / 2 if t < 2 else 1 - (t - 2) / 6) for t in range(3, 8))]
    np.testing.assert_allclose(got[3:8], np.array(ref), rtol=1e-12)


def test_get_schedule_factory():
    T, W = 20, 5
    for name, cls, extra in (("linear", LinearDecay, {}), ("rex", REX, {}), ("uba", UBA, {"phi": 3.0}),
                             ("cosine", UBA, {})):
        opt, _ = make_opt(10)
        s = get_schedule(name, opt, num_warmup_steps=W, num_training_steps=T, min_lr_ratio=0.1, **extra)
        assert type(s) is cls and s.total_steps == T and s.warmup_steps == W
    opt, lrs = make_opt(10)
    s = get_schedule("cosine", opt, W, T)
    z = 0.37
    assert s.multiplier(W + round(z * (T - W))) == pytest.approx(cosine_multiplier(round(z * 15) / 15))
    opt, _ = make_opt(10)
    s = get_schedule("refined", opt, 2, T, grad_norms=np.random.default_rng(0).lognormal(size=T), norm="l1")
    assert type(s) is Refined and s.norm == "l1" and s.total_steps == T
    assert linear_multiplier(0.25) == 0.75


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make,arg", [
    (lambda o: REX(o, 0), "total_steps"),
    (lambda o: REX(o, -3), "total_steps"),
    (lambda o: LinearDecay(o, 10, warmup_steps=11), "warmup_steps"),   # 10 = all warmup, allowed
    (lambda o: LinearDecay(o, 10, warmup_steps=-1), "warmup_steps"),
    (lambda o: UBA(o, 10, phi=0.0), "phi"),
    (lambda o: UBA(o, 10, phi=-1.0), "phi"),
    (lambda o: UBA(o, 10, phi=float("nan")), "phi"),
    (lambda o: REX(o, 10, min_lr=0.01, min_lr_ratio=0.1), "min_lr"),
    (lambda o: REX(o, 10, min_lr=100.0), "min_lr"),
    (lambda o: REX(o, 10, min_lr_ratio=1.5), "min_lr_ratio"),
    (lambda o: REX(o, 10, min_lr_ratio=True), "min_lr_ratio"),  # a bool is not a ratio
    (lambda o: REX(o, 10, min_lr=True), "min_lr"),
    (lambda o: UBA(o, 10, phi=True), "phi"),
    (lambda o: Refined(o, []), "grad_norms"),
    (lambda o: Refined(o, [1.0, float("inf"), 2.0]), "grad_norms"),
    (lambda o: Refined(o, [1.0, float("nan")]), "grad_norms"),
    (lambda o: Refined(o, [1.0, 0.0, 2.0]), "grad_norms"),
    (lambda o: Refined(o, [1.0, 2.0, 3.0], total_steps=4), "grad_norms"),
    (lambda o: Refined(o, [1.0, 2.0, 3.0], warmup_steps=3), "warmup_steps"),
    (lambda o: Refined(o, [1.0, 2.0], norm="linf"), "norm"),
    (lambda o: Refined(o, [1.0, 2.0], smoothing=1.0), "smoothing"),
    (lambda o: get_schedule("step", o, 0, 10), "name"),
    (lambda o: get_schedule("rex", o, 0, None), "num_training_steps"),
])
def test_bad_arguments_name_the_argument(make, arg):
    opt, _ = make_opt(11)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        make(opt)
    assert math.isfinite(uba_multiplier(0.3))


_COMPOSITIONS = {
    "rex-then-constant": lambda opt: SequentialLR(opt, [REX(opt, 10), LinearLR(opt, 1.0, 1.0, total_iters=1)],
                                                  milestones=[10]),
    "rex-then-uba": lambda opt: SequentialLR(opt, [REX(opt, 10), UBA(opt, 10)], milestones=[10]),
    "rex-then-cosine": lambda opt: SequentialLR(opt, [REX(opt, 10), CosineAnnealingLR(opt, 10)], milestones=[10]),
    "rex-then-rex": lambda opt: SequentialLR(opt, [REX(opt, 10, min_lr_ratio=0.2), REX(opt, 10)], milestones=[10]),
    "chained-rex-uba": lambda opt: ChainedScheduler([REX(opt, 20), UBA(opt, 20)]),
    # a torch scheduler after ours scales the groups' lr when built: resumed without optimizer state, the fresh
    # groups' lr no longer matched ours, so the lr at the save was not put back (2/3 of the run's lr from then on)
    "chained-rex-linear": lambda opt: ChainedScheduler([REX(opt, 20), LinearLR(opt, 0.5, 1.0, total_iters=4)]),
    "chained-rex-constant": lambda opt: ChainedScheduler([REX(opt, 20), ConstantLR(opt, 0.5, total_iters=7)]),
    "chained-warmup-rex-constant": lambda opt: ChainedScheduler([REX(opt, 20, warmup_steps=3),
                                                                 ConstantLR(opt, 0.5, total_iters=7)]),
    "chained-constant-rex": lambda opt: ChainedScheduler([ConstantLR(opt, 0.5, total_iters=7), REX(opt, 20)]),
}


@pytest.mark.parametrize("with_optimizer_state", [True, False], ids=["opt-state", "no-opt-state"])
@pytest.mark.parametrize("compose", list(_COMPOSITIONS))
def test_composed_schedules_resume_exactly_at_and_past_a_milestone(compose, with_optimizer_state):
    """Hunt finding: load_state_dict wrote the scheduler's own last lrs into groups that still held a freshly built
    scheduler's lrs. In a SequentialLR past its milestone the finished first schedule (ours, no warmup: built fresh
    at the base lr) did it - with optimizer state whenever the restored lr equalled the base lr (at the milestone
    of [REX, constant]: 0.18 instead of 1.0 for the rest of the run), without it at every step after the
    milestone ([REX, UBA] at step 12: 0.175 instead of 0.939) - and the active child kept that as a factor. A
    ChainedScheduler of two of ours resumed without optimizer state was 2-25 % off. The groups get the lrs they
    held at the save now. Resumed at steps before, at and past the milestone (10), every later lr of both
    groups must equal the uninterrupted run's."""
    n = 18
    opt, _ = make_opt(11, "adamw")
    full = run(_COMPOSITIONS[compose](opt), opt, n, groups=True)
    for k in (5, 10, 11, 12, 15):
        opt_a, _ = make_opt(11, "adamw")
        s_a = _COMPOSITIONS[compose](opt_a)
        first = run(s_a, opt_a, k, groups=True)
        buf = io.BytesIO()
        torch.save({"opt": opt_a.state_dict(), "sched": s_a.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        opt_b, _ = make_opt(11, "adamw")
        s_b = _COMPOSITIONS[compose](opt_b)
        if with_optimizer_state:
            opt_b.load_state_dict(ck["opt"])
        s_b.load_state_dict(ck["sched"])
        rest = run(s_b, opt_b, n - k, groups=True)
        np.testing.assert_allclose(np.concatenate([first, rest[1:]]), full, rtol=1e-12, atol=1e-15,
                                   err_msg=f"resumed at step {k}")
        np.testing.assert_allclose(rest[0], first[-1], rtol=1e-12, atol=1e-15, err_msg=f"lr right after load, {k}")


@pytest.mark.parametrize("warmup", [0, 4])
def test_resume_replaying_add_param_group_without_optimizer_state_is_exact(warmup):
    """Review finding: a run whose optimizer gained a group after the scheduler was built (add_param_group at step
    3), resumed by replaying that setup (1 group, scheduler, add_param_group, load_state_dict) without the
    optimizer's state: the load compared every group with the fresh scheduler's lrs, found 2 against 1 and wrote
    nothing, so group 0 stayed at the fresh lr (0 with warmup) for the rest of the run."""
    def params():
        gen = torch.Generator().manual_seed(0)
        return torch.nn.Parameter(torch.randn(3, generator=gen)), torch.nn.Parameter(torch.randn(2, generator=gen))

    def setup():
        a, b = params()
        opt = torch.optim.AdamW([{"params": [a], "lr": 0.3}])
        return opt, REX(opt, 16, warmup_steps=warmup, min_lr_ratio=0.1), b

    opt, sched, b = setup()
    run(sched, opt, 3)
    opt.add_param_group({"params": [b], "lr": 0.2})
    full = run(sched, opt, 13, groups=True)
    opt_a, s_a, b_a = setup()
    run(s_a, opt_a, 3)
    opt_a.add_param_group({"params": [b_a], "lr": 0.2})
    mid = run(s_a, opt_a, 3, groups=True)
    np.testing.assert_array_equal(mid, full[:4])
    opt_b, s_b, b_b = setup()
    opt_b.add_param_group({"params": [b_b], "lr": 0.2})
    s_b.load_state_dict(s_a.state_dict())
    rest = run(s_b, opt_b, 10, groups=True)
    np.testing.assert_allclose(rest, full[3:], rtol=1e-12, atol=1e-15)
