"""Chains and resumes of our schedulers a review (r8) tried: a SequentialLR resumed past its milestone runs as the
uninterrupted run, and a chain copied (deepcopy, torch.save) runs at the product, the original undisturbed. (A
registry through which our schedulers read each other's multipliers was tried on 2026-12-04 and taken out: it held
the lr at 0 for good in resumed chains holding a SequentialLR - r9.)"""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler, SequentialLR

from adasched.schedules import REX, UBA, rex_multiplier, uba_multiplier

T = 12


def _closed(t, w, f):
    t = min(t, T)
    return t / w if t < w else f((t - w) / (T - w))


def _opt(lr=1.0, groups=1):
    return torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr * (k + 1)}
                              for k in range(groups)])


def _seed_rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("first_total,milestone,save_after", [(5, 7, 9), (5, 6, 8), (6, 9, 10), (5, 7, 7)])
def test_sequential_resumed_past_its_milestone_runs_as_the_uninterrupted_run(first_total, milestone, save_after):
    base = float(_seed_rng().uniform(0.2, 2.0))

    def build(o):
        return SequentialLR(o, [REX(o, first_total), UBA(o, 10, phi=1.0)], milestones=[milestone])

    o = _opt(base)
    s = build(o)
    full = []
    for t in range(14):
        o.step()
        s.step()
        full.append(o.param_groups[0]["lr"])
        if t + 1 == save_after:
            ck = copy.deepcopy((s.state_dict(), o.state_dict()))
    o2 = _opt(base)
    s2 = build(o2)
    o2.load_state_dict(ck[1])
    s2.load_state_dict(ck[0])
    got = []
    for _ in range(14 - save_after):
        o2.step()
        s2.step()
        got.append(o2.param_groups[0]["lr"])
    assert any(v > 0 for v in full[save_after:])
    np.testing.assert_allclose(got, full[save_after:], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_copied_chain_keeps_the_product(how, steps_before):
    rng = _seed_rng()
    base, phi = float(rng.uniform(0.2, 2.0)), float(rng.uniform(0.5, 3.0))
    o = _opt(base)
    s = ChainedScheduler([REX(o, T, 2), UBA(o, T, phi=phi)])  # (only the first may warm up: README)
    for _ in range(steps_before):
        o.step()
        s.step()
    if how == "deepcopy":
        s2 = copy.deepcopy(s)
    else:
        buf = io.BytesIO()
        torch.save({"sched": s}, buf)
        buf.seek(0)
        s2 = torch.load(buf, weights_only=False)["sched"]
    o2 = s2._schedulers[0].optimizer
    assert o2 is not o and all(x.optimizer is o2 for x in s2._schedulers)
    got, want = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*cannot read a factor")
        for t in range(steps_before + 1, T + 2):
            o2.step()
            s2.step()
            o.step()
            s.step()  # the original, stepped alongside, is not disturbed by its copy
            got.append((o2.param_groups[0]["lr"], o.param_groups[0]["lr"]))
            w = base * _closed(t, 2, rex_multiplier) * _closed(t, 0, lambda z: uba_multiplier(z, phi))
            want.append((w, w))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
