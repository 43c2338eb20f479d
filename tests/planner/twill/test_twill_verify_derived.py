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
    # the labels show and simulate print (h43: an H100 plan showed as made for a B200)
    "machine_name": (lambda d: d.update(machine_name="b200"), "machine_name 'b200': the embedded machine is 'h100'"),
    "graph_name": (lambda d: d.update(graph_name="other"), "graph_name 'other': the embedded graph is 'fa3-hopper'"),
    # an attempt contradicting the plan's own schedules (h43: accepted)
    "infeasible_at_ii": (lambda d: d["attempts"].append({"ii": d["ii"], "warp": True, "status": "infeasible",
                                                          "seconds": 0.0}),
                         "attempts: I = {ii} (warp-specialised) is recorded infeasible, but the plan holds a schedule "
                         "at I = {ii}"),
    "plain_infeasible_at_ii": (lambda d: d["attempts"].append({"ii": d["ii"], "warp": False, "status": "infeasible",
                                                                "seconds": 0.0}),
                               "attempts: I = {ii} (plain) is recorded infeasible"),
    "plain_infeasible_at_plain_ii": (lambda d: d["attempts"].append({"ii": d["plain_ii"], "warp": False,
                                                                      "status": "infeasible", "seconds": 0.0}),
                                     "attempts: I = {plain_ii} (plain) is recorded infeasible, but the plan holds a "
                                     "schedule at"),
}


@pytest.mark.parametrize("what", list(EDITS))
def test_verify_refuses_a_derived_field_the_schedule_does_not_give(fa3, what):
    assert TwillPlan.model_validate(fa3).verify() == []
    fn, needle = EDITS[what]
    needle = needle.format(ii=fa3["ii"], plain_ii=fa3["plain_ii"])
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
    # not proved minimal: nothing to back - with a solver record that says so (status feasible, I = 4 open: gap
    # >= (5 - 4) / 5); the record left 'optimal' (no gap) is refused
    unproved = dict(ii_proven_minimal=False, plain_ii_proven=False,  # (a plain schedule: its plain I is its I)
                    attempts=[a for a in good["attempts"] if a["status"] != "infeasible"])
    assert _edit(good, lambda d: d.update(unproved, solver=dict(d["solver"], status="feasible", gap=0.2))) == []
    errs = _edit(good, lambda d: d.update(unproved))
    assert errs == ["solver.status 'optimal', but I = 5 is not proved minimal",
                    "solver.gap 0.0: I = 5 is not proved minimal and I = 4 is open, so the gap is at least 0.2"], errs
    errs = _edit(good, lambda d: d.update(unproved, solver=dict(d["solver"], status="feasible", gap=0.1)))
    assert errs == ["solver.gap 0.1: I = 5 is not proved minimal and I = 4 is open, so the gap is at least 0.2"]
    errs = _edit(good, lambda d: d.update(solver=dict(d["solver"], backend="heuristic", status="heuristic")))
    assert errs[:2] == ["solver.backend 'heuristic': method cp-sat is solved by 'ortools-cp-sat'",
                        "solver.status 'heuristic': a Twill plan's is 'optimal' or 'feasible'"], errs
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


def _serial_oracle(graph, units):
    """The no-pipelining list schedule as first written: every start tried one cycle at a time (ops in the same
    topological order, so only the search for a start differs)."""
    from adasched.planner.twill.plan import _topo

    order, preds = _topo(graph)
    busy, t = {}, {}
    for v in order:
        op = graph.op(v)
        s = max([t[e.src] + e.delay for e in preds[v]] + [0])
        while any(busy.get((u, s + c), 0) + n > units[u] for u, row in op.reserve.items() for c, n in enumerate(row)):
            s += 1
        for u, row in op.reserve.items():
            for c, n in enumerate(row):
                busy[(u, s + c)] = busy.get((u, s + c), 0) + n
        t[v] = s
    span = max(t[o.name] + o.length for o in graph.ops)
    for e in graph.edges:
        if e.distance > 0:
            span = max(span, -(-(t[e.src] + e.delay - t[e.dst]) // e.distance))
    return span


def test_serial_baseline_skips_busy_runs_and_long_tables_are_not_simulated():
    """Hunt finding: 64 ops of 1,024-cycle reservation tables (legal) took 18.7 s after a 2 s solve - the no-pipelining
    baseline stepped its start one cycle at a time (5.6 s) and the simulation (13 s) was under the instance cap while
    holding 3M reservation cells. The baseline skips a conflicting cell's busy run now (equal to the one-cycle
    search on random tables with gaps and capacities > 1), and such plans are not simulated (the note says why)."""
    import random

    from adasched.planner.twill.graph import check_graph
    from adasched.planner.twill.plan import MAX_SIM_CELLS, serial_cycles

    h100 = load_machine("h100")
    seed = random.randrange(2 ** 32)
    r = random.Random(seed)
    for _ in range(150):
        units = {"TC": r.randint(1, 3), "ALU": r.randint(1, 2)}
        ops = []
        for i in range(r.randint(2, 12)):
            res = {u: [r.choice([0, 0, 1, min(2, units[u])]) for _ in range(r.randint(1, 9))]
                   for u in r.sample(sorted(units), r.randint(1, 2))}
            for row in res.values():
                row[0] = row[0] or 1
            ops.append({"name": f"o{i}", "reserve": res})
        edges = [{"from": f"o{i}", "to": f"o{j}", "delay": r.randint(0, 4), "distance": 0}
                 for i in range(len(ops)) for j in range(i + 1, len(ops)) if r.random() < 0.2]
        g = Graph.model_validate({"name": "x", "units": units, "ops": ops, "edges": edges})
        p = check_graph(g, h100)
        assert serial_cycles(g, p.units) == _serial_oracle(g, p.units), f"seed {seed}"
    big = Graph.model_validate({"name": "long", "ops": [{"name": f"o{i}", "reserve": {"TC": [1] * 1024}}
                                                        for i in range(32)], "edges": []})
    plan = plan_twill(big, "h100", SolveParams(time_limit=2))
    assert plan.ii == 32 * 1024 and plan.baselines_ms["no-pipelining"] == pytest.approx(plan.predicted_ms)
    assert plan.sim_cycles_per_iteration is None and f"(at most {MAX_SIM_CELLS:,})" in plan.solver.note
