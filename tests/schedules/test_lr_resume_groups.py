"""Resume into an optimizer with a group the checkpoint lacks, when min_lr was given per param group."""
from __future__ import annotations

import numpy as np
import torch

from adasched.schedules import REX


def _opt(n: int, seed: int) -> torch.optim.SGD:
    gen = torch.Generator().manual_seed(seed)
    lrs = (torch.rand(n, generator=gen) * 0.5 + 0.05).tolist()
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.randn(3, generator=gen))], "lr": lr}
                            for lr in lrs])


def test_resume_with_one_more_group_and_a_per_group_min_lr_list():
    """A 2-group checkpoint loaded into a scheduler built on 3 groups with 3 min_lr values: it raised 'min_lr: was
    given per param group (2 values) but the optimizer now has 3 groups; build the scheduler after
    add_param_group' although it was; now the third group takes its own given floor and follows the schedule."""
    opt = _opt(2, 3)
    sched = REX(opt, 20, warmup_steps=3, min_lr=[0.01, 0.02])
    for _ in range(6):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt3 = _opt(3, 3)
    sched3 = REX(opt3, 20, warmup_steps=3, min_lr=[0.01, 0.02, 0.03])
    sched3.load_state_dict(state)
    got = []
    for _ in range(16):
        opt3.step()
        sched3.step()
        got.append([g["lr"] for g in opt3.param_groups])
    ref = REX(_opt(3, 3), 20, warmup_steps=3, min_lr=[0.01, 0.02, 0.03])
    expect = np.array([ref.lr_at(t) for t in range(7, 23)])
    assert expect.shape == (16, 3)
    np.testing.assert_allclose(got, expect, rtol=1e-14, atol=0)
    assert got[-1][2] == 0.03 and sched3.min_lrs == [0.01, 0.02, 0.03]
