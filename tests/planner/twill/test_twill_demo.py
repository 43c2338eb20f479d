"""The `make demo` Twill step: solves FA3, prints the schedule, writes the plan and the PNG."""
from __future__ import annotations

from adasched.launch.demo_twill import run
from adasched.planner.plan import load_plan
from adasched.planner.twill.plan import TwillPlan


def test_demo_twill(tmp_path, capsys):
    run(tmp_path)
    out = capsys.readouterr().out
    assert "I = 8 (MII 8), status optimal" in out and "validator: ok" in out and "triton knobs" in out
    assert (tmp_path / "twill-fa3.png").stat().st_size > 5000
    plan = load_plan(tmp_path / "twill-fa3.json", expect=TwillPlan)
    assert plan.ii == 8 and len(plan.warp_groups) == 3
