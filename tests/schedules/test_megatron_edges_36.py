"""MegatronParamScheduler at megatron-core's edges (a 2026-12-03 hunt): WSD with wsd_decay_steps = 0 or above
lr_decay_steps (megatron-core runs both; ours refused them), and a param group that overrides one of
start_wd/end_wd when the scheduler has neither (a TypeError from None - start)."""
import random
import warnings

import pytest
import torch

from sched_helpers import make_opt

from adasched.schedules import MegatronParamScheduler


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler


@pytest.mark.parametrize("wsd", [0, 150, 1000])
@pytest.mark.parametrize("wsd_style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_decay_steps_megatron_accepts_give_its_lrs(wsd, wsd_style):
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    kw = dict(init_lr=0.0, max_lr=rng.uniform(1e-4, 1e-3), min_lr=rng.uniform(0.0, 5e-5),
              lr_warmup_steps=rng.choice([0, 7, 10]), lr_decay_steps=100, lr_decay_style="WSD", start_wd=0.1,
              end_wd=0.1, wd_incr_steps=1, wd_incr_style="constant", wsd_decay_steps=wsd,
              lr_wsd_decay_style=wsd_style)
    a, b = make_opt(1, "adamw")[0], make_opt(1, "adamw")[0]
    ref, ours = _megatron()(a, **kw), MegatronParamScheduler(b, **kw)
    seen = set()
    for _ in range(130):
        inc = rng.choice([1, 2, 3])
        ref.step(inc)
        ours.step(inc)
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"], ours.num_steps
        assert b.param_groups[0]["weight_decay"] == a.param_groups[0]["weight_decay"]
        if ours.num_steps > kw["lr_warmup_steps"]:
            seen.add(b.param_groups[0]["lr"])
    if wsd:
        assert len(seen) > 2
    else:  # max_lr until lr_decay_steps, then min_lr
        assert len(seen) == 2 and min(seen) == kw["min_lr"]  # (max_lr as min_lr + (max_lr - min_lr): an ulp off)
        assert max(seen) == pytest.approx(kw["max_lr"], rel=1e-15)


def test_a_group_with_one_wd_bound_is_refused_with_its_index():
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    for key in ("start_wd", "end_wd"):
        opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], key: 0.05}], lr=1e-3, weight_decay=0.1)
        other = "end_wd" if key == "start_wd" else "start_wd"
        with pytest.raises(ValueError, match=rf"^param group 1: {other} is missing"):
            MegatronParamScheduler(opt, 0.0, 1e-3, 1e-4, 10, 100, "cosine", wd_incr_steps=50, wd_incr_style="linear")


def test_a_group_with_both_wd_bounds_follows_them_and_the_others_keep_theirs():
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "start_wd": 0.02, "end_wd": 0.2}], lr=1e-3,
                            weight_decay=0.1)
    s = MegatronParamScheduler(opt, 0.0, 1e-3, 1e-4, 10, 100, "cosine", wd_incr_steps=50, wd_incr_style="linear")
    s.step(25)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[1]["weight_decay"] == pytest.approx(0.02 + 0.5 * 0.18, rel=1e-12)
    s.step(50)
    assert opt.param_groups[1]["weight_decay"] == 0.2


def test_constant_style_refuses_a_group_whose_bounds_differ():
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q], "start_wd": 0.0, "end_wd": 0.2}], lr=1e-3)
    with pytest.raises(ValueError, match=r"^param group 1: wd_incr_style 'constant' needs start_wd == end_wd"):
        MegatronParamScheduler(opt, 0.0, 1e-3, 1e-4, 10, 100, "linear", start_wd=0.1, end_wd=0.1)


def test_wsd_zero_needs_no_decay_style():
    """megatron-core never reads lr_wsd_decay_style when wsd_decay_steps is 0 (no anneal)."""
    kw = dict(init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=10, lr_decay_steps=100, lr_decay_style="WSD",
              start_wd=0.1, end_wd=0.1, wd_incr_steps=1, wd_incr_style="constant", wsd_decay_steps=0,
              lr_wsd_decay_style=None)
    a, b = make_opt(1, "adamw")[0], make_opt(1, "adamw")[0]
    ref, ours = _megatron()(a, **kw), MegatronParamScheduler(b, **kw)
    for _ in range(60):
        ref.step(2)
        ours.step(2)
        assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]
    assert b.param_groups[0]["lr"] == 1e-5
    with pytest.raises(ValueError, match=r"^lr_wsd_decay_style: "):
        MegatronParamScheduler(make_opt(1, "adamw")[0], **dict(kw, wsd_decay_steps=5))
