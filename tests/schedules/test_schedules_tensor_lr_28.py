"""28th session (found by a CI run): with a tensor lr the schedule's base lrs are tensors, and the first step's
external factor float(lr) / base divided by the tensor's reciprocal - 1 - 2**-24 for an lr over itself - so every
later lr ran one float32 ulp below the closed form (test_schedules_hunt_fixes_27 failed for 1 seed in ~4)."""
from __future__ import annotations

import random

import pytest
import torch

import adasched.schedules as pkg


@pytest.mark.parametrize("name", ["REX", "LinearDecay", "UBA"])
def test_the_first_factor_of_a_tensor_lr_is_exactly_one(name):
    # 0.010066893953102285 with warmup 8 is a case that failed; the rest are fresh draws
    for lr0, warm in [(0.010066893953102285, 8)] + [(random.uniform(1e-3, 1e-1), random.randint(1, 100))
                                                    for _ in range(20)]:
        opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor(lr0))
        sched = getattr(pkg, name)(opt, 500, warmup_steps=warm)
        assert all(type(s) is float for s in sched._ext_scales)
        for i in range(1, 4):
            opt.step()
            sched.step()
            want = torch.tensor(sched.lr_at(i)[0], dtype=torch.float32).item()
            assert opt.param_groups[0]["lr"].item() == want, (lr0, warm, i)
        assert sched._ext_scales == [1.0]
