"""28th session (bench/show hunt): an SP plan's static baseline was only checked to add up over the steps: halved
(the total kept consistent) it showed the plan slower than its baseline, and a world_size edited from 4 to 8 kept
the 4-GPU figure. Re-derived from the step's sequences where the cost model can be rebuilt (a built-in profile)."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.plan import load_plan


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "p.json"
    assert main(["plan", "sp", "--profile", "a100-64-flexsp-paper", "--model", "gpt-7b", "--gpus", "8",
                 "--seqlens", "builtin", "--max-context", "32768", "--global-batch", "48", "--steps", "2", "--seed", "3", "--no-milp", "--deterministic",
                 "--out", str(out)]) == 0
    return out


def _errors(plan_file, edit):
    d = json.loads(plan_file.read_text())
    edit(d)
    from adasched.planner.flexsp.plan import SPPlan

    return SPPlan.model_validate(d).verify()


def test_the_genuine_plan_verifies(plan_file):
    assert load_plan(plan_file).verify() == []


def test_an_edited_static_baseline_is_refused(plan_file):
    f = random.choice([0.5, 0.9, 1.7])

    def edit(d):
        s = random.randrange(len(d["steps"]))
        d["steps"][s]["baselines_ms"]["static"] = round(d["steps"][s]["baselines_ms"]["static"] * f, 6)
        d["baselines_ms"]["static"] = round(sum(st["baselines_ms"]["static"] for st in d["steps"]), 6)
    errors = _errors(plan_file, edit)
    assert [e for e in errors if "baselines_ms.static" in e and "cost model gives" in e], errors


def test_an_edited_world_size_is_refused(plan_file):
    errors = _errors(plan_file, lambda d: d.update(world_size=16))
    assert any("baselines_ms.static" in e for e in errors), errors


def test_show_says_when_the_cost_model_is_not_re_checked(plan_file):
    """(bench/show hunt) an edited profile digest skipped the cost-model checks without a word."""
    from adasched.planner.flexsp.plan import SPPlan

    d = json.loads(plan_file.read_text())
    assert not any(k == "not re-checked" for k, _ in SPPlan.model_validate(d).summary_rows())
    d["profile"]["digest"] = "0" * len(d["profile"]["digest"])
    rows = dict(SPPlan.model_validate(d).summary_rows())
    assert "cost model cannot be rebuilt here" in rows["not re-checked"]


def test_a_sequence_no_group_holds_is_an_error_not_an_exception(plan_file):
    """(review) static_sp raised on a sequence longer than an all-GPU group holds: verify threw instead of listing."""
    def edit(d):
        st = d["steps"][0]
        g = st["micro_batches"][0]["groups"][0]
        i = st["seqlens"].index(g["seqlens"][0])
        st["seqlens"][i] = g["seqlens"][0] = 10_000_000
    errors = _errors(plan_file, edit)
    assert any("baselines_ms.static" in e and "exceeds the capacity" in e for e in errors), errors
    assert any("GiB per GPU" in e for e in errors), errors
