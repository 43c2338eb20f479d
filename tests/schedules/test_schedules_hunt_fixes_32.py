"""32nd session's schedules hunt: MegatronParamScheduler's inverse-square-root took math.sqrt where megatron-core
takes x ** 0.5 (one float ulp apart for 79 of 100,000 steps: 'the same floats' was not held); capacity_schedule
past 2**53 raised 'could not be distributed' for a feasible budget (lo == hi == budget) - its spread is in floats."""
from __future__ import annotations

import random
import warnings

import pytest

from adasched.schedules import MegatronParamScheduler, capacity_schedule

from sched_helpers import make_opt


def test_inverse_square_root_is_megatron_cores_floats():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    warmup = rng.choice([0, 1, 3, 17])
    kw = dict(init_lr=0.0, max_lr=rng.uniform(1e-4, 1e-3), min_lr=0.0, lr_warmup_steps=warmup, lr_decay_steps=10**6,
              lr_decay_style="inverse-square-root", start_wd=0.1, end_wd=0.1, wd_incr_steps=1,
              wd_incr_style="constant")
    a, b = make_opt(1, "adamw")[0], make_opt(1, "adamw")[0]
    ref, ours = OptimizerParamScheduler(a, **kw), MegatronParamScheduler(b, **kw)
    # 2921 with warmup 1 and max_lr 3e-4 was one ulp off; every step of a long run, stepped one sample at a time
    for n in [2921, *range(1, 6000)]:
        for s in (ref, ours):
            s.num_steps = n - 1
            s.step(1)
        assert [g["lr"] for g in b.param_groups] == [g["lr"] for g in a.param_groups], n


def test_capacity_past_2_53_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^budget: 9007199254740995 is above 2\*\*53"):
        capacity_schedule("uniform", 1, 2**53 + 3, 2**53 + 3, 2**53 + 3)
    with pytest.raises(ValueError, match=r"^hi: 18014398509481984 is above 2\*\*53"):
        capacity_schedule("uniform", 1, 2**50, 0, 2**54)


def test_capacity_up_to_2_53_sums_exactly():
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    for _ in range(300):
        L = rng.randint(1, 12)
        hi = rng.randint(1, 2**53 // L)
        lo = rng.randint(0, hi)
        budget = rng.randint(L * lo, L * hi)
        name = rng.choice(["uniform", "descending", "ascending", "pyramid", "wave"])
        out = capacity_schedule(name, L, budget, lo, hi, strength=rng.random())
        assert sum(out) == budget and all(lo <= x <= hi and type(x) is int for x in out), (name, L, budget, lo, hi)


def test_capacity_near_2_53_meets_the_budget_when_the_floors_miss_by_more_than_a_pass():
    """CI seed 3853220589 (2026-12-03): 5 pyramid layers of ~1.35e15 - the float spread's floors missed the budget
    by more than one unit per layer and the one pass of +1s raised 'could not be distributed'."""
    budget, lo, hi = 6729947237873907, 1341464371869389, 1354613620857610
    out = capacity_schedule("pyramid", 5, budget, lo, hi, strength=0.9773361962822644)
    assert sum(out) == budget and all(lo <= x <= hi and type(x) is int for x in out)
    assert out[2] == max(out) and out[0] <= out[1] and out[4] <= out[3]  # still a pyramid
