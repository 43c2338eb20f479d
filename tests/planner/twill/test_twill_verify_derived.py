"""TwillPlan.verify recomputes what a plan derives from its schedule (hunt findings; each failed before):
knobs, warp-group roles and registers, channels, buffers, peeled ops, op slots, ResMII, RecMII / exclusive bounds not
above their true values, plain I at or above MII, cycle_ns the machine's, and a "proved minimal" I backed by
infeasible attempts - a plan edited in any of them verified and `show` printed it. Also: a warp_specialize machine
whose register cap is not setmaxnreg's (255: a group held 250, maxnreg said 248), and `--out` naming the file of a
built-in --graph (the package's own graph was replaced by a plan)."""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from adasched.planner.cli import main
from adasched.planner.solver import SolveParams
from adasched.planner.twill.graph import Graph, Machine, load_machine
from adasched.planner.twill.plan import TwillPlan, plan_twill


@pytest.fixture(scope="module")
def fa3():
    return plan_twill("fa3-hopper", "h100", SolveParams(time_limit=10)).model_dump(mode="json")


def _edit(d, fn):
    d = copy.deepcopy(d)
    fn(d)
    return TwillPlan.model_validate(d).verify()


EDITS = {
    "knobs": (lambda d: d["knobs"].update(num_warps=12), "knobs: "),
    "roles": (lambda d: [g.update(role="producer") for g in d["warp_groups"]], "warp_groups: "),
    "regs": (lambda d: d["warp_groups"][-1].update(regs=d["warp_groups"][-1]["regs"] - 8), "warp_groups: "),
    "channels": (lambda d: d.update(channels=[]), "channels: "),
    "peeled": (lambda d: d.update(peeled=[o["name"] for o in d["ops"]]), "peeled: "),
    "buffers": (lambda d: d["buffers"].update(NOPE=4), "buffers: "),
    "lengths": (lambda d: [o.update(length=50) for o in d["ops"]], "ops: "),
    "cycle_ns": (lambda d: d.update(cycle_ns=d["cycle_ns"] * 10, predicted_ms=d["predicted_ms"] * 10), "cycle_ns "),
    "res_mii": (lambda d: d.update(res_mii=1, rec_mii=1, mii=max(1, d["excl_mii"])), "res_mii 1"),
    "plain_ii": (lambda d: d.update(plain_ii=1), "plain_ii 1 is below the MII"),
    "mii": (lambda d: d.update(mii=d["mii"] - 1, ii=d["ii"]), "mii "),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_verify_refuses_a_derived_field_the_schedule_does_not_give(fa3, what):
    assert TwillPlan.model_validate(fa3).verify() == []
    fn, needle = EDITS[what]
    errs = _edit(fa3, fn)
    assert any(e.startswith(needle) for e in errs), errs


def test_a_proved_minimal_i_needs_every_smaller_i_proved_infeasible():
    """A reservation table [1, 1, 0, 0, 1] and one more cycle on the only unit: MII 4, but I = 4 is infeasible
    (cells 0 and 4 share residue 0), so I = 5, proved by the infeasible attempt at 4. Without that attempt the
    claim is refused; and with the MII raised to 5 the bounds no longer hold (ResMII is 4)."""
    g = Graph.model_validate({"name": "gap", "units": {"TC": 1},
                              "ops": [{"name": "A", "reserve": {"TC": [1, 1, 0, 0, 1]}},
                                      {"name": "B", "reserve": {"TC": [1]}}],
                              "edges": [{"from": "A", "to": "B", "delay": 1, "distance": 0}]})
    plan = plan_twill(g, "h100", SolveParams(time_limit=10))
    assert (plan.ii, plan.mii, plan.ii_proven_minimal) == (5, 4, True) and plan.verify() == []
    good = plan.model_dump(mode="json")
    errs = _edit(good, lambda d: d.update(attempts=[a for a in d["attempts"] if a["status"] != "infeasible"]))
    assert any(e.startswith("ii_proven_minimal: I = 4") for e in errs), errs
    # not proved minimal: nothing to back
    assert _edit(good, lambda d: d.update(ii_proven_minimal=False,
                                          attempts=[a for a in d["attempts"] if a["status"] != "infeasible"])) == []
    errs = _edit(good, lambda d: d.update(mii=5, excl_mii=5))
    assert any("above the graph's MII 4" in e for e in errs), errs


def test_a_warp_specialize_machine_needs_setmaxnreg_s_register_cap():
    data = load_machine("b200").model_dump()
    for bad in (255, 250, 256, 512):
        with pytest.raises(ValueError, match=rf"regs_per_group_max {bad}: a warp_specialize machine's cap is "
                                             r"setmaxnreg's, a multiple of 8 in \[24, 248\]"):
            Machine.model_validate({**data, "regs_per_group_max": bad})
    assert Machine.model_validate({**data, "regs_per_group_max": 248}).regs_per_group_max == 248
    # a machine without warp specialisation has no maxnreg knob: any cap
    assert Machine.model_validate({**data, "warp_specialize": False, "regs_per_group_max": 255})


@pytest.mark.parametrize("option,name", [("--graph", "toy-attention"), ("--machine", "h100")])
def test_out_naming_a_built_in_input_file_is_refused(tmp_path, capsys, monkeypatch, option, name):
    import adasched.planner.twill.graph as G

    folder = tmp_path / ("graphs" if option == "--graph" else "machines")
    shutil.copytree(G.GRAPHS_DIR if option == "--graph" else G.MACHINES_DIR, folder)
    monkeypatch.setattr(G, "GRAPHS_DIR" if option == "--graph" else "MACHINES_DIR", folder)
    target = folder / f"{name}.json"
    before = target.read_text()
    args = ["plan", "twill", "--graph", "toy-attention", "--machine", "h100", "--time-limit", "2"]
    assert main([*args, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out: {target} is the {option} input: writing there would replace it; give the " \
                  "output another file\n", err
    assert target.read_text() == before
    assert json.loads(before).get("kind") is None
