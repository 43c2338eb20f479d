"""A capacity factor above 1 planned from the config is priced as FSMoE prices it (f = k x factor, the capacity
buffer) and the plan's stage notes say that the runtime does not pad to it; router statistics, a dropless layer
or a factor at most 1 need no such note (hunt, 35th session: the plan priced 20 % more than train_moe moves on
balanced routing, and said nothing)."""
from __future__ import annotations

import dataclasses
import random

import pytest

from adasched.planner.fsmoe.costmodel import MoEConfig, _stage_costs, capacity_note, stage_costs, topology
from adasched.planner.fsmoe.planning import plan_moe
from adasched.profiler.profile import load_profile


def _cfg(**kw):
    base = dict(name="c", hidden=64, ffn_hidden=128, experts=8, top_k=2, batch=2, seq_len=64, activation="swiglu",
                num_layers=2)
    base.update(kw)
    return MoEConfig(**base)


@pytest.mark.parametrize("source", ["published", "profile"])
def test_the_note_says_what_f_prices(source):
    cf = round(random.uniform(1.05, 4.0), 3)
    cfg = _cfg(capacity_factor=cf)
    assert cfg.f() == pytest.approx(2 * cf, rel=1e-12)   # FSMoE's f, kept
    prof = load_profile("h100-sxm")
    costs = stage_costs(cfg, topology(cfg, 16, 8), source=source, profile=prof)
    want = (f"f = k x capacity factor = 2 x {cf:g}: FSMoE's capacity buffer, the most the busiest expert may receive; "
            f"the runtime does not pad to capacity (balanced routing moves 2 per token): --router-stats plans the "
            f"measured k")
    assert costs.notes[-1] == want and capacity_note(cfg) == want
    # the note changes nothing else: the costs are those of the layer before the note is added
    plain = _stage_costs(cfg, topology(cfg, 16, 8), source=source, profile=prof)
    assert dataclasses.replace(costs, notes=plain.notes) == plain and costs.notes[:-1] == plain.notes


@pytest.mark.parametrize("kw", [dict(capacity_factor=1.0), dict(capacity_factor=0.7),
                                dict(capacity_factor=1.5, dropless=True),
                                dict(capacity_factor=1.5, mean_k_per_layer=[1.9, 2.0])])
def test_no_note_where_f_is_what_moves(kw):
    cfg = _cfg(**kw)
    assert capacity_note(cfg) is None
    costs = stage_costs(cfg, topology(cfg, 16, 8), source="published")
    assert not any(n.startswith("f = k x capacity factor") for n in costs.notes), costs.notes


def test_the_plan_carries_the_note():
    from adasched.planner.solver import SolveParams

    from adasched.planner.fsmoe.presets import load_configs

    plan = plan_moe(load_configs("mixtral-8x7b", 16), 16, load_profile("h100-sxm"), params=SolveParams(time_limit=2.0))
    for c in plan.configs:
        assert c.stage_notes[-1].startswith("f = k x capacity factor = 2 x 1.2: FSMoE's capacity buffer"), c.stage_notes
