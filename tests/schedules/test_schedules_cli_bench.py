"""The benchmark's vectorised trainer applies exactly torch.optim.SGD(momentum) / AdamW per member, each with its
own lr schedule; and its lr tables come from the real schedulers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from adasched.schedules import REX
from adasched.schedules.bench import (BenchConfig, _cross_entropy, _forward, _init_params, lr_table,
                                      load_digits_split, seed_batches, train_members)


@pytest.mark.parametrize("model,opt", [("logreg", "sgd"), ("mlp", "adamw"), ("mlp", "sgd")])
def test_vectorised_trainer_equals_torch_optim(model, opt):
    cfg = BenchConfig(hidden=16, batch_size=100)
    data = load_digits_split()
    steps = 12
    rng = np.random.default_rng(0)
    lrs = np.stack([rng.uniform(0.005, 0.05, steps), lr_table("rex", steps) * 0.03])  # two members, own lrs
    seeds = [3, 4]
    got = train_members(model, opt, lrs, seeds, data, cfg)
    xtr, ytr = data[0], data[1]
    n = xtr.shape[0]
    per_epoch = n // cfg.batch_size
    for m, seed in enumerate(seeds):
        params = [p[m].detach().clone().requires_grad_() for p in _init_params(model, [seed, seed], 64, 16, 10)]
        if opt == "sgd":
            o = torch.optim.SGD(params, lr=1.0, momentum=cfg.momentum, weight_decay=cfg.sgd_weight_decay)
        else:
            o = torch.optim.AdamW(params, lr=1.0, weight_decay=cfg.adamw_weight_decay)
        g = torch.Generator().manual_seed(seed_batches(seed))
        order = torch.cat([torch.randperm(n, generator=g)[: per_epoch * cfg.batch_size]
                           for _ in range(-(-steps // per_epoch))]).view(-1, cfg.batch_size)
        for t in range(steps):
            o.param_groups[0]["lr"] = float(lrs[m, t])
            loss = _cross_entropy(_forward(model, [p[None] for p in params], xtr[order[t]][None]),
                                  ytr[order[t]][None]).sum()
            o.zero_grad()
            loss.backward()
            o.step()
        with torch.no_grad():
            logits = _forward(model, [p[None] for p in params], data[4][None])
            test_loss = float(_cross_entropy(logits, data[5][None]))
        np.testing.assert_allclose(got["test_loss"][m], test_loss, rtol=2e-4)


def test_lr_tables_from_real_schedulers():
    steps = 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    rex = REX(opt, steps)
    np.testing.assert_array_equal(lr_table("rex", steps), [rex.lr_at(t)[0] for t in range(steps)])
    np.testing.assert_allclose(lr_table("uba2", steps), lr_table("cosine", steps), rtol=1e-12, atol=1e-15)
    step = lr_table("step", steps)
    assert step[19] == 1.0 and step[20] == pytest.approx(0.1) and step[30] == pytest.approx(0.01)
    one = lr_table("onecycle", steps)
    assert one[0] == pytest.approx(1 / 25) and one.max() == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(lr_table("refined", steps, np.full(steps, 2.0)), lr_table("linear", steps),
                               rtol=1e-12)
