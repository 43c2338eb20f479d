"""27th session's schedules hunt: a tensor lr drifted from the closed form, Megatron's adapter let a TypeError out
for a None lr, three public names were missing from the package."""
from __future__ import annotations

import importlib
import random

import pytest
import torch

import adasched.schedules as pkg


@pytest.mark.parametrize("name, kw", [("REX", {}), ("UBA", {"phi": 2.0}), ("LinearDecay", {})])
def test_a_tensor_lr_follows_the_closed_form_to_its_own_rounding(name, kw):
    # the float32 group lr read back as another scheduler's factor each step: 1.6e-6 off after 5,000 REX steps
    rng = random.Random()
    n, warm = rng.randint(3000, 4000), rng.randint(1, 100)
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=torch.tensor(rng.uniform(1e-3, 1e-1)))
    sched = getattr(pkg, name)(opt, n, warmup_steps=warm, **kw)
    worst = 0.0
    for i in range(1, n + 3):
        opt.step()
        sched.step()
        want = sched.lr_at(i)[0]
        assert isinstance(want, float)
        got = opt.param_groups[0]["lr"]
        assert torch.is_tensor(got) and got.item() == torch.tensor(want, dtype=torch.float32).item(), (i, got, want)
        if want:
            worst = max(worst, abs(got.item() / want - 1))
    assert worst <= 2 ** -24 and sched._ext_scales == [1.0]


@pytest.mark.parametrize("field", ["init_lr", "max_lr", "min_lr"])
@pytest.mark.parametrize("bad", [None, "1e-3", True])
def test_megatron_adapter_names_an_lr_that_is_not_a_number(field, bad):
    from adasched.schedules import MegatronParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=0.1)
    kw = dict(init_lr=0.0, max_lr=1e-3, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10, lr_decay_style="rex")
    with pytest.raises(ValueError, match=f"^{field}: must be a number, got {bad!r}"):
        MegatronParamScheduler(opt, **{**kw, field: bad})


def test_every_public_name_of_the_submodules_imports_from_the_package():
    names = set()
    for mod in ("adapters", "capacity", "gradnorm", "lr"):
        m = importlib.import_module(f"adasched.schedules.{mod}")
        names |= set(m.__all__)
        for n in m.__all__:
            assert getattr(pkg, n) is getattr(m, n), n
    assert set(pkg.__all__) == names == set(pkg._MODULE_OF)
