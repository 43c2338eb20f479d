"""Hand-edited plans that crashed `show` / `simulate` with a traceback (h34) or were accepted though they contradict
themselves: each now gets one `error: <file>: ...` line and exit status 2."""
import json

import pytest

from adasched.planner.cli import main


@pytest.fixture(scope="module")
def sp_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "sp.json"
    assert main(["plan", "sp", "--profile", "a100-64-flexsp-paper", "--seqlens", "lognormal:2000,1", "--gpus", "8",
                 "--global-batch", "16", "--steps", "2", "--no-milp", "--deterministic", "--out", str(out),
                 "--json"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def twill_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw") / "twill.json"
    assert main(["plan", "twill", "--graph", "fa3-hopper", "--machine", "h100", "--out", str(out), "--json"]) == 0
    return json.loads(out.read_text())


def _refused(tmp_path, capsys, plan, want):
    capsys.readouterr()
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(plan))
    for cmd in (["show", str(path)], ["simulate", str(path)]):
        rc = main(cmd)
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path}:"), (cmd, cap.err)
        assert want in lines[0], lines[0]
        assert "Traceback" not in cap.err


def test_valid_plans_are_shown(tmp_path, capsys, sp_plan, twill_plan):
    for name, plan in (("sp", sp_plan), ("tw", twill_plan)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(plan))
        assert main(["show", str(path)]) == 0, capsys.readouterr().err


def test_sp_step_with_no_sequences(tmp_path, capsys, sp_plan):
    plan = json.loads(json.dumps(sp_plan))
    plan["steps"][0]["seqlens"] = []  # (IndexError in the cost-model checks)
    _refused(tmp_path, capsys, plan, "steps.0.seqlens: empty")


def test_twill_huge_ii(tmp_path, capsys, twill_plan):
    plan = json.loads(json.dumps(twill_plan))
    plan["ii"] = 10 ** 400  # (OverflowError: int too large to convert to float)
    _refused(tmp_path, capsys, plan, "ii: Input should be less than or equal to 2147483647")


@pytest.mark.parametrize("field,value", [("seconds", -5.0), ("status", "bogus"), ("ii", 0)])
def test_twill_attempt_fields(tmp_path, capsys, twill_plan, field, value):
    plan = json.loads(json.dumps(twill_plan))
    plan["attempts"][0][field] = value
    _refused(tmp_path, capsys, plan, f"attempts.0.{field}:")


def test_twill_plain_ii_above_a_recorded_plain_schedule(tmp_path, capsys, twill_plan):
    found = [a["ii"] for a in twill_plan["attempts"] if not a["warp"] and a["status"] in ("optimal", "feasible")]
    assert found  # (FA3: CP-SAT finds the plain schedule first)
    plan = json.loads(json.dumps(twill_plan))
    plan["plain_ii"] = min(found) + 7
    _refused(tmp_path, capsys, plan, f"plain_ii {min(found) + 7} is above I = {min(found)}")
