"""30th session: a MoE plan's iteration figures were only checked to be no shorter than the layers' forward and
backward: an iteration baseline edited by hand showed in `show` as a speedup the plan's own figures do not give,
and the exposed all-reduce, the all-reduce after the backward and the gradient slices' prefix rule were taken as
written. Verify now re-derives them from layer 0's stored stage costs, the slices and (a built-in profile) the
dense blocks, as plan_config computes them."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.fsmoe.costmodel import MoEConfig
from adasched.planner.fsmoe.plan import MoEPlan
from adasched.planner.fsmoe.planning import dense_block_ms, plan_moe
from adasched.planner.solver import SolveParams
from adasched.profiler.profile import load_profile

# (gpus, ep_size, router statistics): one expert copy, several copies, one GPU (nothing to all-reduce), layers of
# their own mean_k
LAYOUTS = [(16, None, False), (16, 4, False), (1, None, False), (16, 4, True)]


@pytest.fixture(autouse=True)
def _seeded():
    """A fresh draw per test, printed (shown with a failure) so that it can be replayed."""
    seed = random.SystemRandom().randrange(2**32)
    print(f"random.seed({seed})")
    random.seed(seed)


def _plan(gpus, ep_size, stats, source):
    L = random.randint(2, 5)
    cfg = MoEConfig(name="t", experts=8, hidden=random.choice([256, 512]), ffn_hidden=512, top_k=2, batch=2,
                    seq_len=256, num_layers=L, shared_experts=random.randint(0, 1),
                    mean_k_per_layer=[round(random.uniform(1.1, 2.0), 3) for _ in range(L)] if stats else None)
    return plan_moe([cfg], gpus, load_profile("h100-sxm"), stages=source, params=SolveParams(time_limit=5.0),
                    ep_size=ep_size)


@pytest.fixture(params=[(lay, src) for lay in LAYOUTS for src in ("published", "profile")],
                ids=lambda p: f"{p[0][0]}gpu-ep{p[0][1]}-{'stats' if p[0][2] else 'same'}-{p[1]}")
def planned(request):
    (gpus, ep, stats), src = request.param
    return _plan(gpus, ep, stats, src)


def _verify(plan, edit) -> list[str]:
    d = json.loads(plan.model_dump_json())
    edit(d["configs"][0])
    return MoEPlan.model_validate(d).verify()


def test_planned_iterations_verify_and_add_up(planned):
    assert planned.verify() == []
    c = planned.configs[0]
    cfg = MoEConfig.model_validate(c.config)
    f, b = dense_block_ms(cfg, load_profile("h100-sxm"))
    L = cfg.num_layers
    exposed_expert = c.expert_grad_exposed_ms if c.expert_copies > 1 else 0.0
    want = sum(lp.fwd_ms + lp.bwd_ms for lp in c.layers) + L * (f + b) + c.grad_exposed_ms + exposed_expert
    assert c.iteration_ms == pytest.approx(want, rel=1e-9)
    if cfg.mean_k_per_layer is None and c.expert_copies == 1:
        for name, ms in c.iteration_baselines_ms.items():
            assert ms == pytest.approx(c.baselines_fwd_bwd_ms[name] * L + L * (f + b) + c.grad_exposed_at_end_ms,
                                       rel=1e-9)


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if not lay[2]], ids=lambda lay: f"{lay[0]}gpu-ep{lay[1]}")
@pytest.mark.parametrize("source", ["published", "profile"])
def test_an_edited_iteration_baseline_is_refused(layout, source):
    # (layers of one cost model only: the baselines' layers of their own mean_k are not stored, not re-derived)
    planned = _plan(*layout, source)
    c = planned.configs[0]
    name = random.choice(sorted(c.iteration_baselines_ms))
    factor = random.choice([0.5, 0.9, 1.25, 3.0])
    errors = _verify(planned, lambda d: d["iteration_baselines_ms"].update(
        {name: d["iteration_baselines_ms"][name] * factor}))
    if c.expert_copies == 1:
        assert len(errors) == 1 and errors[0].startswith(f"config 't': iteration_baselines_ms.{name} "), errors
    else:  # (an exposed expert all-reduce of its own: out of its range, or unlike the other baseline's)
        assert len(errors) == 1 and errors[0].startswith("config 't': iteration_baselines_ms"), errors


def test_an_edited_exposed_all_reduce_is_refused(planned):
    c = planned.configs[0]
    new = c.grad_exposed_ms + random.uniform(1.0, 50.0)
    errors = _verify(planned, lambda d: d.update(grad_exposed_ms=new, iteration_ms=d["iteration_ms"] + (
        new - c.grad_exposed_ms)))
    assert errors and errors[0].startswith(f"config 't': grad_exposed_ms {new} ms, but the gradient slices"), errors


def test_an_edited_all_reduce_after_the_backward_is_refused(planned):
    errors = _verify(planned, lambda d: d.update(grad_exposed_at_end_ms=d["grad_exposed_at_end_ms"] * 0.5 + 1.0))
    assert errors and errors[0].startswith("config 't': grad_exposed_at_end_ms "), errors


def test_an_edited_iteration_is_refused_by_the_dense_blocks(planned):
    c = planned.configs[0]
    new = c.iteration_ms - random.uniform(0.05, 0.5) * c.iteration_ms * 0.1
    errors = _verify(planned, lambda d: d.update(iteration_ms=new))
    assert errors and any(e.startswith(f"config 't': iteration {new} ms, but its layers, the profile's dense "
                                       f"blocks") for e in errors), errors


def test_slices_against_the_prefix_rule_are_refused():
    """All the slices moved to the first gap of the backward (before any layer produced its gradients), the
    exposed all-reduce unchanged: no legal fill reduces anything there."""
    for _ in range(20):  # a draw that slices something (a draw that sliced nothing skipped the test before)
        plan = _plan(16, None, False, "published")
        if sum(plan.configs[0].grad_slices) > 0:
            break
    else:
        raise AssertionError("20 draws sliced nothing")
    total = sum(plan.configs[0].grad_slices)
    errors = _verify(plan, lambda d: d.update(grad_slices=[total] + [0.0] * (len(d["grad_slices"]) - 1)))
    assert errors == [f"config 't': gradient slice 0 ({total:.6g} elements) reduces gradients no layer has "
                      f"produced yet ({total:.6g} reduced by then, 0 produced)"], errors


def test_plans_before_the_dense_block_change_keep_their_iteration(planned):
    """(review) plans written before 2026-11-30 14:48 UTC priced the dense blocks' constants otherwise: their
    iteration, baselines and fastest-backward iteration all differ from today's dense blocks by the same amount
    per layer. They load; a plan written since with that difference is refused."""
    L = len(planned.configs[0].layers)
    delta = random.uniform(0.05, 0.5) * L

    def shift(d):
        d["iteration_ms"] += delta
        d["iteration_fastest_bwd_ms"] += delta
        for name in d["iteration_baselines_ms"]:
            d["iteration_baselines_ms"][name] += delta

    d = json.loads(planned.model_dump_json())
    shift(d["configs"][0])
    del d["configs"][0]["iteration_lower_bound_ms"]  # (as such a plan: no bound, no objective in its record)
    d["solver"].update(objective=None, bound=None, gap=None)
    errors = MoEPlan.model_validate(d).verify()
    assert len(errors) == 1 and "the profile's dense blocks" in errors[0], errors
    d["created"] = "2026-11-30T09:12:44+00:00"
    assert MoEPlan.model_validate(d).verify() == []
