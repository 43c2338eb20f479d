"""ChainedScheduler of two of our schedules: only the first may warm up from 0. With warmup in the first the lr is
the product of the closed forms (every element); with a warmup in a later one the factor of the step where it wrote
0 is lost (the lr came out 2x the product, 1.87x the base lr at its peak) and the scheduler that can see it says so
once (a UserWarning) - it was silent (h33)."""
import warnings

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import ChainedScheduler

from adasched.schedules import REX, UBA, rex_multiplier, uba_multiplier

T = 10


def _closed(t, w, f):
    return t / w if t < w else f((t - w) / (T - w))


def _run(w_rex, w_uba, base, phi):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=base)
    sched = ChainedScheduler([REX(opt, T, w_rex), UBA(opt, T, w_uba, phi=phi)])
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(T + 2):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("w_rex", [0, 1, 3])
def test_warmup_in_the_first_scheduler_gives_the_product(w_rex):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    base, phi = float(rng.uniform(0.1, 3.0)), float(rng.uniform(0.5, 4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (torch's own warnings are not ours: filtered by message)
        warnings.filterwarnings("ignore", message=r"(?!.*cannot read a factor)")
        got = _run(w_rex, 0, base, phi)
    want = [base * _closed(min(t, T), w_rex, rex_multiplier) * _closed(min(t, T), 0,
                                                                       lambda z: uba_multiplier(z, phi))
            for t in range(T + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_warmup_in_a_later_scheduler_warns_once():
    with pytest.warns(UserWarning, match="cannot read a factor") as rec:
        _run(2, 3, 1.0, 2.0)
    assert sum("cannot read a factor" in str(w.message) for w in rec) == 1


@pytest.mark.parametrize("save_at", [1, 3, 4, 5])
def test_no_warning_when_a_scheduler_built_before_the_restore_catches_up(save_at):
    """A warmup scheduler built before ``optimizer.load_state_dict`` and stepped to catch up: the restored lr is not
    a lost factor (it warned 'another scheduler's factor ... was lost'; r7). The lrs equal the uninterrupted run's."""
    import copy

    def make():
        torch.manual_seed(0)
        return torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1.0)

    o, s = make(), None
    s = REX(o, 20, 5)
    full = []
    for t in range(12):
        o.step()
        s.step()
        full.append(o.param_groups[0]["lr"])
        if t + 1 == save_at:
            ck = copy.deepcopy(o.state_dict())
    o2 = make()
    s2 = REX(o2, 20, 5)  # built first: writes the warmup's 0
    o2.load_state_dict(ck)
    got = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        warnings.filterwarnings("error", message=r".*cannot read a factor")
        for _ in range(12):
            s2.step()
            got.append(o2.param_groups[0]["lr"])
    assert got == pytest.approx(full, rel=1e-12, abs=1e-15)
    assert "_groups_id" not in s2.state_dict() and "_warned_lost" not in s2.state_dict()
