"""(h50) MoE plan verify re-simulated layer 0 and the layers of another mean_k only: a later layer's backward order
or wgrad placement edited by hand passed (its timing table holds the best time per r); an 'interleaved' issue order
on an expert-sharded or two-step layout passed every check and failed the run after torchrun started; gradient slices
larger than their gaps, and an edited idle link time, passed - an edited plan claimed an iteration below the
optimum under status optimal. Each is refused now (plans written since ALL_LAYERS_CHECKED_SINCE)."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.fsmoe.costmodel import MoEConfig
from adasched.planner.fsmoe.model import _exposed, evaluate_pipeline
from adasched.planner.fsmoe.plan import MoEPlan, StageCostsRecord
from adasched.planner.fsmoe.planning import plan_moe
from adasched.planner.plan import relative_gap
from adasched.planner.solver import SolveParams
from adasched.profiler.profile import load_profile

FLAT = MoEConfig(name="flat", hidden=2048, ffn_hidden=2048, experts=16, top_k=1, capacity_factor=1.2, batch=2,
                 seq_len=2048, activation="swiglu", num_layers=4)
SHARDED = MoEConfig(name="sharded", hidden=1024, ffn_hidden=4096, experts=8, top_k=2, capacity_factor=1.0, batch=4,
                    seq_len=1024, activation="gelu", num_layers=3)


@pytest.fixture(scope="module")
def plan():
    """16 GPUs with published stage costs: the flat config on EP 16, the sharded one on FSMoE's layout."""
    p = plan_moe([SHARDED, FLAT], 16, load_profile("h100-sxm"), stages="published",
                 params=SolveParams(time_limit=10.0))
    assert p.verify() == []
    assert [c.hierarchical for c in p.configs] == [True, False]
    return p


def _edit(plan, edit, created=None):
    d = json.loads(plan.model_dump_json())
    edit(d)
    if created is not None:
        d["created"] = created
    return MoEPlan.model_validate(d).verify()


def _bwd_ms(c, lp):
    bwd = StageCostsRecord.model_validate(c["layer0_stage_costs"]).costs().backward()
    return evaluate_pipeline(bwd, lp["r_bwd"], lp["order_bwd"], lp["wgrad_bwd"]).time_ms


def test_every_layer_is_resimulated(plan):
    """Every later layer of the flat config, each backward (order, wgrad) whose simulated time differs from the
    recorded one: refused, naming that layer; an edit that gives the same time is the same schedule's cost and
    passes."""
    d0 = json.loads(plan.model_dump_json())
    c = d0["configs"][1]
    refused = 0
    for li in range(1, len(c["layers"])):
        for order in ("dispatch-first", "interleaved"):
            for wgrad in ("fused", "per-chunk", "deferred"):
                lp = dict(c["layers"][li], order_bwd=order, wgrad_bwd=wgrad)
                same = abs(_bwd_ms(c, lp) - lp["bwd_ms"]) <= 1e-9 * lp["bwd_ms"]

                def edit(d, li=li, order=order, wgrad=wgrad):
                    d["configs"][1]["layers"][li].update(order_bwd=order, wgrad_bwd=wgrad)

                errors = _edit(plan, edit)
                if same:
                    assert not [e for e in errors if "backward" in e], errors
                else:
                    refused += 1
                    assert errors and errors[0].startswith(f"config 'flat' layer {li}: backward "), errors
                    assert "but layer 0's stored stage costs give" in errors[0]
                    # the same edit in a plan written before the check: as before (its timing table only)
                    assert _edit(plan, edit, created="2026-12-04T12:00:00+00:00") == []
    assert refused, "no edit changed a later layer's backward (the configuration guards the test)"


def test_interleaved_on_the_sharded_layout_is_refused(plan):
    li = random.randrange(len(plan.configs[0].layers))
    for field in ("order_fwd", "order_bwd"):
        errors = _edit(plan, lambda d: d["configs"][0]["layers"][li].update({field: "interleaved"}))
        assert any(e.startswith(f"config 'sharded' layer {li}: issue order 'interleaved' on the expert-sharded "
                                "layout") for e in errors), errors


def test_slices_past_their_gaps_are_refused(plan):
    """The sharded config's slices set to hide all the dense gradients, every dependent figure recomputed so the
    rest holds together (h50's edit: an iteration below the optimum under status optimal)."""
    d = json.loads(plan.model_dump_json())
    c = d["configs"][0]
    rec = c["layer0_stage_costs"]
    D = float(MoEConfig.model_validate(c["config"]).replicated_params)
    a4, b4 = rec["alpha"][4], rec["work"][4] / D
    L = len(c["layers"])
    new = [0.0] + [D] * (L - 1)
    ex = _exposed(new, [D] * L, a4, b4)
    delta = c["grad_exposed_ms"] - ex
    assert delta > 0
    idle = [lp["bwd_link_idle_ms"] for lp in reversed(c["layers"])]
    assert any(a4 + b4 * x > g for x, g in zip(new, idle) if x > 0)

    def edit(d):
        c = d["configs"][0]
        c.update(grad_slices=new, grad_exposed_ms=ex, iteration_ms=c["iteration_ms"] - delta)
        s = d["solver"]
        s.update(objective=s["objective"] - delta, bound=s["bound"] - delta)
        s["gap"] = relative_gap(s["objective"], s["bound"])

    errors = _edit(plan, edit)
    assert len(errors) == 1 and errors[0].startswith("config 'sharded': gradient slice ") and \
        "more than its gap of" in errors[0], errors
    # the planner's own slices fit (verify passed above), each within its gap
    assert _edit(plan, lambda d: None) == []


def test_an_edited_idle_link_time_is_refused(plan):
    ci = random.randrange(2)
    li = random.randrange(len(plan.configs[ci].layers))
    name = plan.configs[ci].name
    errors = _edit(plan, lambda d: d["configs"][ci]["layers"][li].update(
        bwd_link_idle_ms=d["configs"][ci]["layers"][li]["bwd_link_idle_ms"] * 3 + 1.0))
    assert any(e.startswith(f"config '{name}' layer {li}: bwd_link_idle_ms ") for e in errors), errors



@pytest.mark.parametrize("gpn", [2, 4])
def test_one_copy_plans_expose_no_expert_all_reduce(gpn):
    """(r10) with one copy of each expert there are no expert buckets, yet the link queue's one-ulp residue of a
    slice that filled its gap exactly was recorded as 1.8e-15 ms of expert exposure, and verify refused the
    planner's own plan (gshard-grid, two-step exchange, published stages, 16 GPUs). It is 0 now; a plan written
    with the residue still loads."""
    from adasched.planner.fsmoe.presets import load_configs

    plan = plan_moe(load_configs("gshard-grid", 16), 16, load_profile("h100-sxm"), stages="published",
                    params=SolveParams(time_limit=10.0), two_step=True, gpus_per_node=gpn)
    assert plan.verify() == []
    ones = [c for c in plan.configs if c.expert_copies == 1]
    assert ones and all(c.expert_grad_exposed_ms == 0.0 for c in ones)
    i = plan.configs.index(ones[0])
    assert _edit(plan, lambda d: d["configs"][i].update(expert_grad_exposed_ms=1.7763568394002505e-15)) == []
    errors = _edit(plan, lambda d: d["configs"][i].update(expert_grad_exposed_ms=1e-6))
    assert any("expert_grad_exposed_ms 1e-06 exceeds the expert all-reduce 0.0" in e for e in errors), errors
