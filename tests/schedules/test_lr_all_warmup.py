"""warmup_steps == total_steps (all warmup) is accepted, as transformers accepts it: linear warmup over every
step, then min_lr (transformers' linear schedule: 0 after the warmup). The refined schedule still needs a decay."""
from __future__ import annotations

import pytest
import torch

from adasched.schedules import LinearDecay, REX, UBA, get_schedule
from adasched.schedules.adapters import ScheduleLambda, get_rex_schedule_with_warmup
from adasched.schedules.lr import Refined
from sched_helpers import group0_lrs  # (tests/schedules is on sys.path)


def _opt(lr: float):
    p = torch.nn.Parameter(torch.randn(3))
    return torch.optim.SGD([p], lr=lr)


@pytest.mark.parametrize("cls", [LinearDecay, REX, UBA])
def test_all_warmup_then_min_lr(cls):
    base = float(torch.rand(()) * 0.1 + 0.01)
    lo = base * 0.05
    opt = _opt(base)
    sched = cls(opt, total_steps=5, warmup_steps=5, min_lr=lo)
    got = group0_lrs(sched, opt, 8)
    want = [base * k / 5 for k in range(5)] + [lo, lo, lo]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert sched.lr_at(6) == pytest.approx([lo], rel=1e-12)


def test_linear_matches_transformers_when_all_warmup():
    transformers = pytest.importorskip("transformers")
    base = float(torch.rand(()) * 0.1 + 0.01)
    o1, o2 = _opt(base), _opt(base)
    ours = group0_lrs(get_schedule("linear", o1, num_warmup_steps=4, num_training_steps=4), o1, 7)
    ref = group0_lrs(transformers.get_linear_schedule_with_warmup(o2, 4, 4), o2, 7)
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert ours[4:] == [0.0, 0.0, 0.0] and ours[3] == pytest.approx(base * 0.75)


def test_lambda_adapter_all_warmup_and_refined_refused():
    f = ScheduleLambda("rex", 3, 3, min_lr_ratio=0.2)
    assert [f(k) for k in range(6)] == pytest.approx([0.0, 1 / 3, 2 / 3, 0.2, 0.2, 0.2])
    opt = _opt(0.5)
    s = get_rex_schedule_with_warmup(opt, 2, 2)
    assert group0_lrs(s, opt, 4) == pytest.approx([0.0, 0.25, 0.0, 0.0])
    with pytest.raises(ValueError, match="num_warmup_steps: must be < num_training_steps=3"):
        ScheduleLambda("refined", 3, 3, decay_table=[1.0])
    with pytest.raises(ValueError, match="warmup_steps: must be < total_steps=4"):
        Refined(_opt(0.1), torch.rand(4) + 0.5, warmup_steps=4)
    with pytest.raises(ValueError, match="num_warmup_steps: must be <= num_training_steps=4, got 5"):
        get_schedule("rex", _opt(0.1), num_warmup_steps=5, num_training_steps=4)
    with pytest.raises(ValueError, match="warmup_steps: must be <= total_steps=4, got 5"):
        UBA(_opt(0.1), total_steps=4, warmup_steps=5)
