"""A plan's simulation figures are re-simulated by verify (28th session): an edited rate (2.5 for the FA3 plan's),
an edited replay flag or a deadlock claimed on a schedule that runs were loaded and shown as planned; figures on a
schedule too large to simulate are refused rather than simulated for minutes."""
from __future__ import annotations

import random

import pytest

from adasched.planner.solver import SolveParams
from adasched.planner.twill import plan as twill_plan
from adasched.planner.twill.plan import TwillPlan, plan_twill

P = SolveParams(time_limit=5.0)


@pytest.fixture(scope="module")
def toy():
    return plan_twill("toy-attention", "h100", P)


def _verify(plan, **edit):
    return TwillPlan.model_validate({**plan.model_dump(mode="json"), **edit}).verify()


def test_the_plans_own_figures_pass(toy):
    assert toy.sim_deadlock is False and toy.sim_cycles_per_iteration is not None
    assert toy.verify() == []


@pytest.mark.parametrize("edit", ["rate", "replay"])
def test_an_edited_simulation_figure_is_refused(toy, edit):
    if edit == "rate":
        new = {"sim_cycles_per_iteration": round(toy.sim_cycles_per_iteration + random.uniform(0.01, 3.0), 4)}
    else:
        new = {"sim_replay_exact": not toy.sim_replay_exact}
    errors = _verify(toy, **new)
    assert any(e.startswith("simulation (cycles/iteration, deadlock, replay exact)") and "re-simulating" in e
               for e in errors), errors


def test_figures_on_a_schedule_too_big_to_simulate_are_refused(toy, monkeypatch):
    monkeypatch.setattr(twill_plan, "MAX_SIM_INSTANCES", 1)
    errors = _verify(toy)
    assert any("a schedule this size is not simulated" in e for e in errors), errors
    # the plan a too-big schedule gets (no figures) is no error
    assert not any("sim" in e for e in _verify(toy, sim_cycles_per_iteration=None, sim_deadlock=None,
                                                 sim_replay_exact=None))
