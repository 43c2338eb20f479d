"""ChainedScheduler of our schedules: the lr is the product of their closed forms (every element) whatever warms
up. A warmup in a later scheduler lost the factor of the step where it wrote 0 (2x the product, 1.87x the base lr
at its peak, h33), and with no warmup in the first it was ~5 % high with no warning: our schedulers now read each
other's multipliers directly. A scheduler that finds the lr changed from the 0 it wrote, where nothing it can see
explains it (a non-chainable torch scheduler in the chain), still warns once."""
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


@pytest.mark.parametrize("w_uba", [0, 2, 3])
@pytest.mark.parametrize("w_rex", [0, 1, 3])
def test_a_chain_of_ours_gives_the_product_whatever_warms_up(w_rex, w_uba):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    base, phi = float(rng.uniform(0.1, 3.0)), float(rng.uniform(0.5, 4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # (torch's own warnings are not ours: filtered by message)
        warnings.filterwarnings("ignore", message=r"(?!.*cannot read a factor)")
        got = _run(w_rex, w_uba, base, phi)
    want = [base * _closed(min(t, T), w_rex, rex_multiplier) * _closed(min(t, T), w_uba,
                                                                       lambda z: uba_multiplier(z, phi))
            for t in range(T + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_three_of_ours_and_a_torch_factor_give_the_product():
    """[LinearDecay(W=a), REX(W=b), UBA(W=c), ExponentialLR(g)] on two param groups, random warmups: the product of
    the four at every step. ExponentialLR multiplies the running lr, so the gamma of a step where the lr is 0 is
    lost (torch's rule for every chainable scheduler): the lrs are 0 up to the product's last 0, then ours times
    gamma to the steps since."""
    from torch.optim.lr_scheduler import ExponentialLR

    from adasched.schedules import LinearDecay, linear_multiplier

    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    wa, wb, wc = (int(v) for v in rng.integers(0, 4, size=3))
    gamma, phi = float(rng.uniform(0.8, 0.99)), float(rng.uniform(0.5, 4.0))
    bases = [float(v) for v in rng.uniform(0.1, 2.0, size=2)]
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.randn(3))], "lr": bases[0]},
                             {"params": [torch.nn.Parameter(torch.randn(2))], "lr": bases[1]}])
    sched = ChainedScheduler([LinearDecay(opt, T, wa), REX(opt, T, wb), UBA(opt, T, wc, phi=phi),
                              ExponentialLR(opt, gamma)])
    got = [[g["lr"] for g in opt.param_groups]]
    for _ in range(T + 2):
        opt.step()
        sched.step()
        got.append([g["lr"] for g in opt.param_groups])
    mult = [_closed(min(t, T), wa, linear_multiplier) * _closed(min(t, T), wb, rex_multiplier)
            * _closed(min(t, T), wc, lambda z: uba_multiplier(z, phi)) for t in range(T + 3)]
    # ExponentialLR (chainable) multiplies the lr by gamma each step: a step where the lr is 0 loses that step's
    # gamma (torch's own rule, documented); count only the steps after the last 0 of the product
    last_zero = max(t for t in range(T + 3) if mult[t] == 0 or t == 0)
    want = [[b * mult[t] * gamma ** (t - last_zero if t >= last_zero else 0) for b in bases] for t in range(T + 3)]
    np.testing.assert_allclose(np.array(got)[last_zero:], np.array(want)[last_zero:], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.array(got)[:last_zero + 1][np.array(mult[:last_zero + 1]) == 0], 0.0)


def test_an_lr_set_outright_after_our_0_warns_once():
    """A non-chainable scheduler (LambdaLR: base lr times its lambda, whatever the lr was) after one of ours that
    wrote a warmup's 0: the lr it sets carries no factor we can read; said once."""
    from torch.optim.lr_scheduler import LambdaLR

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1.0)
    sched = ChainedScheduler([REX(opt, T, 2), LambdaLR(opt, lambda t: 0.5)])
    with pytest.warns(UserWarning, match="cannot read a factor") as rec:
        for _ in range(T):
            opt.step()
            sched.step()
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
