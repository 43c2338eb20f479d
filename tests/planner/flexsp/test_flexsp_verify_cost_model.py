"""An SP plan made with a built-in profile is checked against the cost model it names: every group's time is the
model's for its sequences and degree, and its sequences fit a GPU's memory. Before, `show` and the trainers took a
hand-edited plan whose groups ran other sequences than their times were for, or every sequence on one GPU."""
from __future__ import annotations

import json
import random

import pytest

from adasched.planner.cli import main
from adasched.planner.flexsp.costmodel import model_preset, sp_cost_model
from adasched.profiler.builtins import builtin_profile


@pytest.fixture
def plan_file(tmp_path):
    rng = random.Random()
    lens = tmp_path / "lens.txt"
    lens.write_text("".join(f"{rng.randint(3000, 9000)}\n" for _ in range(6)))
    out = tmp_path / "p.json"
    assert main(["plan", "sp", "--seqlens", str(lens), "--gpus", "8", "--global-batch", "6", "--no-milp",
                 "--out", str(out)]) == 0
    return out


def _write(path, plan: dict) -> None:
    path.write_text(json.dumps(plan))


def _retime(plan: dict) -> None:
    """Make the micro-batch, step and plan times add up again, and the solver record (objective, a bound at most
    it, their gap) follow them (so only the cost-model check can object)."""
    from adasched.planner.plan import relative_gap

    for st in plan["steps"]:
        for mb in st["micro_batches"]:
            mb["predicted_ms"] = max(g["predicted_ms"] for g in mb["groups"])
        st["predicted_ms"] = round(sum(mb["predicted_ms"] for mb in st["micro_batches"]), 6)
    plan["predicted_ms"] = round(sum(st["predicted_ms"] for st in plan["steps"]), 6)
    s = plan["solver"]
    s["objective"] = plan["predicted_ms"]
    s["bound"] = min(s["bound"], s["objective"])
    if s["status"] != "optimal":
        s["gap"] = relative_gap(s["objective"], s["bound"])


def test_a_planned_sp_plan_matches_its_cost_model(plan_file, capsys):
    from adasched.planner.plan import load_plan

    plan = load_plan(plan_file)
    assert plan._builtin_cost_model() is not None and plan.verify() == []
    assert main(["show", str(plan_file)]) == 0


def test_a_group_time_that_is_not_its_sequences_is_refused(plan_file, capsys):
    plan = json.loads(plan_file.read_text())
    groups = [g for mb in plan["steps"][0]["micro_batches"] for g in mb["groups"]]
    g = groups[random.Random().randrange(len(groups))]
    g["predicted_ms"] = round(g["predicted_ms"] * random.Random().uniform(0.5, 0.9), 6)
    _retime(plan)
    _write(plan_file, plan)
    capsys.readouterr()
    assert main(["show", str(plan_file)]) == 2
    err = capsys.readouterr().err
    assert f"predicted_ms: {g['predicted_ms']} ms, but profile 'a100-64-flexsp-paper''s cost model gives" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_every_sequence_on_one_gpu_is_refused_for_memory(plan_file, capsys):
    plan = json.loads(plan_file.read_text())
    st = plan["steps"][0]
    ids = list(range(len(st["seqlens"])))
    cm = sp_cost_model(builtin_profile("a100-64-flexsp-paper"), model_preset("gpt-7b"), 8)
    ms = round(cm.group_time(1, st["seqlens"]), 6)  # the right time: only memory is wrong
    st["micro_batches"] = [{"groups": [{"degree": 1, "ranks": [0], "seq_ids": ids, "seqlens": st["seqlens"],
                                        "predicted_ms": ms}], "predicted_ms": ms, "source": "hand-edited"}]
    _retime(plan)
    for k in list(plan["baselines_ms"]):  # (baselines add up per step too; they are not the point here)
        plan["baselines_ms"][k] = round(sum(s["baselines_ms"][k] for s in plan["steps"]), 6)
    _write(plan_file, plan)
    capsys.readouterr()
    assert main(["show", str(plan_file)]) == 2
    err = capsys.readouterr().err
    need = cm.group_memory(1, st["seqlens"]) / 2**30
    assert (f"steps.0.micro_batches.0.groups.0: {sum(st['seqlens']):,} tokens on 1 GPUs need {need:,.2f} GiB per "
            f"GPU, more than profile 'a100-64-flexsp-paper''s") in err, err
    assert "cost model gives" not in err


def test_a_profile_that_is_not_the_builtin_is_not_judged(plan_file):
    """Another profile under the built-in's name (another digest): nothing to rebuild its cost model from."""
    from adasched.planner.plan import load_plan

    plan = json.loads(plan_file.read_text())
    plan["profile"]["digest"] = "0123456789abcdef"
    g = plan["steps"][0]["micro_batches"][0]["groups"][0]
    g["predicted_ms"] = round(g["predicted_ms"] * 0.5, 6)
    _retime(plan)
    _write(plan_file, plan)
    p = load_plan(plan_file)
    assert p._builtin_cost_model() is None and p.verify() == []
