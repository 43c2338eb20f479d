"""Shared by the schedule tests: an optimizer with two param groups of random, different base lrs, and a
driver that records every group's lr step by step."""
import numpy as np
import torch


def make_opt(seed: int = 0, kind: str = "sgd"):
    """Two param groups with different, random base lrs."""
    gen = torch.Generator().manual_seed(seed)
    lrs = (0.05 + torch.rand(2, generator=gen) * 0.5).tolist()
    a = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    b = torch.nn.Parameter(torch.randn(5, generator=gen))
    groups = [{"params": [a], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}]
    opt = torch.optim.SGD(groups, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(groups)
    return opt, lrs


def group0_lrs(sched, opt, n):
    """Group 0's lr at each of n optimizer steps (plain steps: no gradients needed by SGD without momentum)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def run(sched, opt, n, *, groups: bool = False):
    """lr of every group used by n optimizer steps, then the one after (n + 1 rows): the scheduler's
    get_last_lr(), or with ``groups`` the lr the optimizer's groups hold (what it uses: a SequentialLR's
    get_last_lr is its active child's)."""
    def lrs():
        return [float(g["lr"]) for g in opt.param_groups] if groups else list(sched.get_last_lr())

    out = [lrs()]
    for _ in range(n):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        out.append(lrs())
    return np.array(out)
